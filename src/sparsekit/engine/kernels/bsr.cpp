// Block sparse row (BSR) kernels for y = x @ W.T + bias on CPU.
//
// W is stored as dense R x C blocks: fp32 values (nblocks, R, C), one uint16 (int32 when
// there are more than 65536 block columns) column index per block and int32 block-row
// pointers, so the index cost is 2 bytes per R*C weights. Edge blocks are zero-padded; x
// is padded to whole blocks in a per-thread workspace when in_features is not a multiple
// of C, and rows past out_features are computed but never written.
//   batch 1-3: one GEMV per input; each block row keeps R vector accumulators over C.
//   batch > 3: x is transposed once into a workspace (cols, ld) and each block row is
//              streamed once per chunk of up to 64 inputs (AVX-512; 16 on AVX2), 4 rows of
//              W at a time sharing every load of x (a register-tiled micro-kernel per block).
// The arithmetic (bsr_core.h) is compiled per instruction set: its GCC vector extensions
// become AVX-512, AVX2 or baseline instructions. Block rows are split across OpenMP threads so
// that each thread gets a similar number of blocks + block rows.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

#include "common.h"

namespace {

// y = x @ W.T (+ bias) for x (..., in_features) and W (out_features, in_features) in BSR,
// each block column index below ceil(in_features / C) (checked where the format is built).
at::Tensor bsr_linear(const at::Tensor& values, const at::Tensor& col_indices,
                      const at::Tensor& rowptr, const at::Tensor& x,
                      const std::optional<at::Tensor>& bias, int64_t out_features,
                      int64_t in_features, int64_t threads) {
  sparsekit::check_input(x, in_features);
  sparsekit::check_tensor(values, "values", 3, at::kFloat);
  const int64_t R = values.size(1), C = values.size(2);
  TORCH_CHECK(R >= 1 && R <= sparsekit::kBsrMaxBlockRows && C >= 4 && C % 4 == 0,
              "block rows must lie in [1, 64] and block columns be a multiple of 4, got ", R,
              "x", C);
  TORCH_CHECK(out_features >= 0, "out_features must be non-negative, got ", out_features);
  sparsekit::check_index(col_indices, "col_indices", 1);
  sparsekit::check_size(col_indices, "col_indices", 0, values.size(0));
  sparsekit::check_rowptr(rowptr, "rowptr", (out_features + R - 1) / R, values.size(0));
  const float* b = sparsekit::bias_data(bias, out_features);
  const int T = sparsekit::num_threads(threads);
  auto y = sparsekit::linear_output(x, out_features);
  if (y.numel() == 0) return y;
  sparsekit::cores().bsr_linear(sparsekit::BsrArgs{
      sparsekit::linear_io(x, y, sparsekit::Output{nullptr, b}, T), values.data_ptr<float>(),
      col_indices.data_ptr(), col_indices.scalar_type() == at::kShort,
      rowptr.data_ptr<int32_t>(), R, C});
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekit, CPU, m) { m.impl("bsr_linear", &bsr_linear); }
