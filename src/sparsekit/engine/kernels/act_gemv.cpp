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
// has x's dtype. Registered as torch.ops.sparsekit.act_gemv (schema in library.cpp).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
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

}  // namespace

TORCH_LIBRARY_IMPL(sparsekit, CPU, m) { m.impl("act_gemv", &act_gemv); }
