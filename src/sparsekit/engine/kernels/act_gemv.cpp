// Activation-sparse GEMV on CPU: y = threshold(x) @ W.T + bias for one input row.
//
// W is stored transposed, wt = W.T of shape (in, out), so that the weights multiplying one
// input feature x_j are one contiguous row wt[j, :]. Inputs with |x_j| < threshold_j are
// treated as zero and their rows are never read: at 50% activation sparsity half of the
// weight bytes stay in memory, which is what a memory-bound batch-1 GEMV is limited by.
// Each OpenMP thread owns a slice of y and walks all kept inputs, so no atomics are needed.
// Weights, inputs, thresholds and bias are all float32 or all bfloat16; bfloat16 weights are
// widened to float32 as they stream (a 16-bit shift) and every sum is accumulated in float32.
// Registered as torch.ops.sparsekit.act_gemv (schema in library.cpp).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "common.h"

namespace {

constexpr int64_t kAlign = 16;  // floats per 64-byte cache line: slices start on a line
constexpr int64_t kTile = 2048;  // outputs per tile: 8 KiB of y stays in L1 while rows stream
constexpr int64_t kWorkPerThread = 16384;  // multiply-adds that pay for one more thread

inline float widen(float v) { return v; }

// bfloat16 is the upper half of a float32: shift its bits into place.
inline float widen(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// y[0:n] += sum over k < 4 of a[k] * w[k][0:n] (four rows at once: fewer passes over y).
template <typename W>
inline void axpy4(float* __restrict y, const W* __restrict w0, const W* __restrict w1,
                  const W* __restrict w2, const W* __restrict w3, float a0, float a1, float a2,
                  float a3, int64_t n) {
#pragma omp simd
  for (int64_t o = 0; o < n; ++o) {
    y[o] += a0 * widen(w0[o]) + a1 * widen(w1[o]) + a2 * widen(w2[o]) + a3 * widen(w3[o]);
  }
}

template <typename W>
inline void axpy1(float* __restrict y, const W* __restrict w, float a, int64_t n) {
#pragma omp simd
  for (int64_t o = 0; o < n; ++o) y[o] += a * widen(w[o]);
}

// y[o0:o1] = bias + sum over kept j of x_j * wt[j, o0:o1], tile by tile.
template <typename W>
void slice(const W* wt, int64_t out, const std::vector<int64_t>& idx,
           const std::vector<float>& val, const W* bias, float* y, int64_t o0, int64_t o1) {
  const int64_t nnz = static_cast<int64_t>(idx.size());
  for (int64_t t0 = o0; t0 < o1; t0 += kTile) {
    const int64_t n = std::min(kTile, o1 - t0);
    float* yt = y + t0;
    for (int64_t o = 0; o < n; ++o) yt[o] = bias ? widen(bias[t0 + o]) : 0.f;
    int64_t k = 0;
    for (; k + 4 <= nnz; k += 4) {
      axpy4(yt, wt + idx[k] * out + t0, wt + idx[k + 1] * out + t0, wt + idx[k + 2] * out + t0,
            wt + idx[k + 3] * out + t0, val[k], val[k + 1], val[k + 2], val[k + 3], n);
    }
    for (; k < nnz; ++k) axpy1(yt, wt + idx[k] * out + t0, val[k], n);
  }
}

// The float32 result of one row, for weights, input, threshold and bias of element type W.
template <typename W>
at::Tensor gemv(const at::Tensor& wt, const at::Tensor& x, const at::Tensor& threshold,
                const at::Tensor* bias, int64_t threads) {
  const int64_t in = wt.size(0), out = wt.size(1);
  const W* xp = static_cast<const W*>(x.data_ptr());
  const W* tp = static_cast<const W*>(threshold.data_ptr());
  std::vector<int64_t> idx;
  std::vector<float> val;
  idx.reserve(in);
  val.reserve(in);
  for (int64_t j = 0; j < in; ++j) {
    const float v = widen(xp[j]);
    if (v != 0.f && std::fabs(v) >= widen(tp[j])) {
      idx.push_back(j);
      val.push_back(v);
    }
  }
  auto y = at::empty({out}, x.options().dtype(at::kFloat));
  float* yp = y.data_ptr<float>();
  const W* w = static_cast<const W*>(wt.data_ptr());
  const W* b = bias ? static_cast<const W*>(bias->data_ptr()) : nullptr;
  // A fork costs a few microseconds: small products (the GEMVs of a narrow model) run on one
  // thread, as CSR16 does; larger ones get at most one thread per kWorkPerThread multiply-adds.
  const int64_t work = static_cast<int64_t>(idx.size()) * out;
  const int T = static_cast<int>(std::clamp<int64_t>(
      std::min<int64_t>(threads, work / kWorkPerThread), 1, std::max<int64_t>(1, out / 64)));
#pragma omp parallel num_threads(T) if (T > 1)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t lines = (out + kAlign - 1) / kAlign;
    const int64_t o0 = std::min(out, lines * t / nt * kAlign);
    const int64_t o1 = std::min(out, lines * (t + 1) / nt * kAlign);
    slice(w, out, idx, val, b, yp, o0, o1);
  }
  return y;
}

at::Tensor act_gemv(const at::Tensor& wt, const at::Tensor& x, const at::Tensor& threshold,
                    const std::optional<at::Tensor>& bias, int64_t threads) {
  sparsekit::check_tensor(wt, "wt", 2);
  const auto dtype = wt.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16,
              "wt must be float32 or bfloat16 (in, out), got ", dtype);
  const int64_t in = wt.size(0), out = wt.size(1);
  sparsekit::check_tensor(x, "x", 1, dtype);
  sparsekit::check_size(x, "x", 0, in);
  sparsekit::check_tensor(threshold, "threshold", 1, dtype);
  sparsekit::check_size(threshold, "threshold", 0, in);
  const at::Tensor* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    sparsekit::check_tensor(*bias, "bias", 1, dtype);
    sparsekit::check_size(*bias, "bias", 0, out);
    b = &*bias;
  }
  sparsekit::num_threads(threads);
  if (dtype == at::kFloat) return gemv<float>(wt, x, threshold, b, threads);
  return gemv<uint16_t>(wt, x, threshold, b, threads).to(at::kBFloat16);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekit, CPU, m) { m.impl("act_gemv", &act_gemv); }
