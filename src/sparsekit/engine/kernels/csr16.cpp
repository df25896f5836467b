// The CSR op with 16-bit (or 32-bit) column indices: y = x @ W.T + bias on CPU.
//
// W is stored row-major as CSR: fp32, bf16 or int8 values (int8: with float32 scales per
// row, or per row and group of inputs), uint16 column indices (int32 when a layer is wider than 65535) and int32 row
// pointers, i.e. 6 (bf16: 4, int8: 3) bytes per nonzero instead of torch CSR's 8. Products
// and sums are fp32; x is fp32 or bf16, y in x's dtype. The arithmetic is csr16_core.h,
// compiled per instruction set.

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

#include "common.h"

namespace {

// y = x @ W.T (+ bias) for x of shape (..., in_features) (fp32 or bf16; y in its dtype);
// W in CSR with fp32/bf16/int8 values (int8: times scales[r], or scales[r, g] per group g of
// in_features / groups inputs) and int16/int32 column indices (each below in_features and
// rising within a row: checked where the format is built).
at::Tensor csr_linear(const at::Tensor& values, const at::Tensor& col_indices,
                      const at::Tensor& rowptr, const at::Tensor& x_in,
                      const std::optional<at::Tensor>& bias, int64_t in_features,
                      int64_t threads, const std::optional<at::Tensor>& scales) {
  sparsekit::check_input_or_bf16(x_in, in_features);
  sparsekit::check_values(values, 1);
  sparsekit::check_index(col_indices, "col_indices", 1);
  sparsekit::check_size(col_indices, "col_indices", 0, values.numel());
  TORCH_CHECK(rowptr.dim() == 1 && rowptr.numel() >= 1, "rowptr must be 1-D with rows + 1 >= 1 "
              "entries, got shape ", rowptr.sizes());
  const int64_t rows = rowptr.size(0) - 1;
  sparsekit::check_rowptr(rowptr, "rowptr", rows, values.numel());
  const auto groups = sparsekit::group_scales(scales, values, rows, in_features);
  return sparsekit::scaled_linear(
      x_in, values, scales, bias, rows, threads, [&](const sparsekit::Linear& io) {
        sparsekit::cores().csr_linear(sparsekit::CsrArgs{
            io, sparsekit::value_type(values), values.data_ptr(), col_indices.data_ptr(),
            col_indices.scalar_type() == at::kShort, rowptr.data_ptr<int32_t>(), groups.data,
            groups.size});
      },
      groups.data != nullptr);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekit, CPU, m) { m.impl("csr_linear", &csr_linear); }
