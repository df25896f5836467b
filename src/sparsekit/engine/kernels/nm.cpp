// Packed N:M kernels for y = x @ W.T + bias on CPU.
//
// Per row ceil(cols / M) groups of N fp32, bf16 or int8 values (zero-padded; int8 with a
// float32 scale per row) and one log2(M)-bit
// field per value (M=8 uses 4 bits) giving its input within the group; the fields of every
// 16 values fill one (M=4) or two (M=8) 32-bit words. The GEMV/SpMM drivers are shared with
// the bitmap rows (decoded_rows.h).

#include <torch/library.h>

#include <utility>

#include "decoded_rows.h"  // tensors, checks, AVX-512 intrinsics and the drivers

namespace {

using namespace sparsekit::rows;

// A packed N:M weight: `width` values of type T (float, bf16 or int8) per row, fields packed 16
// values per 32 * fbits / 2 bits.
template <typename T>
struct PackedNM {
  const T* v;
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
    const T* p = v + r * width;
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
      a0 = _mm512_fmadd_ps(sparsekit::load16_masked(valid, p + k), xv, a0);
      std::swap(a0, a1);  // two independent sums hide the FMA latency
    }
    acc = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#endif
    for (; k < width; ++k) acc += static_cast<float>(p[k]) * x[col(q, k)];
    return acc;
  }

  // Columns of row r's values into c (room for cols + 32); returns its packed values.
  const T* decode(int64_t r, int32_t* c, int64_t* count) const {
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

// y = x @ W.T (+ bias); W as packed N:M fp32/bf16/int8 values (rows, ceil(in_features / M)
// * N) and int32 fields (rows, words), each naming an input below in_features (checked where
// the format is built); int8 values times scales[r]; x fp32 or bf16, y in its dtype.
at::Tensor nm_linear(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& x,
                     const std::optional<at::Tensor>& bias, int64_t n, int64_t m,
                     int64_t in_features, int64_t threads,
                     const std::optional<at::Tensor>& scales) {
  sparsekit::check_input_or_bf16(x, in_features);
  TORCH_CHECK((m == 4 || m == 8) && n > 0 && n < m && 16 % n == 0, "unsupported N:M ", n, ":", m);
  sparsekit::check_values(values, 2);
  sparsekit::check_tensor(indices, "indices", 2, at::kInt);
  const int64_t fbits = m == 4 ? 2 : 4, width = (in_features + m - 1) / m * n;
  sparsekit::check_size(values, "values", 1, width);
  sparsekit::check_size(indices, "indices", 0, values.size(0));
  sparsekit::check_size(indices, "indices", 1, (width + 15) / 16 * fbits / 2);
  return sparsekit::with_values(values, [&](auto value) {
    using T = decltype(value);
    const PackedNM<T> w{reinterpret_cast<const T*>(values.data_ptr()),
                        reinterpret_cast<const uint32_t*>(indices.data_ptr()), values.size(0),
                        in_features, n, m, fbits, width, indices.size(1)};
    return run(w, values, x, bias, scales, threads);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekit, CPU, m) { m.impl("nm_linear", &nm_linear); }
