// CSR kernels with 16-bit (or 32-bit) column indices for y = x @ W.T + bias on CPU.
//
// W is stored row-major as CSR: fp32, bf16 or int8 values (int8: with float32 scales per
// row), uint16 column indices (int32 when a layer is wider than 65535) and int32 row
// pointers, i.e. 6 (bf16: 4, int8: 3) bytes per nonzero instead of torch CSR's 8. Products
// and sums are fp32; x is fp32 or bf16, y in x's dtype.
// Batch 1 (up to 3) is a gather-based GEMV per input; larger batches transpose x once into a
// padded per-thread workspace (reused across calls) and stream each row of W once per chunk
// of 64/128 inputs.
// Rows are split across OpenMP threads so that each thread gets a similar share of
// nonzeros + rows.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "common.h"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kGemvMaxBatch = 3;  // batches up to this size run one GEMV per row of x
constexpr int64_t kPrefetch = 512;  // nonzeros (2 KiB of values) prefetched ahead in GEMV
typedef float vec16 __attribute__((vector_size(64)));  // batched-kernel vectors
typedef float vec8 __attribute__((vector_size(32)));

using sparsekit::bf16;
using sparsekit::thread_rows;

#if defined(__AVX512F__)
inline __m512i load_idx(const uint16_t* p) {
  return _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512i load_idx(const int32_t* p) { return _mm512_loadu_si512(p); }
#if defined(__AVX512BW__) && defined(__AVX512VL__)
inline __m512i load_idx_masked(const uint16_t* p, __mmask16 m) {
  return _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
}
#endif
inline __m512i load_idx_masked(const int32_t* p, __mmask16 m) {
  return _mm512_maskz_loadu_epi32(m, p);
}
#elif defined(__AVX2__)
inline __m256i load_idx(const uint16_t* p) {
  return _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256i load_idx(const int32_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}
#endif

// Sum of v[k] * x[c[k]] over one row of n nonzeros (values of type Value: float, bf16 or
// int8).
template <typename Value, typename I>
inline float row_dot(const Value* v, const I* c, int64_t n, const float* x) {
  using namespace sparsekit;
  int64_t k = 0;
  float tail = 0.f;
#if defined(__AVX512F__)
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  for (; k + 32 <= n; k += 32) {
    a0 = _mm512_fmadd_ps(load16(v + k), _mm512_i32gather_ps(load_idx(c + k), x, 4), a0);
    a1 = _mm512_fmadd_ps(
        load16(v + k + 16), _mm512_i32gather_ps(load_idx(c + k + 16), x, 4), a1);
  }
  for (; k + 16 <= n; k += 16) {
    a0 = _mm512_fmadd_ps(load16(v + k), _mm512_i32gather_ps(load_idx(c + k), x, 4), a0);
  }
#if defined(__AVX512BW__) && defined(__AVX512VL__)
  if (k < n) {
    __mmask16 m = static_cast<__mmask16>((1u << (n - k)) - 1u);
    __m512 g = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, load_idx_masked(c + k, m), x, 4);
    a1 = _mm512_fmadd_ps(load16_masked(m, v + k), g, a1);
    k = n;
  }
#endif
  tail = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#elif defined(__AVX2__)
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  for (; k + 16 <= n; k += 16) {
    a0 = _mm256_fmadd_ps(load8(v + k), _mm256_i32gather_ps(x, load_idx(c + k), 4), a0);
    a1 = _mm256_fmadd_ps(load8(v + k + 8), _mm256_i32gather_ps(x, load_idx(c + k + 8), 4), a1);
  }
  for (; k + 8 <= n; k += 8) {
    a0 = _mm256_fmadd_ps(load8(v + k), _mm256_i32gather_ps(x, load_idx(c + k), 4), a0);
  }
  alignas(32) float buf[8];
  _mm256_store_ps(buf, _mm256_add_ps(a0, a1));
  for (float b : buf) tail += b;
#endif
  for (; k < n; ++k) tail += static_cast<float>(v[k]) * x[c[k]];
  return tail;
}

template <typename Value, typename I>
void gemv(const Value* v, const I* c, const int32_t* rowptr, int64_t rows, const float* x,
          sparsekit::Output out, float* y, int T) {
#pragma omp parallel num_threads(T)
  {
    int64_t r0, r1;
    thread_rows(rowptr, rows, omp_get_thread_num(), omp_get_num_threads(), &r0, &r1);
    // Software prefetch kPrefetch nonzeros ahead: gathers fill the out-of-order window,
    // so the hardware prefetchers alone leave DRAM bandwidth unused.
    int64_t ahead = rowptr[r0];
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t s = rowptr[r], e = rowptr[r + 1];
      for (const int64_t stop = std::min<int64_t>(e + kPrefetch, rowptr[r1]); ahead < stop;
           ahead += 32) {
        __builtin_prefetch(v + ahead, 0, 3);  // 32 values: 128 (bf16: 64) bytes
        __builtin_prefetch(v + ahead + 16, 0, 3);
        __builtin_prefetch(c + ahead, 0, 3);
      }
      y[r] = out(row_dot(v + s, c + s, e - s, x), r);
    }
  }
}

