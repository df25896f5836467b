// The training kernel cores (see spmm_train.cpp for the ops), compiled once per instruction
// set (cores_impl.h): row-sparse times dense, and dense-dense sampled at the nonzeros, in
// float32 or float64.

namespace sparsekit::SPARSEKIT_ISA::train {

// Batch entries accumulated in registers per row pass: 4 (AVX2: 8) float vectors.
constexpr int64_t kTile = kVectorBytes >= 32 ? 64 : 32;

// y[i, b0:b0+kTile] for one row, accumulated in vector registers over all its nonzeros.
template <typename T>
inline void row_tile(const int32_t* col, const T* v, const int64_t* perm, int32_t k0, int32_t k1,
                     const T* x, int64_t batch, int64_t b0, T b, T* y) {
  typedef T vec __attribute__((vector_size(kVectorBytes)));
  constexpr int64_t L = kVectorBytes / sizeof(T), V = kTile / L;
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
  typedef T vec __attribute__((vector_size(kVectorBytes)));
  constexpr int64_t L = kVectorBytes / sizeof(T);
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

}  // namespace sparsekit::SPARSEKIT_ISA::train

namespace sparsekit::SPARSEKIT_ISA {

void spmm_rows(const SpmmRowsArgs& a) {
  auto run = [&](auto zero) {
    using T = decltype(zero);
    train::spmm_rows_impl<T>(a.rowptr, a.col, static_cast<const T*>(a.values), a.perm,
                             static_cast<const T*>(a.xt), static_cast<const T*>(a.bias),
                             static_cast<T*>(a.y), a.rows, a.batch, a.threads);
  };
  if (a.f64) run(double{}); else run(float{});
}

void sddmm(const SddmmArgs& a) {
  auto run = [&](auto zero) {
    using T = decltype(zero);
    train::sddmm_impl<T>(a.rowptr, a.col, static_cast<const T*>(a.a), static_cast<const T*>(a.b),
                         static_cast<T*>(a.out), a.rows, a.batch, a.threads);
  };
  if (a.f64) run(double{}); else run(float{});
}

}  // namespace sparsekit::SPARSEKIT_ISA
