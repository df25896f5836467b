// Bitmap-row and packed N:M kernels for y = x @ W.T + bias on CPU.
//
// Bitmap: per row one bit per input (16-bit words, zero-padded per row), the fp32 values of
// the set bits packed row by row and int32 row pointers into them: 4 bytes per nonzero plus
// 1 bit per weight. With AVX-512 one `vexpandps` puts the values of 16 inputs into their
// lanes, so the GEMV is a dense-like streaming loop over the row.
// Packed N:M: per row ceil(cols / M) groups of N fp32 values (zero-padded) and one
// log2(M)-bit field per value (M=8 uses 4 bits) giving its input within the group; the
// fields of every 16 values fill one (M=4) or two (M=8) 32-bit words.
// Batch 1 (up to 3) runs one GEMV per input; larger batches transpose x once into a
// per-thread workspace and decode each weight row once into (column, value) pairs that are
// applied to chunks of 64/128 inputs. Rows are split across OpenMP threads by work.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <utility>
#include <vector>

#include "common.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kGemvMaxBatch = 3;  // batches up to this size run one GEMV per row of x
constexpr int64_t kRowTile = 16;      // rows whose outputs are written back together
typedef float vec16 __attribute__((vector_size(64)));
typedef float vec8 __attribute__((vector_size(32)));

#if defined(__AVX512F__)
inline __m512i lanes() {
  return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}
#endif

// A bitmap-row weight. x passed to dot() is zero-padded to at least words * 16 inputs.
struct Bitmap {
  const float* v;
  const uint16_t* bits;
  const int32_t* rowptr;
  int64_t rows, cols, words;

  int64_t work(int64_t r) const { return rowptr[r] + r * words; }

  float dot(int64_t r, const float* x) const {
    const float* p = v + rowptr[r];
    const uint16_t* b = bits + r * words;
    int64_t k = 0;
    float acc = 0.f;
#if defined(__AVX512F__)
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (; k + 2 <= words; k += 2) {
      const __mmask16 m0 = b[k], m1 = b[k + 1];
      a0 = _mm512_fmadd_ps(_mm512_maskz_expandloadu_ps(m0, p), _mm512_loadu_ps(x + 16 * k), a0);
      p += __builtin_popcount(m0);
      a1 = _mm512_fmadd_ps(_mm512_maskz_expandloadu_ps(m1, p),
                           _mm512_loadu_ps(x + 16 * k + 16), a1);
      p += __builtin_popcount(m1);
    }
    if (k < words) {
      a0 = _mm512_fmadd_ps(_mm512_maskz_expandloadu_ps(b[k], p), _mm512_loadu_ps(x + 16 * k), a0);
      k = words;
    }
    acc = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#endif
    for (; k < words; ++k) {
      for (unsigned m = b[k]; m; m &= m - 1) acc += *p++ * x[16 * k + __builtin_ctz(m)];
    }
    return acc;
  }

  // Columns of row r's nonzeros into c (room for cols + 32); returns the packed values.
  const float* decode(int64_t r, int32_t* c, int64_t* count) const {
    const uint16_t* b = bits + r * words;
    int64_t n = 0;
    for (int64_t k = 0; k < words; ++k) {
#if defined(__AVX512F__)
      const __m512i col = _mm512_add_epi32(lanes(), _mm512_set1_epi32(static_cast<int>(16 * k)));
      _mm512_storeu_si512(c + n, _mm512_maskz_compress_epi32(b[k], col));
      n += __builtin_popcount(b[k]);
#else
      for (unsigned m = b[k]; m; m &= m - 1) {
        c[n++] = static_cast<int32_t>(16 * k + __builtin_ctz(m));
      }
#endif
    }
    *count = n;
    return v + rowptr[r];
  }
};

// A packed N:M weight: `width` values per row, fields packed 16 values per 32 * fbits / 2 bits.
struct PackedNM {
  const float* v;
  const uint32_t* idx;
  int64_t rows, cols, n, m, fbits, width, words;

  int64_t work(int64_t r) const { return r * width; }

