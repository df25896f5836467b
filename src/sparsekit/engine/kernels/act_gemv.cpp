// Activation-sparse GEMV on CPU: y = threshold(x) @ W.T + bias for one input row.
//
// W is stored transposed, wt = W.T of shape (in, out), so that the weights multiplying one
// input feature x_j are one contiguous row wt[j, :]. Inputs with |x_j| < threshold_j are
// treated as zero and their rows are never read: at 50% activation sparsity half of the
// weight bytes stay in memory, which is what a memory-bound batch-1 GEMV is limited by.
// Each OpenMP thread owns a slice of y and walks all kept inputs, so no atomics are needed.
// Weights are float32, bfloat16 or int8 codes with float32 per-output `scales` (act_inputs.h
// has the dtypes of the other arguments); they are widened to float32 as they stream and every
// sum is accumulated in float32 (act_gemv_core.h, one copy per instruction set). The result
// has x's dtype. Registered as torch.ops.sparsekit.act_gemv (schema in library.cpp), with
// act_threshold, the thresholding of several rows that the multi-row path runs before its
// weight-only format (one pass and one call, where PyTorch takes four elementwise ops).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "act_inputs.h"
#include "common.h"

namespace {

constexpr int64_t kWorkPerThread = 16384;  // multiply-adds that pay for one more thread

at::Tensor act_gemv(const at::Tensor& wt, const at::Tensor& x, const at::Tensor& threshold,
                    const std::optional<at::Tensor>& bias, int64_t threads,
                    const std::optional<at::Tensor>& scales) {
  sparsekit::check_tensor(wt, "wt", 2);
  const int64_t in = wt.size(0), out = wt.size(1);
  sparsekit::check_act_inputs(wt, "wt", x, threshold, in);
  const auto a = sparsekit::check_act_outputs(wt, x, bias, scales, out, threads);
  std::vector<int32_t> idx;
  std::vector<float> val;
  sparsekit::kept_inputs(x, threshold, &idx, &val);
  auto y = at::empty({out}, x.options().dtype(at::kFloat));
  // A fork costs a few microseconds: small products (the GEMVs of a narrow model) run on one
  // thread, as CSR16 does; larger ones get at most one thread per kWorkPerThread multiply-adds.
  const int64_t work = static_cast<int64_t>(idx.size()) * out;
  const int T = static_cast<int>(std::clamp<int64_t>(
      std::min<int64_t>(a.threads, work / kWorkPerThread), 1, std::max<int64_t>(1, out / 64)));
  sparsekit::cores().act_gemv(sparsekit::ActGemvArgs{
      sparsekit::value_type(wt), wt.data_ptr(), a.scale, a.bias, a.bf16, idx.data(),
      val.data(), static_cast<int64_t>(idx.size()), out, y.data_ptr<float>(), T});
  return sparsekit::like_input(y, x);
}

// out = x with the entries |x_j| < threshold_j zeroed, as sparsify_input computes it: float32
// as x * (|x| >= t) (NaN stays NaN, a dropped negative entry is -0), bfloat16 by its
// magnitude bits against those of max(t, 0) (a dropped entry is +0).
void threshold_rows(const float* x, const float* t, int64_t rows, int64_t in, float* out) {
  for (int64_t r = 0; r < rows; ++r, x += in, out += in) {
    for (int64_t j = 0; j < in; ++j) out[j] = std::fabs(x[j]) >= t[j] ? x[j] : x[j] * 0.f;
  }
}

void threshold_rows(const uint16_t* x, const uint16_t* t, int64_t rows, int64_t in,
                    uint16_t* out) {
  std::vector<uint16_t> floor(in);  // the magnitude bits of max(t, 0)
  for (int64_t j = 0; j < in; ++j) floor[j] = (t[j] & 0x8000) ? 0 : t[j];
  for (int64_t r = 0; r < rows; ++r, x += in, out += in) {
    for (int64_t j = 0; j < in; ++j) {
      out[j] = (x[j] & 0x7FFF) >= floor[j] ? x[j] : uint16_t{0};
    }
  }
}

at::Tensor act_threshold(const at::Tensor& x, const at::Tensor& threshold) {
  sparsekit::check_float_or_bf16(x, "x");
  TORCH_CHECK(x.device().is_cpu() && x.dim() >= 1 && x.is_contiguous(),
              "x must be a contiguous CPU tensor of at least one dimension, got shape ",
              x.sizes(), " on ", x.device());
  const int64_t in = x.size(-1);
  sparsekit::check_tensor(threshold, "threshold", 1, x.scalar_type());
  sparsekit::check_size(threshold, "threshold", 0, in);
  auto out = at::empty_like(x);
  const int64_t rows = in == 0 ? 0 : x.numel() / in;
  if (x.scalar_type() == at::kBFloat16) {
    threshold_rows(reinterpret_cast<const uint16_t*>(x.data_ptr<c10::BFloat16>()),
                   reinterpret_cast<const uint16_t*>(threshold.data_ptr<c10::BFloat16>()),
                   rows, in, reinterpret_cast<uint16_t*>(out.data_ptr<c10::BFloat16>()));
  } else {
    threshold_rows(x.data_ptr<float>(), threshold.data_ptr<float>(), rows, in,
                   out.data_ptr<float>());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekit, CPU, m) {
  m.impl("act_gemv", &act_gemv);
  m.impl("act_threshold", &act_threshold);
}
