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

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

#include "common.h"

namespace {

constexpr int64_t kWorkPerThread = 16384;  // multiply-adds that pay for one more thread

inline float widen(float v) { return v; }
inline float widen(sparsekit::bf16 v) { return static_cast<float>(v); }

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
  // A fork costs a few microseconds: small products (the GEMVs of a narrow model) run on one
  // thread, as CSR16 does; larger ones get at most one thread per kWorkPerThread multiply-adds.
  const int64_t work = static_cast<int64_t>(idx.size()) * out;
  const int T = static_cast<int>(std::clamp<int64_t>(
      std::min<int64_t>(threads, work / kWorkPerThread), 1, std::max<int64_t>(1, out / 64)));
  sparsekit::cores().act_gemv(sparsekit::ActGemvArgs{
      std::is_same_v<W, sparsekit::bf16>, wt.data_ptr(), bias ? bias->data_ptr() : nullptr,
      idx.data(), val.data(), static_cast<int64_t>(idx.size()), out, y.data_ptr<float>(), T});
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
  return gemv<sparsekit::bf16>(wt, x, threshold, b, threads).to(at::kBFloat16);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekit, CPU, m) { m.impl("act_gemv", &act_gemv); }
