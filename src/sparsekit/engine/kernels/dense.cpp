// The dense low-precision op: y = x @ W.T (+ bias) on CPU for a dense W stored as bf16 or as
// int8 codes with one float32 scale per row, so that a layer below the sparse break-even
// still moves 2-4x fewer bytes than fp32. The arithmetic is the per-ISA core in
// dense_core.h; this file checks the tensors and calls it.

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

#include "common.h"

namespace {

// y = x @ W.T (+ bias) for x (..., in_features) fp32 or bf16 (y in its dtype) and a dense
// W (rows, in_features) of bf16 values, or of int8 codes with float32 scales (rows,):
// y[b, r] = scales[r] * sum_k W[r, k] * x[b, k], or (rows, groups) for groups of
// in_features / groups inputs: y[b, r] = sum_g scales[r, g] * sum_{k in g} W[r, k] * x[b, k].
// Sums are fp32.
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
  const auto groups = sparsekit::group_scales(scales, weight, rows, in_features);
  return sparsekit::scaled_linear(
      x_in, weight, scales, bias, rows, threads,
      [&](const sparsekit::Linear& io) {
        sparsekit::cores().dense_linear(sparsekit::DenseArgs{
            io, sparsekit::value_type(weight), weight.data_ptr(), groups.data, groups.size});
      },
      groups.data != nullptr);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekit, CPU, m) { m.impl("dense_linear", &dense_linear); }