// One row of W times NV vectors of transposed inputs starting at xt (leading dimension ld).
// U independent accumulator sets hide the FMA latency when NV is small.
template <typename V, int NV, typename Value, typename I>
inline void row_chunk(const Value* v, const I* c, int64_t s, int64_t e, const float* xt,
                      int64_t ld, float* out) {
  constexpr int64_t L = sizeof(V) / sizeof(float);
  constexpr int U = NV >= 6 ? 1 : NV >= 3 ? 2 : 4;
  V acc[U][NV];
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) acc[u][j] = V{};
  int64_t k = s;
  for (; k + U <= e; k += U) {
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
      const float w = static_cast<float>(v[k + u]);
      const float* xr = xt + static_cast<int64_t>(c[k + u]) * ld;
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) {
        V xv;
        __builtin_memcpy(&xv, xr + j * L, sizeof(V));
        acc[u][j] += w * xv;
      }
    }
  }
  for (; k < e; ++k) {
    const float w = static_cast<float>(v[k]);
    const float* xr = xt + static_cast<int64_t>(c[k]) * ld;
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) {
      V xv;
      __builtin_memcpy(&xv, xr + j * L, sizeof(V));
      acc[0][j] += w * xv;
    }
  }
#pragma GCC unroll 4
  for (int u = 1; u < U; ++u)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) acc[0][j] += acc[u][j];
  __builtin_memcpy(out, acc[0], sizeof(acc[0]));
}

template <typename V, typename Value, typename I>
inline void row_chunk_n(int nv, const Value* v, const I* c, int64_t s, int64_t e,
                        const float* xt, int64_t ld, float* out) {
  switch (nv) {
    case 8: row_chunk<V, 8>(v, c, s, e, xt, ld, out); break;
    case 7: row_chunk<V, 7>(v, c, s, e, xt, ld, out); break;
    case 6: row_chunk<V, 6>(v, c, s, e, xt, ld, out); break;
    case 5: row_chunk<V, 5>(v, c, s, e, xt, ld, out); break;
    case 4: row_chunk<V, 4>(v, c, s, e, xt, ld, out); break;
    case 3: row_chunk<V, 3>(v, c, s, e, xt, ld, out); break;
    case 2: row_chunk<V, 2>(v, c, s, e, xt, ld, out); break;
    default: row_chunk<V, 1>(v, c, s, e, xt, ld, out); break;
  }
}