  int64_t col(const uint32_t* q, int64_t k) const {
    const int64_t bit = k * fbits;
    return k / n * m + ((q[bit / 32] >> (bit % 32)) & (m - 1));
  }

#if defined(__AVX512F__)
  // Inputs of values k..k+15 relative to input k / n * m (0 .. 16 / n * m - 1).
  struct Fields {
    __m512i sel, shift, field, base;
    __mmask16 words16;
    explicit Fields(const PackedNM& w) {
      const __m512i bitpos =
          _mm512_mullo_epi32(lanes(), _mm512_set1_epi32(static_cast<int>(w.fbits)));
      sel = _mm512_srli_epi32(bitpos, 5);  // which 32-bit word holds a lane's field
      shift = _mm512_and_si512(bitpos, _mm512_set1_epi32(31));
      field = _mm512_set1_epi32(static_cast<int>(w.m - 1));
      base = _mm512_sllv_epi32(_mm512_srlv_epi32(lanes(), _mm512_set1_epi32(__builtin_ctzll(w.n))),
                               _mm512_set1_epi32(__builtin_ctzll(w.m)));  // lane / n * m
      words16 = w.fbits == 2 ? 0x1 : 0x3;  // words of fields per 16 values
    }
    __m512i at(const uint32_t* q) const {  // q: the fields of the 16 values
      const __m512i f = _mm512_maskz_loadu_epi32(words16, q);
      const __m512i shifted = _mm512_srlv_epi32(_mm512_permutexvar_epi32(sel, f), shift);
      return _mm512_add_epi32(base, _mm512_and_si512(shifted, field));
    }
  };
#endif

  // x is zero-padded by at least 64 inputs beyond the last group.
  float dot(int64_t r, const float* x) const {
    const float* p = v + r * width;
    const uint32_t* q = idx + r * words;
    int64_t k = 0;
    float acc = 0.f;
#if defined(__AVX512F__)
    const Fields fields(*this);
    const int64_t span = 16 / n * m, step = fbits / 2;  // inputs and field words per 16 values
    const bool wide = span > 32;  // 16 values span 64 inputs: two permutes and a blend
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    const float* xs = x;
    const uint32_t* qs = q;
    for (; k < width; k += 16, xs += span, qs += step) {
      const __mmask16 valid = width - k >= 16 ? 0xFFFF : (1u << (width - k)) - 1u;
      const __m512i c = fields.at(qs);
      __m512 xv = _mm512_permutex2var_ps(_mm512_loadu_ps(xs), c, _mm512_loadu_ps(xs + 16));
      if (wide) {
        const __m512 hi =
            _mm512_permutex2var_ps(_mm512_loadu_ps(xs + 32), c, _mm512_loadu_ps(xs + 48));
        xv = _mm512_mask_mov_ps(xv, _mm512_test_epi32_mask(c, _mm512_set1_epi32(32)), hi);
      }
      a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(valid, p + k), xv, a0);
      std::swap(a0, a1);  // two independent sums hide the FMA latency
    }
    acc = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#endif
    for (; k < width; ++k) acc += p[k] * x[col(q, k)];
    return acc;
  }

  // Columns of row r's values into c (room for cols + 32); returns its packed values.
  const float* decode(int64_t r, int32_t* c, int64_t* count) const {
    const uint32_t* q = idx + r * words;
    int64_t k = 0;
#if defined(__AVX512F__)
    const Fields fields(*this);
    const int64_t span = 16 / n * m, step = fbits / 2;
    for (int64_t first = 0; k < width; k += 16, first += span) {
      const __m512i c0 = _mm512_set1_epi32(static_cast<int>(first));
      _mm512_storeu_si512(c + k, _mm512_add_epi32(c0, fields.at(q + k / 16 * step)));
    }
#endif
    for (; k < width; ++k) c[k] = static_cast<int32_t>(col(q, k));
    *count = width;
    return v + r * width;
  }
};

// Rows [r0, r1) of thread t: a 1/T share of the work.
template <typename W>
void thread_rows(const W& w, int t, int T, int64_t* r0, int64_t* r1) {
  sparsekit::thread_rows_by([&w](int64_t i) { return w.work(i); }, w.rows, t, T, r0, r1);
}

template <typename W>
void gemv(const W& w, const float* x, const float* bias, float* y, int T) {
  thread_local std::vector<float> xpad;  // x zero-padded: whole vectors never read past it
  const int64_t padded = (w.cols + 63) / 64 * 64 + 128;
  xpad.assign(padded, 0.f);
  std::memcpy(xpad.data(), x, w.cols * sizeof(float));
  const float* xp = xpad.data();
#pragma omp parallel num_threads(T)
  {
    int64_t r0, r1;
    thread_rows(w, omp_get_thread_num(), omp_get_num_threads(), &r0, &r1);
    for (int64_t r = r0; r < r1; ++r) {
      const float acc = w.dot(r, xp);
      y[r] = bias ? acc + bias[r] : acc;
    }
  }
}

