// The bitmap-row kernel core (see bitmap.cpp for the op), compiled once per instruction set
// (cores_impl.h): each row's bits say which inputs its packed values multiply.

namespace sparsekit::SPARSEKIT_ISA::rows {

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
#if SPARSEKIT_AVX512
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (; k + 2 <= words; k += 2) {
      const __mmask16 m0 = b[k], m1 = b[k + 1];
      a0 = _mm512_fmadd_ps(expand16(m0, p), _mm512_loadu_ps(x + 16 * k), a0);
      p += __builtin_popcount(m0);
      a1 = _mm512_fmadd_ps(expand16(m1, p), _mm512_loadu_ps(x + 16 * k + 16), a1);
      p += __builtin_popcount(m1);
    }
    if (k < words) {
      a0 = _mm512_fmadd_ps(expand16(b[k], p), _mm512_loadu_ps(x + 16 * k), a0);
      k = words;
    }
    acc = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#endif
    for (; k < words; ++k) {
      for (unsigned m = b[k]; m; m &= m - 1) {
        acc += to_float(*p++) * x[16 * k + __builtin_ctz(m)];
      }
    }
    return acc;
  }

  // Columns of row r's nonzeros into c (room for cols + 32); returns the packed values.
  const T* decode(int64_t r, int32_t* c, int64_t* count) const {
    const uint16_t* b = bits + r * words;
    int64_t n = 0;
    for (int64_t k = 0; k < words; ++k) {
#if SPARSEKIT_AVX512
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

}  // namespace sparsekit::SPARSEKIT_ISA::rows

namespace sparsekit::SPARSEKIT_ISA {

void bitmap_linear(const BitmapArgs& a) {
  with_values(a.value, a.values, [&](auto v) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(v)>>;
    rows::run(rows::Bitmap<T>{v, a.bits, a.rowptr, a.io.rows, a.io.cols, a.words}, a.io);
  });
}

}  // namespace sparsekit::SPARSEKIT_ISA
