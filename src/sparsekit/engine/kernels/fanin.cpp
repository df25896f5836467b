// Constant fan-in kernels for y = x @ W.T + bias on CPU.
//
// Every stored row of W has the same number k of nonzeros (SRigL-style masks), so W is two
// dense (active_rows, k) matrices: fp32 values and uint16 column indices (int32 when a layer
// is wider than 65536), plus the int32 output row of each stored row. Rows without nonzeros
// (ablated neurons) are not stored: they cost one write of the bias, not k reads. No row
// pointers are needed and the work per row is constant, so rows split evenly over threads.
//   batch 1-3: one GEMV per input, a gather dot product per row (AVX-512 gathers with a
//              masked tail; a scalar loop elsewhere), prefetching the next rows.
//   batch > 3: x is transposed once into a workspace (cols, ld) and each row is streamed
//              once per chunk of up to 64 inputs: one broadcast-FMA per nonzero and vector.

#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "common.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kGemvMaxBatch = 3;
constexpr int64_t kRowTile = 16;  // rows per batched tile
typedef float vec16 __attribute__((vector_size(64)));

struct FanIn {
  const float* v;
  const int32_t* rows;  // output row of each stored row
  int64_t n, k, out_rows;
};

#if defined(__AVX512F__)
inline __m512i load_idx(const uint16_t* p, __mmask16 m) {
  return _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
}
inline __m512i load_idx(const int32_t* p, __mmask16 m) { return _mm512_maskz_loadu_epi32(m, p); }
#endif

// Sum of v[j] * x[c[j]] over the k nonzeros of one row.
template <typename I>
inline float row_dot(const float* v, const I* c, int64_t k, const float* x) {
  int64_t j = 0;
  float s = 0.f;
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  for (; j + 32 <= k; j += 32) {
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(v + j),
                         _mm512_i32gather_ps(load_idx(c + j, 0xFFFF), x, 4), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(v + j + 16),
                         _mm512_i32gather_ps(load_idx(c + j + 16, 0xFFFF), x, 4), a1);
  }
  for (; j < k; j += 16) {
    const __mmask16 m = k - j >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (k - j)) - 1u);
    const __m512 g = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, load_idx(c + j, m), x, 4);
    a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, v + j), g, a0);
  }
  s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#endif
  for (; j < k; ++j) s += v[j] * x[c[j]];
  return s;
}

template <typename I>
void gemv(const FanIn& w, const I* c, const float* x, float* y, int T) {
#pragma omp parallel for num_threads(T) schedule(static)
  for (int64_t r = 0; r < w.n; ++r) {
    const float* vr = w.v + r * w.k;
    const I* cr = c + r * w.k;
    if (r + 2 < w.n) {  // the row after next: the gathers fill the out-of-order window
      for (int64_t j = 0; j < w.k; j += 16) __builtin_prefetch(vr + 2 * w.k + j, 0, 3);
      for (int64_t j = 0; j < w.k; j += 32) __builtin_prefetch(cr + 2 * w.k + j, 0, 3);
    }
    y[w.rows[r]] += row_dot(vr, cr, w.k, x);
  }
}

// One row times NV vectors of transposed inputs at xt (leading dimension ld).
template <int NV, typename I>
inline void row_chunk(const float* v, const I* c, int64_t k, const float* xt, int64_t ld,
                      vec16* out) {
  vec16 acc[2][NV];
  for (int u = 0; u < 2; ++u)
#pragma GCC unroll 4
    for (int n = 0; n < NV; ++n) acc[u][n] = vec16{};
  int64_t j = 0;
  for (; j + 2 <= k; j += 2) {
#pragma GCC unroll 2
    for (int u = 0; u < 2; ++u) {
      const float s = v[j + u];
      const float* xr = xt + static_cast<int64_t>(c[j + u]) * ld;
#pragma GCC unroll 4
      for (int n = 0; n < NV; ++n) {
        vec16 xv;
        __builtin_memcpy(&xv, xr + n * 16, sizeof(xv));
        acc[u][n] += s * xv;
      }
    }
  }
  for (; j < k; ++j) {
    const float* xr = xt + static_cast<int64_t>(c[j]) * ld;
#pragma GCC unroll 4
    for (int n = 0; n < NV; ++n) {
      vec16 xv;
      __builtin_memcpy(&xv, xr + n * 16, sizeof(xv));
      acc[0][n] += v[j] * xv;
    }
  }
  for (int n = 0; n < NV; ++n) out[n] = acc[0][n] + acc[1][n];
}

