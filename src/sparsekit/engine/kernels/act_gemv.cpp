// Activation-sparse GEMV on CPU: y = threshold(x) @ W.T + bias for one input row.
//
// W is stored transposed, wt = W.T of shape (in, out), so that the weights multiplying one
// input feature x_j are one contiguous row wt[j, :]. Inputs with |x_j| < threshold_j are
// treated as zero and their rows are never read: at 50% activation sparsity half of the
// weight bytes stay in memory, which is what a memory-bound batch-1 GEMV is limited by.
// Each OpenMP thread adds a share of the kept inputs into its own sums, then writes a share of
// y from every thread's sums, so no atomics are needed (act::share_kept).
// Weights are float32, bfloat16 or int8 codes with float32 `scales` per output, or per group
// of inputs and output (act_inputs.h has the dtypes of the other arguments); they are widened to float32 as they stream and every
// sum is accumulated in float32 (act_gemv_core.h, one copy per instruction set). The result
// has x's dtype. Registered as torch.ops.sparsekit.act_gemv (schema in library.cpp), with
// act_threshold, the thresholding of several rows that the multi-row path runs before its
// weight-only format (one pass and one call, where PyTorch takes four elementwise ops).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
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
  const auto a = sparsekit::check_act_outputs(wt, x, bias, scales, out, threads, in);
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
      val.data(), static_cast<int64_t>(idx.size()), out, y.data_ptr<float>(), T,
      a.group_scales, a.group_size});
  return sparsekit::like_input(y, x);
}

// out = x with the entries |x_j| < threshold_j zeroed, as sparsify_input computes it (a
// dropped entry keeps its sign: x * 0), on the bits: the magnitude bits of a float order like
// its magnitude, so each entry's are compared as integers with those of max(t_j, 0) (`floor`),
// a loop that vectorises (the float comparison compiles to a branch per entry, which runs
// 5x slower on half-kept inputs). A NaN entry is above every floor: it stays NaN.
template <typename Bits>
void threshold_rows(const Bits* x, const Bits* floor, int64_t rows, int64_t in, Bits* out) {
  constexpr Bits kSign = std::numeric_limits<Bits>::min();
  for (int64_t r = 0; r < rows; ++r, x += in, out += in) {
    for (int64_t j = 0; j < in; ++j) {
      const Bits v = x[j];
      out[j] = static_cast<Bits>(v & ~kSign) >= floor[j] ? v : static_cast<Bits>(v & kSign);
    }
  }
}

// threshold_rows on x (rows, in) of float32 (Bits int32_t, exponent bits kInf 0x7F800000) or
// bfloat16 (int16_t, 0x7F80). A NaN threshold is refused: no entry compares with it.
template <typename Bits, Bits kInf>
void threshold_all(const at::Tensor& x, const at::Tensor& threshold, at::Tensor& out,
                   int64_t rows, int64_t in, int64_t grain) {
  constexpr Bits kSign = std::numeric_limits<Bits>::min();
  const auto* t = static_cast<const Bits*>(threshold.data_ptr());
  std::vector<Bits> floor(in);  // the magnitude bits of max(t, 0)
  for (int64_t j = 0; j < in; ++j) {
    TORCH_CHECK(static_cast<Bits>(t[j] & ~kSign) <= kInf,
                "threshold must not hold NaN (no entry compares with it), got NaN at index ", j);
    floor[j] = t[j] < 0 ? Bits{0} : t[j];
  }
  const auto* xs = static_cast<const Bits*>(x.data_ptr());
  auto* os = static_cast<Bits*>(out.data_ptr());
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    threshold_rows(xs + r0 * in, floor.data(), r1 - r0, in, os + r0 * in);
  });
}

// Rows per task: at least kThresholdGrain entries, so that a small input stays on one thread.
// The rows split over PyTorch's threads as its elementwise ops split them, so each thread
// mostly reads what it wrote in the op before (128 x 2048 bfloat16 rows written by a two-
// thread copy: 34 us on one thread, as read from the other core's cache, 14 us on two).
constexpr int64_t kThresholdGrain = 32768;

// act_threshold into `out` (x's shape and dtype, contiguous, not overlapping x): the multi-row
// path reuses one buffer instead of a fresh allocation per call, which glibc hands back to the
// kernel between calls (a 128 x 5632 bfloat16 input faulted in 70-210 pages per call, 6-12 % of
// the thresholding and the 2048 x 5632 product it feeds). Everything is checked before anything
// is written.
at::Tensor& act_threshold_out(const at::Tensor& x, const at::Tensor& threshold, at::Tensor& out) {
  sparsekit::check_float_or_bf16(x, "x");
  TORCH_CHECK(x.device().is_cpu() && x.dim() >= 1 && x.is_contiguous(),
              "x must be a contiguous CPU tensor of at least one dimension, got shape ",
              x.sizes(), " on ", x.device());
  const int64_t in = x.size(-1);
  sparsekit::check_tensor(threshold, "threshold", 1, x.scalar_type());
  sparsekit::check_size(threshold, "threshold", 0, in);
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == x.scalar_type() &&
                  out.sizes() == x.sizes() && out.is_contiguous(),
              "out must be a contiguous CPU tensor of x's shape ", x.sizes(), " and dtype ",
              x.scalar_type(), ", got shape ", out.sizes(), " and dtype ", out.scalar_type());
  const auto* xb = static_cast<const char*>(x.data_ptr());
  const auto* ob = static_cast<const char*>(out.data_ptr());
  TORCH_CHECK(x.numel() == 0 || ob + out.nbytes() <= xb || xb + x.nbytes() <= ob,
              "out must not overlap x");
  const int64_t rows = in == 0 ? 0 : x.numel() / in;
  const int64_t grain = std::max<int64_t>(1, kThresholdGrain / std::max<int64_t>(in, 1));
  if (x.scalar_type() == at::kBFloat16) {
    threshold_all<int16_t, 0x7F80>(x, threshold, out, rows, in, grain);
  } else {
    threshold_all<int32_t, 0x7F800000>(x, threshold, out, rows, in, grain);
  }
  return out;
}

at::Tensor act_threshold(const at::Tensor& x, const at::Tensor& threshold) {
  auto out = at::empty_like(x, at::MemoryFormat::Contiguous);
  return act_threshold_out(x, threshold, out);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekit, CPU, m) {
  m.impl("act_gemv", &act_gemv);
  m.impl("act_threshold", &act_threshold);
  m.impl("act_threshold.out", &act_threshold_out);
}
