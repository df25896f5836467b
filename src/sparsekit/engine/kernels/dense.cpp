// Dense low-precision kernel for y = x @ W.T (+ bias) on CPU: W stored as bf16 (2 bytes per
// weight) or as int8 codes with one float32 scale per row (1 byte per weight), so that a
// layer below the sparse break-even still moves 2-4x fewer bytes than fp32.
//
// Batches up to kGemvMaxBatch stream W once: each row of W is widened to fp32 in registers
// and multiplied with every row of x (fp32 sums; an int8 row's sum is scaled once at the
// end). Larger batches widen a tile of kRowTile rows of W into an fp32 buffer that stays in
// L1 and take every row of x against it, so W is still read once from memory while x is
// reused from cache. Rows are split evenly across OpenMP threads.
//
// The row arithmetic is in plain pointer functions (dot_rows), one body per ISA under
// #if defined(__AVX512F__) / #elif defined(__AVX2__) / portable, ready for a per-ISA
// dispatch table.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "common.h"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kGemvMaxBatch = 3;  // batches up to this size run the streaming GEMV
constexpr int64_t kRowTile = 4;  // rows of W widened together in the batched path

using sparsekit::bf16;

#if defined(__AVX2__) && !defined(__AVX512F__)
inline float hsum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}
#endif

// out[b] = sum_k w[k] * x[b * ldx + k] for b < NB: one row of W (Value: int8, bf16 or fp32)
// against NB rows of fp32 inputs, the row read once.
template <int NB, typename Value>
inline void dot_rows(const Value* w, const float* x, int64_t ldx, int64_t n, float* out) {
  using namespace sparsekit;  // load16 / load8: int8, bf16 or fp32 widened to fp32
  int64_t k = 0;
  float acc[NB] = {};
#if defined(__AVX512F__)
  __m512 a[NB];
  for (int b = 0; b < NB; ++b) a[b] = _mm512_setzero_ps();
  for (; k + 16 <= n; k += 16) {
    const __m512 wv = load16(w + k);
    for (int b = 0; b < NB; ++b) a[b] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + b * ldx + k), a[b]);
  }
  for (int b = 0; b < NB; ++b) acc[b] = _mm512_reduce_add_ps(a[b]);
#elif defined(__AVX2__)
  __m256 a[NB];
  for (int b = 0; b < NB; ++b) a[b] = _mm256_setzero_ps();
  for (; k + 8 <= n; k += 8) {
    const __m256 wv = load8(w + k);
    for (int b = 0; b < NB; ++b) a[b] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + b * ldx + k), a[b]);
  }
  for (int b = 0; b < NB; ++b) acc[b] = hsum8(a[b]);
#endif
  for (; k < n; ++k) {
    const float wk = static_cast<float>(w[k]);
    for (int b = 0; b < NB; ++b) acc[b] += wk * x[b * ldx + k];
  }
  for (int b = 0; b < NB; ++b) out[b] = acc[b];
}

// Rows [r0, r1) of thread t out of T, an even split.
inline void split(int64_t rows, int t, int T, int64_t* r0, int64_t* r1) {
  *r0 = rows * t / T;
  *r1 = rows * (t + 1) / T;
}

// y[b, r] = scale[r] * sum + bias[r] (scale 1 without scales).
inline float finish(float sum, const float* scales, const float* bias, int64_t r) {
  const float s = scales ? sum * scales[r] : sum;
  return bias ? s + bias[r] : s;
}

// Batch <= kGemvMaxBatch: each row of W read once against all NB rows of x.
template <int NB, typename Value>
void gemv(const Value* w, int64_t rows, int64_t cols, const float* x, const float* scales,
          const float* bias, float* y, int T) {
#pragma omp parallel num_threads(T)
  {
    int64_t r0, r1;
    split(rows, omp_get_thread_num(), omp_get_num_threads(), &r0, &r1);
    for (int64_t r = r0; r < r1; ++r) {
      float out[NB];
      dot_rows<NB>(w + r * cols, x, cols, cols, out);
      for (int b = 0; b < NB; ++b) y[b * rows + r] = finish(out[b], scales, bias, r);
    }
  }
}