// out[0:NV*L] = sum_k w[k] * xt[c[k], 0:NV*L] for one decoded row (xt leading dimension ld).
template <typename V, int NV>
inline void row_chunk(const int32_t* c, const float* w, int64_t count, const float* xt,
                      int64_t ld, float* out) {
  constexpr int64_t L = sizeof(V) / sizeof(float);
  constexpr int U = NV >= 6 ? 1 : NV >= 3 ? 2 : 4;  // independent sums hide FMA latency
  V acc[U][NV];
  for (int u = 0; u < U; ++u)
    for (int j = 0; j < NV; ++j) acc[u][j] = V{};
  int64_t k = 0;
  for (; k + U <= count; k += U) {
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
      const float* xr = xt + static_cast<int64_t>(c[k + u]) * ld;
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) {
        V xv;
        __builtin_memcpy(&xv, xr + j * L, sizeof(V));
        acc[u][j] += w[k + u] * xv;
      }
    }
  }
  for (; k < count; ++k) {
    const float* xr = xt + static_cast<int64_t>(c[k]) * ld;
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) {
      V xv;
      __builtin_memcpy(&xv, xr + j * L, sizeof(V));
      acc[0][j] += w[k] * xv;
    }
  }
  for (int u = 1; u < U; ++u)
    for (int j = 0; j < NV; ++j) acc[0][j] += acc[u][j];
  __builtin_memcpy(out, acc[0], sizeof(acc[0]));
}

template <typename V>
inline void row_chunk_n(int nv, const int32_t* c, const float* w, int64_t count,
                        const float* xt, int64_t ld, float* out) {
  switch (nv) {
    case 8: row_chunk<V, 8>(c, w, count, xt, ld, out); break;
    case 7: row_chunk<V, 7>(c, w, count, xt, ld, out); break;
    case 6: row_chunk<V, 6>(c, w, count, xt, ld, out); break;
    case 5: row_chunk<V, 5>(c, w, count, xt, ld, out); break;
    case 4: row_chunk<V, 4>(c, w, count, xt, ld, out); break;
    case 3: row_chunk<V, 3>(c, w, count, xt, ld, out); break;
    case 2: row_chunk<V, 2>(c, w, count, xt, ld, out); break;
    default: row_chunk<V, 1>(c, w, count, xt, ld, out); break;
  }
}

// Y (batch, rows) = X (batch, cols) @ W.T via xt = X.T (cols, ld): each decoded nonzero is
// one broadcast-FMA over a contiguous row of xt. Outputs of kRowTile rows are buffered so
// that Y is written in contiguous runs.
template <typename V, typename W>
void spmm(const W& w, const float* x, int64_t batch, const float* bias, float* y, int T) {
  constexpr int64_t L = sizeof(V) / sizeof(float);
  constexpr int kMaxVec = 8;
  constexpr int64_t kChunk = kMaxVec * L;  // batch columns per pass over a decoded row
  const int64_t cols = w.cols, ld = (batch + L - 1) / L * L;
  thread_local std::vector<float> workspace;  // grows only: no large allocation per call
  if (workspace.size() < static_cast<size_t>(cols * ld)) workspace.resize(cols * ld);
  float* xt = workspace.data();
#pragma omp parallel num_threads(T)
  {
#pragma omp for schedule(static)
    for (int64_t i0 = 0; i0 < cols; i0 += kRowTile) {  // blocked transpose
      const int64_t i1 = std::min(cols, i0 + kRowTile);
      for (int64_t b = 0; b < ld; ++b) {
        for (int64_t i = i0; i < i1; ++i) xt[i * ld + b] = b < batch ? x[b * cols + i] : 0.f;
      }
    }  // implicit barrier: xt is complete
    int64_t r0, r1;
    thread_rows(w, omp_get_thread_num(), omp_get_num_threads(), &r0, &r1);
    std::vector<int32_t> c(cols + 32);  // N:M rows may name a few padded inputs
    std::vector<float> tile(kRowTile * ld);
    for (int64_t t0 = r0; t0 < r1; t0 += kRowTile) {
      const int64_t t1 = std::min(r1, t0 + kRowTile);
      for (int64_t r = t0; r < t1; ++r) {
        int64_t count;
        const float* v = w.decode(r, c.data(), &count);
        for (int64_t b0 = 0; b0 < ld; b0 += kChunk) {
          const int nv = static_cast<int>(std::min<int64_t>(kMaxVec, (ld - b0) / L));
          row_chunk_n<V>(nv, c.data(), v, count, xt + b0, ld, &tile[(r - t0) * ld + b0]);
        }
      }
      for (int64_t b = 0; b < batch; ++b) {
        float* yb = y + b * w.rows;
        for (int64_t r = t0; r < t1; ++r) yb[r] = tile[(r - t0) * ld + b] + (bias ? bias[r] : 0.f);
      }
    }
  }
}