// Y (batch, rows) = X (batch, cols) @ W.T. X is transposed into xt (cols, ld) so that each
// nonzero w[r, c] is one broadcast-FMA over a contiguous row xt[c, :]. Rows are computed in
// tiles of kRowTile so that results are written to Y as contiguous runs, not 4 KiB strides.
template <typename V, typename Value, typename I>
void spmm(const Value* v, const I* c, const int32_t* rowptr, int64_t rows, int64_t cols,
          const float* x, int64_t batch, sparsekit::Output out, float* y, int T) {
  constexpr int64_t L = sizeof(V) / sizeof(float);
  constexpr int kMaxVec = 8;
  constexpr int64_t kChunk = kMaxVec * L;  // batch columns per pass over a row
  constexpr int64_t kRowTile = 16;
  const int64_t ld = (batch + L - 1) / L * L;
  float* xt = sparsekit::workspace(cols * ld);
#pragma omp parallel num_threads(T)
  {
    sparsekit::transpose_into(x, batch, cols, cols, ld, xt);
    int64_t r0, r1;
    thread_rows(rowptr, rows, omp_get_thread_num(), omp_get_num_threads(), &r0, &r1);
    alignas(64) float tile[kRowTile][kChunk];
    for (int64_t t0 = r0; t0 < r1; t0 += kRowTile) {
      const int64_t t1 = std::min(r1, t0 + kRowTile);
      for (int64_t b0 = 0; b0 < ld; b0 += kChunk) {
        const int nv = static_cast<int>(std::min<int64_t>(kMaxVec, (ld - b0) / L));
        for (int64_t r = t0; r < t1; ++r) {
          row_chunk_n<V>(nv, v, c, rowptr[r], rowptr[r + 1], xt + b0, ld, tile[r - t0]);
        }
        const int64_t b1 = std::min<int64_t>(batch, b0 + nv * L);
        for (int64_t b = b0; b < b1; ++b) {
          float* yb = y + b * rows;
          for (int64_t r = t0; r < t1; ++r) {
            yb[r] = out(tile[r - t0][b - b0], r);
          }
        }
      }
    }
  }
}

template <typename Value, typename I>
void dispatch(const at::Tensor& values, const at::Tensor& cols_t, const at::Tensor& rowptr,
              const at::Tensor& x, sparsekit::Output out, at::Tensor& y, int64_t cols, int T) {
  const Value* v = reinterpret_cast<const Value*>(values.data_ptr());
  const I* c = reinterpret_cast<const I*>(cols_t.data_ptr());
  const int64_t rows = rowptr.size(0) - 1, batch = x.size(0);
  if (batch <= kGemvMaxBatch) {  // a few GEMVs beat a half-empty 16-lane SpMM
    for (int64_t b = 0; b < batch; ++b) {
      gemv(v, c, rowptr.data_ptr<int32_t>(), rows, x.data_ptr<float>() + b * cols, out,
           y.data_ptr<float>() + b * rows, T);
    }
  } else {
    // 8 lanes up to batch 8: no idle half
    auto run = batch <= 8 ? spmm<vec8, Value, I> : spmm<vec16, Value, I>;
    run(v, c, rowptr.data_ptr<int32_t>(), rows, cols, x.data_ptr<float>(), batch, out,
        y.data_ptr<float>(), T);
  }
}

// y = x @ W.T (+ bias) for x of shape (batch, in_features) (fp32 or bf16; y in its dtype);
// W in CSR with fp32/bf16/int8 values (int8: times scales[r]) and int16/int32 column indices
// (each below in_features: checked where the format is built).
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
  const sparsekit::Output out{sparsekit::scales_data(scales, values, rows),
                              sparsekit::bias_data(bias, rows)};
  const int T = sparsekit::num_threads(threads);
  const at::Tensor x = sparsekit::as_float32(x_in);
  auto y = at::empty({x.size(0), rows}, x.options());
  if (x.size(0) == 0 || rows == 0) return sparsekit::like_input(y, x_in);
  const bool narrow = col_indices.scalar_type() == at::kShort;
  sparsekit::with_values(values, [&](auto value) {
    using V = decltype(value);
    if (narrow) {
      dispatch<V, uint16_t>(values, col_indices, rowptr, x, out, y, in_features, T);
    } else {
      dispatch<V, int32_t>(values, col_indices, rowptr, x, out, y, in_features, T);
    }
  });
  return sparsekit::like_input(y, x_in);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekit, CPU, m) { m.impl("csr_linear", &csr_linear); }
