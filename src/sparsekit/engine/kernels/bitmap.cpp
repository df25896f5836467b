// Bitmap-row kernels for y = x @ W.T + bias on CPU.
//
// Per row one bit per input (16-bit words, zero-padded per row), the fp32, bf16 or int8
// values of the set bits packed row by row and int32 row pointers into them: 4 (bf16: 2,
// int8: 1) bytes per nonzero plus 1 bit per weight (int8: plus a float32 scale per row). With AVX-512 one expand puts the values of 16 inputs into
// their lanes, so the GEMV is a dense-like streaming loop over the row. The GEMV/SpMM
// drivers are shared with packed N:M (decoded_rows.h).

#include <torch/library.h>

#include "decoded_rows.h"  // tensors, checks, AVX-512 intrinsics and the drivers

namespace {

using namespace sparsekit::rows;

// A bitmap-row weight with values of type T (float, bf16 or int8). x passed to dot() is
// zero-padded to at least words * 16 inputs.
template <typename T>
struct Bitmap {
  const T* v;
  const uint16_t* bits;
  const int32_t* rowptr;
  int64_t rows, cols, words;

  int64_t work(int64_t r) const { return rowptr[r] + r * words; }

  float dot(int64_t r, const float* x) const {
    const T* p = v + rowptr[r];
    const uint16_t* b = bits + r * words;
    int64_t k = 0;
    float acc = 0.f;
#if defined(__AVX512F__)
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (; k + 2 <= words; k += 2) {
      const __mmask16 m0 = b[k], m1 = b[k + 1];
      a0 = _mm512_fmadd_ps(sparsekit::expand16(m0, p), _mm512_loadu_ps(x + 16 * k), a0);
      p += __builtin_popcount(m0);
      a1 = _mm512_fmadd_ps(sparsekit::expand16(m1, p), _mm512_loadu_ps(x + 16 * k + 16), a1);
      p += __builtin_popcount(m1);
    }
    if (k < words) {
      a0 = _mm512_fmadd_ps(sparsekit::expand16(b[k], p), _mm512_loadu_ps(x + 16 * k), a0);
      k = words;
    }
    acc = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#endif
    for (; k < words; ++k) {
      for (unsigned m = b[k]; m; m &= m - 1) {
        acc += static_cast<float>(*p++) * x[16 * k + __builtin_ctz(m)];
      }
    }
    return acc;
  }

  // Columns of row r's nonzeros into c (room for cols + 32); returns the packed values.
  const T* decode(int64_t r, int32_t* c, int64_t* count) const {
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

// y = x @ W.T (+ bias); W as (fp32/bf16/int8 values, int16 bitmap (rows, ceil(in_features /
// 16)), int32 row pointers), with no bit set at or beyond in_features (checked where the
// format is built); int8 values times scales[r]; x fp32 or bf16, y in its dtype.
at::Tensor bitmap_linear(const at::Tensor& values, const at::Tensor& bitmap,
                         const at::Tensor& rowptr, const at::Tensor& x,
                         const std::optional<at::Tensor>& bias, int64_t in_features,
                         int64_t threads, const std::optional<at::Tensor>& scales) {
  sparsekit::check_input_or_bf16(x, in_features);
  sparsekit::check_values(values, 1);
  sparsekit::check_tensor(bitmap, "bitmap", 2, at::kShort);
  sparsekit::check_size(bitmap, "bitmap", 1, (in_features + 15) / 16);
  sparsekit::check_rowptr(rowptr, "rowptr", bitmap.size(0), values.numel());
  return sparsekit::with_values(values, [&](auto value) {
    using T = decltype(value);
    const Bitmap<T> w{reinterpret_cast<const T*>(values.data_ptr()),
                      reinterpret_cast<const uint16_t*>(bitmap.data_ptr()),
                      rowptr.data_ptr<int32_t>(), bitmap.size(0), in_features, bitmap.size(1)};
    return run(w, values, x, bias, scales, threads);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekit, CPU, m) { m.impl("bitmap_linear", &bitmap_linear); }