template <typename W>
at::Tensor run(const W& w, const at::Tensor& x, const std::optional<at::Tensor>& bias,
               int64_t threads) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 &&
                  x.is_contiguous() && x.size(1) == w.cols,
              "x must be a contiguous 2-D float32 CPU tensor with ", w.cols, " columns");
  const float* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() &&
                    bias->numel() == w.rows, "bias must be contiguous float32 of length rows");
    b = bias->data_ptr<float>();
  }
  const int T = static_cast<int>(std::max<int64_t>(1, threads));
  const int64_t batch = x.size(0);
  at::Tensor y = at::empty({batch, w.rows}, x.options());
  if (batch == 0 || w.rows == 0) return y;
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (batch <= kGemvMaxBatch) {
    for (int64_t i = 0; i < batch; ++i) gemv(w, xp + i * w.cols, b, yp + i * w.rows, T);
  } else if (batch <= 8) {
    spmm<vec8>(w, xp, batch, b, yp, T);  // 8 lanes: no idle half
  } else {
    spmm<vec16>(w, xp, batch, b, yp, T);
  }
  return y;
}

void check_values(const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous(),
              "values must be contiguous float32");
}

// y = x @ W.T (+ bias); W as (values, int16 bitmap (rows, words), int32 row pointers).
at::Tensor bitmap_linear(const at::Tensor& values, const at::Tensor& bitmap,
                         const at::Tensor& rowptr, const at::Tensor& x,
                         const std::optional<at::Tensor>& bias, int64_t threads) {
  check_values(values);
  TORCH_CHECK(bitmap.scalar_type() == at::kShort && bitmap.is_contiguous() && bitmap.dim() == 2,
              "bitmap must be contiguous 2-D int16");
  TORCH_CHECK(rowptr.scalar_type() == at::kInt && rowptr.is_contiguous() &&
                  rowptr.numel() == bitmap.size(0) + 1, "rowptr must be int32 of length rows + 1");
  TORCH_CHECK(x.dim() == 2 && (x.size(1) + 15) / 16 == bitmap.size(1),
              "x must have 16 * words - 15 .. 16 * words columns");
  const Bitmap w{values.data_ptr<float>(), reinterpret_cast<const uint16_t*>(bitmap.data_ptr()),
                 rowptr.data_ptr<int32_t>(), bitmap.size(0), x.size(1), bitmap.size(1)};
  return run(w, x, bias, threads);
}

// y = x @ W.T (+ bias); W as packed N:M values (rows, width) and int32 fields (rows, words).
at::Tensor nm_linear(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& x,
                     const std::optional<at::Tensor>& bias, int64_t n, int64_t m,
                     int64_t threads) {
  check_values(values);
  TORCH_CHECK((m == 4 || m == 8) && n > 0 && n < m && 16 % n == 0, "unsupported N:M ", n, ":", m);
  TORCH_CHECK(indices.scalar_type() == at::kInt && indices.is_contiguous() && indices.dim() == 2 &&
                  values.dim() == 2 && indices.size(0) == values.size(0),
              "indices must be contiguous 2-D int32 with one row per values row");
  const int64_t fbits = m == 4 ? 2 : 4, width = values.size(1);
  TORCH_CHECK(x.dim() == 2 && (x.size(1) + m - 1) / m * n == width,
              "values must hold ceil(cols / M) * N entries per row");
  TORCH_CHECK(indices.size(1) == (width + 15) / 16 * fbits / 2, "indices have the wrong width");
  const PackedNM w{values.data_ptr<float>(), reinterpret_cast<const uint32_t*>(indices.data_ptr()),
                   values.size(0), x.size(1), n, m, fbits, width, indices.size(1)};
  return run(w, x, bias, threads);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparsekit, m) {
  m.def("bitmap_linear(Tensor values, Tensor bitmap, Tensor rowptr, Tensor x, Tensor? bias, "
        "int threads) -> Tensor", &bitmap_linear);
  m.def("nm_linear(Tensor values, Tensor indices, Tensor x, Tensor? bias, int n, int m, "
        "int threads) -> Tensor", &nm_linear);
}