template <typename I>
void spmm(const FanIn& w, const I* c, int64_t cols, const float* x, int64_t batch, float* y,
          int T) {
  constexpr int64_t L = 16, kChunk = 4 * L;
  const int64_t ld = (batch + L - 1) / L * L;
  float* xt = sparsekit::workspace(cols * ld);
#pragma omp parallel num_threads(T)
  {
    sparsekit::transpose_into(x, batch, cols, cols, ld, xt);
    alignas(64) vec16 tile[kRowTile][4];
#pragma omp for schedule(static)
    for (int64_t t0 = 0; t0 < w.n; t0 += kRowTile) {  // tiles: contiguous runs of y
      const int64_t t1 = std::min(w.n, t0 + kRowTile);
      for (int64_t b0 = 0; b0 < ld; b0 += kChunk) {
        const int nv = static_cast<int>(std::min<int64_t>(4, (ld - b0) / L));
        for (int64_t r = t0; r < t1; ++r) {
          const float* vr = w.v + r * w.k;
          const I* cr = c + r * w.k;
          switch (nv) {
            case 4: row_chunk<4>(vr, cr, w.k, xt + b0, ld, tile[r - t0]); break;
            case 3: row_chunk<3>(vr, cr, w.k, xt + b0, ld, tile[r - t0]); break;
            case 2: row_chunk<2>(vr, cr, w.k, xt + b0, ld, tile[r - t0]); break;
            default: row_chunk<1>(vr, cr, w.k, xt + b0, ld, tile[r - t0]); break;
          }
        }
        for (int64_t b = b0; b < std::min<int64_t>(batch, b0 + nv * L); ++b) {
          float* yb = y + b * w.out_rows;
          for (int64_t r = t0; r < t1; ++r) {
            yb[w.rows[r]] += reinterpret_cast<const float*>(tile[r - t0])[b - b0];
          }
        }
      }
    }
  }
}

template <typename I>
void run(const FanIn& w, const I* c, const at::Tensor& x, at::Tensor& y, int T) {
  const int64_t batch = x.size(0), cols = x.size(1);
  if (batch > kGemvMaxBatch) {
    spmm(w, c, cols, x.data_ptr<float>(), batch, y.data_ptr<float>(), T);
    return;
  }
  for (int64_t b = 0; b < batch; ++b) {
    gemv(w, c, x.data_ptr<float>() + b * cols, y.data_ptr<float>() + b * w.out_rows, T);
  }
}

// y = x @ W.T (+ bias) for x (batch, in_features), W given by its stored rows' values and
// columns (each below in_features) and their distinct output rows (each below out_features;
// both checked where the format is built).
at::Tensor fanin_linear(const at::Tensor& values, const at::Tensor& col_indices,
                        const at::Tensor& rows, const at::Tensor& x,
                        const std::optional<at::Tensor>& bias, int64_t out_features,
                        int64_t in_features, int64_t threads) {
  sparsekit::check_input(x, in_features);
  sparsekit::check_tensor(values, "values", 2, at::kFloat);
  sparsekit::check_index(col_indices, "col_indices", 2);
  TORCH_CHECK(col_indices.sizes() == values.sizes(), "col_indices must have the shape of values ",
              values.sizes(), ", got ", col_indices.sizes());
  sparsekit::check_tensor(rows, "rows", 1, at::kInt);
  sparsekit::check_size(rows, "rows", 0, values.size(0));
  TORCH_CHECK(out_features >= values.size(0), "out_features must be at least the ",
              values.size(0), " stored rows, got ", out_features);
  sparsekit::bias_data(bias, out_features);
  const int T = sparsekit::num_threads(threads);
  auto y = at::zeros({x.size(0), out_features}, x.options());
  if (bias.has_value() && bias->defined()) y.add_(*bias);
  if (x.size(0) == 0 || values.numel() == 0) return y;
  const FanIn w{values.data_ptr<float>(), rows.data_ptr<int32_t>(), values.size(0),
                values.size(1), out_features};
  if (col_indices.scalar_type() == at::kShort) {
    run(w, reinterpret_cast<const uint16_t*>(col_indices.data_ptr()), x, y, T);
  } else {
    run(w, col_indices.data_ptr<int32_t>(), x, y, T);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekit, CPU, m) { m.impl("fanin_linear", &fanin_linear); }