// Larger batches: kRowTile rows of W widened into an fp32 tile (reused from L1 by every
// row of x), each row of x then taken against the tile's rows.
template <typename Value>
void gemm(const Value* w, int64_t rows, int64_t cols, const float* x, int64_t batch,
          const float* scales, const float* bias, float* y, int T) {
  float* tiles = sparsekit::workspace(static_cast<int64_t>(T) * kRowTile * cols);
#pragma omp parallel num_threads(T)
  {
    const int t = omp_get_thread_num();
    float* tile = tiles + static_cast<int64_t>(t) * kRowTile * cols;
    int64_t r0, r1;
    split(rows, t, omp_get_num_threads(), &r0, &r1);
    for (int64_t q0 = r0; q0 < r1; q0 += kRowTile) {
      const int64_t q1 = std::min(r1, q0 + kRowTile);
      for (int64_t r = q0; r < q1; ++r) {
        const Value* wr = w + r * cols;
        float* tr = tile + (r - q0) * cols;
        for (int64_t k = 0; k < cols; ++k) tr[k] = static_cast<float>(wr[k]);
      }
      for (int64_t b = 0; b < batch; ++b) {
        const float* xb = x + b * cols;
        for (int64_t r = q0; r < q1; ++r) {
          float sum;
          dot_rows<1>(tile + (r - q0) * cols, xb, cols, cols, &sum);
          y[b * rows + r] = finish(sum, scales, bias, r);
        }
      }
    }
  }
}

template <typename Value>
void run(const at::Tensor& weight, const at::Tensor& x, const float* scales, const float* bias,
         at::Tensor& y, int T) {
  const Value* w = reinterpret_cast<const Value*>(weight.data_ptr());
  const int64_t rows = weight.size(0), cols = weight.size(1), batch = x.size(0);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  switch (batch) {
    case 1: gemv<1>(w, rows, cols, xp, scales, bias, yp, T); break;
    case 2: gemv<2>(w, rows, cols, xp, scales, bias, yp, T); break;
    case 3: gemv<3>(w, rows, cols, xp, scales, bias, yp, T); break;
    default: gemm(w, rows, cols, xp, batch, scales, bias, yp, T); break;
  }
}

// y = x @ W.T (+ bias) for x (batch, in_features) fp32 or bf16 (y in its dtype) and a dense
// W (rows, in_features) of bf16 values, or of int8 codes with float32 scales (rows,):
// y[b, r] = scales[r] * sum_k W[r, k] * x[b, k]. Sums are fp32.
at::Tensor dense_linear(const at::Tensor& weight, const at::Tensor& x_in,
                        const std::optional<at::Tensor>& bias, int64_t in_features,
                        int64_t threads, const std::optional<at::Tensor>& scales) {
  sparsekit::check_input_or_bf16(x_in, in_features);
  sparsekit::check_tensor(weight, "weight", 2);
  const bool int8 = weight.scalar_type() == at::kChar;
  TORCH_CHECK(int8 || weight.scalar_type() == at::kBFloat16, "weight must be ", at::kChar,
              " or ", at::kBFloat16, ", got ", weight.scalar_type());
  sparsekit::check_size(weight, "weight", 1, in_features);
  const int64_t rows = weight.size(0);
  const bool scaled = scales.has_value() && scales->defined();
  TORCH_CHECK(scaled == int8, "scales must be given for int8 weight values and only for them "
              "(weight is ", weight.scalar_type(), ", scales ", scaled ? "given" : "missing", ")");
  const float* s = nullptr;
  if (scaled) {
    sparsekit::check_tensor(*scales, "scales", 1, at::kFloat);
    sparsekit::check_size(*scales, "scales", 0, rows);
    s = scales->data_ptr<float>();
  }
  const float* b = sparsekit::bias_data(bias, rows);
  const int T = sparsekit::num_threads(threads);
  const at::Tensor x = sparsekit::as_float32(x_in);
  auto y = at::empty({x.size(0), rows}, x.options());
  if (x.size(0) == 0 || rows == 0) return sparsekit::like_input(y, x_in);
  if (int8) {
    run<int8_t>(weight, x, s, b, y, T);
  } else {
    run<bf16>(weight, x, s, b, y, T);
  }
  return sparsekit::like_input(y, x_in);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekit, CPU, m) { m.impl("dense_linear", &dense_linear); }
