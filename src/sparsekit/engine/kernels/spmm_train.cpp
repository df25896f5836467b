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
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "common.h"

namespace {

constexpr int64_t kTile = 64;  // batch entries accumulated in registers per row pass

// y[i, b0:b0+kTile] for one row, accumulated in vector registers over all its nonzeros.
template <typename T>
inline void row_tile(const int32_t* col, const T* v, const int64_t* perm, int32_t k0, int32_t k1,
                     const T* x, int64_t batch, int64_t b0, T b, T* y) {
  typedef T vec __attribute__((vector_size(64)));
  constexpr int64_t L = 64 / sizeof(T), V = kTile / L;
  vec acc[V];
  for (int64_t j = 0; j < V; ++j) acc[j] = vec{} + b;
  for (int32_t k = k0; k < k1; ++k) {
    const T w = perm ? v[perm[k]] : v[k];
    const T* xj = x + static_cast<int64_t>(col[k]) * batch + b0;
    for (int64_t j = 0; j < V; ++j) {
      vec xv;
      __builtin_memcpy(&xv, xj + j * L, sizeof(vec));
      acc[j] += w * xv;
    }
  }
  for (int64_t j = 0; j < V; ++j) __builtin_memcpy(y + b0 + j * L, &acc[j], sizeof(vec));
}

// The same for a remainder of n < kTile batch entries, through memory.
template <typename T>
inline void row_rest(const int32_t* col, const T* v, const int64_t* perm, int32_t k0, int32_t k1,
                     const T* x, int64_t batch, int64_t b0, int64_t n, T b, T* __restrict__ y) {
  T* __restrict__ yi = y + b0;
  for (int64_t j = 0; j < n; ++j) yi[j] = b;
  for (int32_t k = k0; k < k1; ++k) {
    const T w = perm ? v[perm[k]] : v[k];
    const T* __restrict__ xj = x + static_cast<int64_t>(col[k]) * batch + b0;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) yi[j] += w * xj[j];
  }
}

template <typename T>
void spmm_rows_impl(const int32_t* rowptr, const int32_t* col, const T* v, const int64_t* perm,
                    const T* x, const T* bias, T* y, int64_t rows, int64_t batch, int threads) {
#pragma omp parallel for schedule(dynamic, 16) num_threads(threads)
  for (int64_t i = 0; i < rows; ++i) {
    const T b = bias ? bias[i] : T(0);
    T* yi = y + i * batch;
    int64_t b0 = 0;
    for (; b0 + kTile <= batch; b0 += kTile) {
      row_tile<T>(col, v, perm, rowptr[i], rowptr[i + 1], x, batch, b0, b, yi);
    }
    if (b0 < batch) {
      row_rest<T>(col, v, perm, rowptr[i], rowptr[i + 1], x, batch, b0, batch - b0, b, yi);
    }
  }
}

template <typename T>
void sddmm_impl(const int32_t* rowptr, const int32_t* col, const T* a, const T* bm, T* out,
                int64_t rows, int64_t batch, int threads) {
  typedef T vec __attribute__((vector_size(64)));
  constexpr int64_t L = 64 / sizeof(T);
#pragma omp parallel for schedule(dynamic, 16) num_threads(threads)
  for (int64_t i = 0; i < rows; ++i) {
    const T* ai = a + i * batch;  // stays in L1 across the row's nonzeros
    const int32_t k1 = rowptr[i + 1];
    int32_t k = rowptr[i];
    for (; k + 4 <= k1; k += 4) {  // four nonzeros share each load of a[i]
      const T* b0 = bm + static_cast<int64_t>(col[k]) * batch;
      const T* b1 = bm + static_cast<int64_t>(col[k + 1]) * batch;
      const T* b2 = bm + static_cast<int64_t>(col[k + 2]) * batch;
      const T* b3 = bm + static_cast<int64_t>(col[k + 3]) * batch;
      vec s0{}, s1{}, s2{}, s3{};
      int64_t b = 0;
      for (; b + L <= batch; b += L) {
        vec x, y0, y1, y2, y3;
        __builtin_memcpy(&x, ai + b, sizeof(vec));
        __builtin_memcpy(&y0, b0 + b, sizeof(vec));
        __builtin_memcpy(&y1, b1 + b, sizeof(vec));
        __builtin_memcpy(&y2, b2 + b, sizeof(vec));
        __builtin_memcpy(&y3, b3 + b, sizeof(vec));
        s0 += x * y0;
        s1 += x * y1;
        s2 += x * y2;
        s3 += x * y3;
      }
      T r0 = 0, r1 = 0, r2 = 0, r3 = 0;
      for (int64_t j = 0; j < L; ++j) {
        r0 += s0[j];
        r1 += s1[j];
        r2 += s2[j];
        r3 += s3[j];
      }
      for (; b < batch; ++b) {
        r0 += ai[b] * b0[b];
        r1 += ai[b] * b1[b];
        r2 += ai[b] * b2[b];
        r3 += ai[b] * b3[b];
      }
      out[k] = r0;
      out[k + 1] = r1;
      out[k + 2] = r2;
      out[k + 3] = r3;
    }
    for (; k < k1; ++k) {
      const T* bj = bm + static_cast<int64_t>(col[k]) * batch;
      T r = 0;
#pragma omp simd reduction(+ : r)
      for (int64_t b = 0; b < batch; ++b) r += ai[b] * bj[b];
      out[k] = r;
    }
  }
}

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
  AT_DISPATCH_FLOATING_TYPES(xt.scalar_type(), "spmm_rows", [&] {
    spmm_rows_impl<scalar_t>(rowptr.data_ptr<int32_t>(), col.data_ptr<int32_t>(),
                             values.data_ptr<scalar_t>(), pp, xt.data_ptr<scalar_t>(),
                             has_bias ? bias->data_ptr<scalar_t>() : nullptr,
                             y.data_ptr<scalar_t>(), rows, batch, T);
  });
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
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "sddmm", [&] {
    sddmm_impl<scalar_t>(rowptr.data_ptr<int32_t>(), col.data_ptr<int32_t>(),
                         a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                         a.size(0), a.size(1), T);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekit, CPU, m) {
  m.impl("spmm_rows", &spmm_rows);
  m.impl("sddmm", &sddmm);
}
