// Activation-sparse GEMV on CPU: y = threshold(x) @ W.T + bias for one input row.
//
// W is stored transposed, wt = W.T of shape (in, out), so that the weights multiplying one
// input feature x_j are one contiguous row wt[j, :]. Inputs with |x_j| < threshold_j are
// treated as zero and their rows are never read: at 50% activation sparsity half of the
// weight bytes stay in memory, which is what a memory-bound batch-1 GEMV is limited by.
// Each OpenMP thread owns a slice of y and walks all kept inputs, so no atomics are needed.
// Registered as the TorchScript operator torch.ops.sparsekit.act_gemv.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

namespace {

constexpr int64_t kAlign = 16;  // floats per 64-byte cache line: slices start on a line
constexpr int64_t kTile = 2048;  // outputs per tile: 8 KiB of y stays in L1 while rows stream
constexpr int64_t kWorkPerThread = 16384;  // multiply-adds that pay for one more thread

// y[0:n] += sum over k < 4 of a[k] * w[k][0:n] (four rows at once: fewer passes over y).
inline void axpy4(float* __restrict y, const float* __restrict w0, const float* __restrict w1,
                  const float* __restrict w2, const float* __restrict w3, float a0, float a1,
                  float a2, float a3, int64_t n) {
#pragma omp simd
  for (int64_t o = 0; o < n; ++o) y[o] += a0 * w0[o] + a1 * w1[o] + a2 * w2[o] + a3 * w3[o];
}

inline void axpy1(float* __restrict y, const float* __restrict w, float a, int64_t n) {
#pragma omp simd
  for (int64_t o = 0; o < n; ++o) y[o] += a * w[o];
}

// y[o0:o1] = bias + sum over kept j of x_j * wt[j, o0:o1], tile by tile.
void slice(const float* wt, int64_t out, const std::vector<int64_t>& idx,
           const std::vector<float>& val, const float* bias, float* y, int64_t o0, int64_t o1) {
  const int64_t nnz = static_cast<int64_t>(idx.size());
  for (int64_t t0 = o0; t0 < o1; t0 += kTile) {
    const int64_t n = std::min(kTile, o1 - t0);
    float* yt = y + t0;
    for (int64_t o = 0; o < n; ++o) yt[o] = bias ? bias[t0 + o] : 0.f;
    int64_t k = 0;
    for (; k + 4 <= nnz; k += 4) {
      axpy4(yt, wt + idx[k] * out + t0, wt + idx[k + 1] * out + t0, wt + idx[k + 2] * out + t0,
            wt + idx[k + 3] * out + t0, val[k], val[k + 1], val[k + 2], val[k + 3], n);
    }
    for (; k < nnz; ++k) axpy1(yt, wt + idx[k] * out + t0, val[k], n);
  }
}

at::Tensor act_gemv(const at::Tensor& wt, const at::Tensor& x, const at::Tensor& threshold,
                    const std::optional<at::Tensor>& bias, int64_t threads) {
  TORCH_CHECK(wt.device().is_cpu() && wt.scalar_type() == at::kFloat && wt.dim() == 2 &&
                  wt.is_contiguous(), "wt must be a contiguous 2-D float32 CPU tensor (in, out)");
  const int64_t in = wt.size(0), out = wt.size(1);
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.numel() == in,
              "x must be contiguous float32 with in_features = ", in, " elements");
  TORCH_CHECK(threshold.scalar_type() == at::kFloat && threshold.is_contiguous() &&
                  threshold.numel() == in, "threshold must be contiguous float32 of length ", in);
  const float* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() &&
                    bias->numel() == out, "bias must be contiguous float32 of length ", out);
    b = bias->data_ptr<float>();
  }
  const float* xp = x.data_ptr<float>();
  const float* tp = threshold.data_ptr<float>();
  std::vector<int64_t> idx;
  std::vector<float> val;
  idx.reserve(in);
  val.reserve(in);
  for (int64_t j = 0; j < in; ++j) {
    if (xp[j] != 0.f && std::fabs(xp[j]) >= tp[j]) {
      idx.push_back(j);
      val.push_back(xp[j]);
    }
  }
  auto y = at::empty({out}, x.options());
  float* yp = y.data_ptr<float>();
  const float* w = wt.data_ptr<float>();
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

}  // namespace

TORCH_LIBRARY(sparsekit, m) {
  m.def("act_gemv(Tensor wt, Tensor x, Tensor threshold, Tensor? bias, int threads) -> Tensor",
        &act_gemv);
}
