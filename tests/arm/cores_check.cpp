// The portable kernel cores (namespace sparsekit::scalar, the ones a 64-bit ARM CPU runs: GCC
// vector code compiles to NEON there) against a plain double-precision loop: built with a
// cross compiler and run under qemu by tests/test_kernels_isa.py (which skips where either
// is missing). Dense, CSR (16- and 32-bit columns), bitmap rows, the activation-sparse GEMV
// over the transposed weight and, on a 2:4 weight, packed N:M, each with float32, bfloat16
// and int8 values (per-row scales; int8 also W8A8, the inputs quantized per row), a GEMV
// (batch 1) and an SpMM (batch 5), on 2 threads. Prints one line per case and exits 1 on any
// mismatch.

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <algorithm>
#include <random>
#include <vector>

#include "cores.h"
#include "qlinear.h"

namespace {

using sparsekit::Value;

constexpr int64_t kRows = 37, kCols = 200;
std::mt19937 rng(7);

float uniform() { return std::uniform_real_distribution<float>(-1.f, 1.f)(rng); }

uint16_t to_bf16(float f) {  // round to nearest even, as torch does
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
float from_bf16(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// A pruned weight with its stored values in one dtype: the dense values it stands for
// (dequantized), the stored bytes per row-major position, and per-row scales for int8.
struct Weight {
  Value value;
  bool nm;                            // two nonzeros at most in every four inputs
  std::vector<double> dense;          // kRows x kCols, zeros where pruned
  std::vector<uint8_t> stored;        // kRows x kCols elements of the value type
  std::vector<float> scales;          // int8 only
  size_t size() const { return value == Value::f32 ? 4 : value == Value::bf16 ? 2 : 1; }
};

// sparsity < 0: 2:4 (two of every four consecutive inputs pruned, at random)
Weight make_weight(Value value, double sparsity) {
  Weight w{value, sparsity < 0, std::vector<double>(kRows * kCols), {}, {}};
  w.stored.assign(kRows * kCols * w.size(), 0);
  std::vector<float> raw(kRows * kCols);
  std::uniform_real_distribution<double> unit(0, 1);
  for (auto& f : raw) f = unit(rng) < sparsity ? 0.f : uniform();
  for (size_t g = 0; sparsity < 0 && g < raw.size(); g += 4) {
    const int a = static_cast<int>(rng() % 4), b = (a + 1 + static_cast<int>(rng() % 3)) % 4;
    raw[g + a] = raw[g + b] = 0.f;
  }
  if (value == Value::i8) w.scales.assign(kRows, 1.f);
  for (int64_t r = 0; r < kRows; ++r) {
    float amax = 0.f;
    for (int64_t c = 0; c < kCols; ++c) amax = std::max(amax, std::fabs(raw[r * kCols + c]));
    for (int64_t c = 0; c < kCols; ++c) {
      const int64_t i = r * kCols + c;
      if (value == Value::f32) {
        std::memcpy(&w.stored[4 * i], &raw[i], 4);
        w.dense[i] = raw[i];
      } else if (value == Value::bf16) {
        const uint16_t h = to_bf16(raw[i]);
        std::memcpy(&w.stored[2 * i], &h, 2);
        w.dense[i] = from_bf16(h);
      } else {
        const float s = amax > 0.f ? amax / 127.f : 1.f;
        const int8_t q = static_cast<int8_t>(std::nearbyint(raw[i] / s));
        w.stored[i] = static_cast<uint8_t>(q);
        w.scales[r] = s;
        w.dense[i] = static_cast<double>(q) * s;
      }
    }
  }
  return w;
}

bool nonzero(const Weight& w, int64_t i) {
  for (size_t b = 0; b < w.size(); ++b) if (w.stored[i * w.size() + b]) return true;
  return false;
}

int failures = 0;

// x's rows on their int8 grids (W8A8: each row's largest magnitude / 127, rounded half to
// even, as sparsekit.quantize), dequantized.
std::vector<float> on_int8_grid(const std::vector<float>& x, int64_t batch) {
  std::vector<float> q(x.size());
  for (int64_t b = 0; b < batch; ++b) {
    float amax = 0.f;
    for (int64_t c = 0; c < kCols; ++c) amax = std::max(amax, std::fabs(x[b * kCols + c]));
    const float sx = amax > 0.f ? amax / 127.f : 1.f;
    for (int64_t c = 0; c < kCols; ++c) {
      const float t = std::clamp(std::nearbyint(x[b * kCols + c] / sx), -127.f, 127.f);
      q[b * kCols + c] = t * sx;
    }
  }
  return q;
}

void expect(const char* what, const Weight& w, const std::vector<float>& x, int64_t batch,
            const std::vector<float>& y, const std::vector<float>& bias) {
  double worst = 0.0;
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t r = 0; r < kRows; ++r) {
      double ref = bias[r], mag = std::fabs(bias[r]);
      for (int64_t c = 0; c < kCols; ++c) {
        ref += w.dense[r * kCols + c] * x[b * kCols + c];
        mag += std::fabs(w.dense[r * kCols + c] * x[b * kCols + c]);
      }
      const double err = std::fabs(y[b * kRows + r] - ref) / (1e-6 + mag);
      worst = std::isnan(err) ? INFINITY : std::max(worst, err);  // an output never written
    }
  }
  const char* names[] = {"fp32", "bf16", "int8"};
  const bool ok = worst < 1e-5;
  std::printf("%s %s batch %lld: %s (worst relative error %.2e)\n", what,
              names[static_cast<int>(w.value)], static_cast<long long>(batch),
              ok ? "ok" : "MISMATCH", worst);
  failures += !ok;
}

void check(const Weight& w, int64_t batch) {
  const auto& cores = sparsekit::scalar::kCores;
  std::vector<float> x(batch * kCols), bias(kRows), y(batch * kRows);
  for (auto& v : x) v = uniform();
  for (auto& v : bias) v = uniform();
  const sparsekit::Output out{w.value == Value::i8 ? w.scales.data() : nullptr, bias.data()};
  const sparsekit::Linear io{x.data(), y.data(), batch, kRows, kCols, out, 2};
  const size_t size = w.size();

  std::fill(y.begin(), y.end(), NAN);
  cores.dense_linear(sparsekit::DenseArgs{io, w.value, w.stored.data()});
  expect("dense", w, x, batch, y, bias);

  // CSR: rows' nonzero values packed, columns as uint16 (narrow) and int32
  std::vector<uint8_t> values;
  std::vector<uint16_t> col16;
  std::vector<int32_t> col32, rowptr{0};
  for (int64_t r = 0; r < kRows; ++r) {
    for (int64_t c = 0; c < kCols; ++c) {
      if (!nonzero(w, r * kCols + c)) continue;
      values.insert(values.end(), &w.stored[(r * kCols + c) * size],
                    &w.stored[(r * kCols + c) * size] + size);
      col16.push_back(static_cast<uint16_t>(c));
      col32.push_back(static_cast<int32_t>(c));
    }
    rowptr.push_back(static_cast<int32_t>(col32.size()));
  }
  values.resize(values.size() + 64 * size);  // slack past the last value, as the ops allocate
  std::fill(y.begin(), y.end(), NAN);
  cores.csr_linear(
      sparsekit::CsrArgs{io, w.value, values.data(), col16.data(), true, rowptr.data()});
  expect("csr16", w, x, batch, y, bias);
  std::fill(y.begin(), y.end(), NAN);
  cores.csr_linear(
      sparsekit::CsrArgs{io, w.value, values.data(), col32.data(), false, rowptr.data()});
  expect("csr32", w, x, batch, y, bias);

  // bitmap rows: 16-bit words per row, the same packed values and row pointers
  const int64_t words = (kCols + 15) / 16;
  std::vector<uint16_t> bits(kRows * words, 0);
  for (int64_t r = 0; r < kRows; ++r) {
    for (int64_t c = 0; c < kCols; ++c) {
      if (nonzero(w, r * kCols + c)) {
        bits[r * words + c / 16] |= static_cast<uint16_t>(1u << (c % 16));
      }
    }
  }
  std::fill(y.begin(), y.end(), NAN);
  cores.bitmap_linear(sparsekit::BitmapArgs{io, w.value, values.data(), bits.data(), rowptr.data(),
                                            words, false});
  expect("bitmap", w, x, batch, y, bias);

  if (batch == 1) {  // activation-sparse GEMV: the transposed weight's rows of kept inputs
    std::vector<uint8_t> wt(kCols * kRows * size);
    for (int64_t r = 0; r < kRows; ++r) {
      for (int64_t c = 0; c < kCols; ++c) {
        std::memcpy(&wt[(c * kRows + r) * size], &w.stored[(r * kCols + c) * size], size);
      }
    }
    std::vector<int32_t> idx;
    std::vector<float> val, kept(kCols, 0.f);
    for (int64_t c = 0; c < kCols; ++c) {
      if (std::fabs(x[c]) < 0.5f) continue;  // TEAL-like: small inputs dropped
      idx.push_back(static_cast<int32_t>(c));
      val.push_back(x[c]);
      kept[c] = x[c];
    }
    std::fill(y.begin(), y.end(), NAN);
    cores.act_gemv(sparsekit::ActGemvArgs{w.value, wt.data(), out.scale, bias.data(), false,
                                          idx.data(), val.data(),
                                          static_cast<int64_t>(idx.size()), kRows, y.data(), 2});
    expect("act_gemv", w, kept, 1, y, bias);
  }

  if (w.value == Value::i8) {  // W8A8: the inputs quantized per row inside the op
    const auto& q = sparsekit::scalar::kQCores;
    const std::vector<float> xq = on_int8_grid(x, batch);
    std::fill(y.begin(), y.end(), NAN);
    q.dense_qlinear(sparsekit::DenseArgs{io, w.value, w.stored.data()});
    expect("dense W8A8", w, xq, batch, y, bias);
    std::fill(y.begin(), y.end(), NAN);
    q.bitmap_qlinear(sparsekit::BitmapArgs{io, w.value, values.data(), bits.data(),
                                           rowptr.data(), words, false});
    expect("bitmap W8A8", w, xq, batch, y, bias);
  }

  if (!w.nm) return;
  // packed 2:4: two values per group of four inputs, each with a 2-bit field naming its input
  // (a padding value is zero and names the group's first), fields of a row from bit 0 of its
  // words, 16 values per 32-bit word
  const int64_t width = kCols / 4 * 2, nm_words = (width + 15) / 16;
  std::vector<uint8_t> nm_values(kRows * width * size + 64 * size, 0);
  std::vector<uint32_t> fields(kRows * nm_words, 0);
  for (int64_t r = 0; r < kRows; ++r) {
    for (int64_t g = 0; g < kCols / 4; ++g) {
      int64_t k = r * width + 2 * g;
      for (int64_t i = 0; i < 4; ++i) {
        if (!nonzero(w, r * kCols + 4 * g + i)) continue;
        std::memcpy(&nm_values[k * size], &w.stored[(r * kCols + 4 * g + i) * size], size);
        const int64_t bit = 2 * (k - r * width);
        fields[r * nm_words + bit / 32] |= static_cast<uint32_t>(i) << (bit % 32);
        ++k;
      }
    }
  }
  std::fill(y.begin(), y.end(), NAN);
  cores.nm_linear(sparsekit::NMArgs{io, w.value, nm_values.data(), fields.data(), 2, 4, 2, width,
                                    nm_words});
  expect("nm 2:4", w, x, batch, y, bias);
  if (w.value == Value::i8) {
    std::fill(y.begin(), y.end(), NAN);
    sparsekit::scalar::kQCores.nm_qlinear(sparsekit::NMArgs{
        io, w.value, nm_values.data(), fields.data(), 2, 4, 2, width, nm_words});
    expect("nm 2:4 W8A8", w, on_int8_grid(x, batch), batch, y, bias);
  }
}

}  // namespace

int main() {
  for (const Value value : {Value::f32, Value::bf16, Value::i8}) {
    for (const double sparsity : {0.6, -1.0}) {
      const Weight w = make_weight(value, sparsity);
      for (const int64_t batch : {1, 5}) check(w, batch);
    }
  }
  std::printf("%s: %d mismatches\n", sparsekit::scalar::kCores.isa, failures);
  return failures ? 1 : 0;
}
