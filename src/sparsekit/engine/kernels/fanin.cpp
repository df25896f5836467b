// Constant fan-in kernels for y = x @ W.T + bias on CPU.
//
// Every stored row of W has the same number k of nonzeros (SRigL-style masks), so W is two
// dense (active_rows, k) matrices: fp32, bf16 or int8 values (int8: with float32 scales per
// output row, or per output row and group of inputs) and uint16 column indices (int32 when a
// layer is wider than 65536), plus the int32 output row of each stored row. Rows without
// nonzeros (ablated neurons) are not stored: they cost one write of the bias, not k reads. No row pointers are needed and the
// work per row is constant, so rows split evenly over threads. Sums are fp32; x is fp32 or
// bf16, y in x's dtype.
//   batch 1-3: one GEMV per input, the CSR kernel's dot product per row (x assembled from
//              scalar index loads, 16 or 8 lanes; a scalar loop elsewhere), prefetching the
//              next rows.
//   batch > 3: x is transposed once into a workspace (cols, ld) and each row is streamed
//              once per chunk of up to 4 vectors of inputs (64 on AVX-512, 32 on AVX2): one
//              broadcast-FMA per nonzero and vector.

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

#include "common.h"

namespace {

// y = x @ W.T (+ bias) for x (..., in_features) (fp32 or bf16; y in its dtype), W given by
// its stored rows' values (fp32, bf16, or int8 times scales[output row], or scales[output
// row, g] per group g of in_features / groups inputs) and columns (each below in_features,
// rising within a row) and their distinct output rows (each below out_features; both
// checked where the format is built).
at::Tensor fanin_linear(const at::Tensor& values, const at::Tensor& col_indices,
                        const at::Tensor& rows, const at::Tensor& x,
                        const std::optional<at::Tensor>& bias, int64_t out_features,
                        int64_t in_features, int64_t threads,
                        const std::optional<at::Tensor>& scales) {
  sparsekit::check_input_or_bf16(x, in_features);
  sparsekit::check_values(values, 2);
  sparsekit::check_index(col_indices, "col_indices", 2);
  TORCH_CHECK(col_indices.sizes() == values.sizes(), "col_indices must have the shape of values ",
              values.sizes(), ", got ", col_indices.sizes());
  sparsekit::check_tensor(rows, "rows", 1, at::kInt);
  sparsekit::check_size(rows, "rows", 0, values.size(0));
  TORCH_CHECK(out_features >= values.size(0), "out_features must be at least the ",
              values.size(0), " stored rows, got ", out_features);
  const auto groups = sparsekit::group_scales(scales, values, out_features, in_features);
  return sparsekit::scaled_linear(
      x, values, scales, bias, out_features, threads, [&](const sparsekit::Linear& io) {
        for (int64_t b = 0; b < io.batch; ++b) {  // rows not stored keep their bias
          float* yb = io.y + b * io.rows;
          for (int64_t r = 0; r < io.rows; ++r) yb[r] = io.out.bias ? io.out.bias[r] : 0.f;
        }
        if (values.numel() == 0) return;
        sparsekit::cores().fanin_linear(sparsekit::FanInArgs{
            io, sparsekit::value_type(values), values.data_ptr(), col_indices.data_ptr(),
            col_indices.scalar_type() == at::kShort, rows.data_ptr<int32_t>(), values.size(0),
            values.size(1), groups.data, groups.size});
      },
      groups.data != nullptr);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekit, CPU, m) { m.impl("fanin_linear", &fanin_linear); }
