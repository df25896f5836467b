// Training kernels for SparseLinear: a row-sparse times dense product and a sampled
// dense-dense product, both on "transposed" operands whose rows are batch vectors.
//
// With x^T of shape (cols, batch) every nonzero (i, j, v) of W touches one contiguous
// batch vector, so the inner loops are unit-stride and vectorise:
//   spmm_rows:  y^T[i, :] = bias[i] + sum_k v[perm[k]] * x^T[col[k], :]  (forward, and dX
//               with the transposed structure; perm maps it back to the shared values)
//   sddmm:      out[k] = <a[row[k], :], b[col[k], :]>   (dW at the nonzeros, CSR order)
// Rows (resp. nonzeros) are split over OpenMP threads; no two threads write one output.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

#include "common.h"

namespace {

// A dense operand: a contiguous 2-D float32/float64 CPU tensor.
void check_dense(const at::Tensor& t, const char* name) {
  sparsekit::check_tensor(t, name, 2);
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
              " must be float32 or float64, got ", t.scalar_type());
}

// W's structure: int32 column indices below in_features (checked where the structure is
// built) and row pointers of rows + 1 entries from 0 to their number.
void check_structure(const at::Tensor& rowptr, const at::Tensor& col, int64_t rows) {
  sparsekit::check_tensor(col, "col", 1, at::kInt);
  sparsekit::check_rowptr(rowptr, "rowptr", rows, col.numel());
}

// y^T (rows, batch) for W (rows, in_features) in CSR (rowptr, col) with values v (read
// through perm if given) and xt = x^T (in_features, batch).
at::Tensor spmm_rows(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& values,
                     const std::optional<at::Tensor>& perm, const at::Tensor& xt,
                     const std::optional<at::Tensor>& bias, int64_t in_features,
                     int64_t threads) {
  check_dense(xt, "xt");
  sparsekit::check_size(xt, "xt", 0, in_features);
  TORCH_CHECK(rowptr.dim() == 1 && rowptr.numel() >= 1, "rowptr must be 1-D with rows + 1 >= 1 "
              "entries, got shape ", rowptr.sizes());
  const int64_t rows = rowptr.numel() - 1, batch = xt.size(1);
  check_structure(rowptr, col, rows);
  sparsekit::check_tensor(values, "values", 1, xt.scalar_type());
  sparsekit::check_size(values, "values", 0, col.numel());
  const int64_t* pp = nullptr;
  if (perm.has_value() && perm->defined()) {
    sparsekit::check_tensor(*perm, "perm", 1, at::kLong);
    sparsekit::check_size(*perm, "perm", 0, col.numel());
    pp = perm->data_ptr<int64_t>();
  }
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    sparsekit::check_tensor(*bias, "bias", 1, xt.scalar_type());
    sparsekit::check_size(*bias, "bias", 0, rows);
  }
  const int T = sparsekit::num_threads(threads);
  auto y = at::empty({rows, batch}, xt.options());
  if (rows == 0 || batch == 0) return y;
  sparsekit::cores().spmm_rows(sparsekit::SpmmRowsArgs{
      xt.scalar_type() == at::kDouble, rowptr.data_ptr<int32_t>(), col.data_ptr<int32_t>(),
      values.data_ptr(), pp, xt.data_ptr(), has_bias ? bias->data_ptr() : nullptr, y.data_ptr(),
      rows, batch, T});
  return y;
}

// out[k] = <a[i, :], b[col[k], :]> for every nonzero k of row i of W (a.size(0), in_features)
// in CSR (rowptr, col), with b of in_features rows.
at::Tensor sddmm(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& a,
                 const at::Tensor& b, int64_t in_features, int64_t threads) {
  check_dense(a, "a");
  check_dense(b, "b");
  check_structure(rowptr, col, a.size(0));
  sparsekit::check_size(b, "b", 0, in_features);
  TORCH_CHECK(a.scalar_type() == b.scalar_type() && a.size(1) == b.size(1),
              "a and b must share dtype and batch size, got ", a.scalar_type(), " ", a.sizes(),
              " and ", b.scalar_type(), " ", b.sizes());
  const int T = sparsekit::num_threads(threads);
  auto out = at::empty({col.numel()}, a.options());
  if (col.numel() == 0) return out;
  sparsekit::cores().sddmm(sparsekit::SddmmArgs{
      a.scalar_type() == at::kDouble, rowptr.data_ptr<int32_t>(), col.data_ptr<int32_t>(),
      a.data_ptr(), b.data_ptr(), out.data_ptr(), a.size(0), a.size(1), T});
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekit, CPU, m) {
  m.impl("spmm_rows", &spmm_rows);
  m.impl("sddmm", &sddmm);
}
