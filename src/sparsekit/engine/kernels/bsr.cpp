// Block sparse row (BSR) kernels for y = x @ W.T + bias on CPU.
//
// W is stored as dense R x C blocks: fp32, bf16 or int8 values (nblocks, R, C) (int8: with
// float32 scales per output row, or per row and group of whole blocks of inputs), one uint16 (int32 when there are more than 65536 block
// columns) column index per block and int32 block-row pointers, so the index cost is 2
// bytes per R*C weights. Edge blocks are zero-padded; x is padded to whole blocks in a
// per-thread workspace when in_features is not a multiple of C, and rows past out_features
// are computed but never written. Sums are fp32; x is fp32 or bf16, y in x's dtype.
//   batch 1-3: one GEMV per input; each block row keeps R vector accumulators over C.
//   batch > 3: x is transposed once into a workspace (cols, ld) and each block row is
//              streamed once per chunk of up to 64 inputs (AVX-512; 16 on AVX2), 4 rows of
//              W at a time sharing every load of x (a register-tiled micro-kernel per block).
// The arithmetic (bsr_core.h) is compiled per instruction set: its GCC vector extensions
// become AVX-512, AVX2 or baseline instructions. Block rows are split across OpenMP threads so
// that each thread gets a similar number of blocks + block rows.

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

#include "common.h"

namespace {

// y = x @ W.T (+ bias) for x (..., in_features) (fp32 or bf16; y in its dtype) and W
// (out_features, in_features) in BSR (fp32, bf16, or int8 values times scales[row], or
// scales[row, g] per group g of in_features / groups inputs, a multiple of C), each
// block column index below ceil(in_features / C) (checked where the format is built).
at::Tensor bsr_linear(const at::Tensor& values, const at::Tensor& col_indices,
                      const at::Tensor& rowptr, const at::Tensor& x,
                      const std::optional<at::Tensor>& bias, int64_t out_features,
                      int64_t in_features, int64_t threads,
                      const std::optional<at::Tensor>& scales) {
  sparsekit::check_input_or_bf16(x, in_features);
  sparsekit::check_values(values, 3);
  const int64_t R = values.size(1), C = values.size(2);
  TORCH_CHECK(R >= 1 && R <= sparsekit::kBsrMaxBlockRows && C >= 4 && C % 4 == 0,
              "block rows must lie in [1, 64] and block columns be a multiple of 4, got ", R,
              "x", C);
  TORCH_CHECK(out_features >= 0, "out_features must be non-negative, got ", out_features);
  sparsekit::check_index(col_indices, "col_indices", 1);
  sparsekit::check_size(col_indices, "col_indices", 0, values.size(0));
  sparsekit::check_rowptr(rowptr, "rowptr", (out_features + R - 1) / R, values.size(0));
  const auto groups = sparsekit::group_scales(scales, values, out_features, in_features);
  TORCH_CHECK(groups.size % C == 0, "scales of shape ", scales->sizes(), " make groups of ",
              groups.size, " inputs; the BSR kernel takes groups of whole blocks (a multiple "
              "of the block width ", C, ")");
  return sparsekit::scaled_linear(
      x, values, scales, bias, out_features, threads, [&](const sparsekit::Linear& io) {
        sparsekit::cores().bsr_linear(sparsekit::BsrArgs{
            io, sparsekit::value_type(values), values.data_ptr(), col_indices.data_ptr(),
            col_indices.scalar_type() == at::kShort, rowptr.data_ptr<int32_t>(), R, C,
            groups.data, groups.size});
      },
      groups.data != nullptr);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekit, CPU, m) { m.impl("bsr_linear", &bsr_linear); }
