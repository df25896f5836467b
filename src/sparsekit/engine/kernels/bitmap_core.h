// The bitmap-row kernel core (see bitmap.cpp for the op), compiled once per instruction set
// (cores_impl.h): each row's bits say which inputs its packed values multiply.

namespace sparsekit::SPARSEKIT_ISA::rows {

#if SPARSEKIT_AVX2
// For each byte m of a bitmap: expand[m][i] is the rank of bit i among m's set bits (the
// packed value that lane i takes), pack[m][j] the position of m's j-th set bit. AVX2 has no
// expand/compress instruction; one permute with these indices does the same for 8 lanes.
struct ByteTables {
  int32_t expand[256][8];
  int32_t pack[256][8];
};

constexpr ByteTables make_byte_tables() {
  ByteTables t{};
  for (int m = 0; m < 256; ++m) {
    int n = 0;
    for (int i = 0; i < 8; ++i) {
      t.expand[m][i] = n;
      if ((m >> i) & 1) t.pack[m][n++] = i;
    }
  }
  return t;
}

alignas(32) inline constexpr ByteTables kByteTables = make_byte_tables();

// The popcount(m) values at p in the lanes of m's set bits, the others zero (reads 8 values).
template <typename T>
inline __m256 expand8(unsigned m, const T* p) {
  const __m256i rank =
      _mm256_load_si256(reinterpret_cast<const __m256i*>(kByteTables.expand[m]));
  const __m256 lanes = _mm256_permutevar8x32_ps(load8(p), rank);
  const __m256i bit_to_sign = _mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24);
  const __m256i keep = _mm256_sllv_epi32(_mm256_set1_epi32(static_cast<int>(m)), bit_to_sign);
  return _mm256_blendv_ps(_mm256_setzero_ps(), lanes, _mm256_castsi256_ps(keep));
}
#endif

// A bitmap-row weight with values of type T (float, bf16 or int8). x passed to dot() is
// zero-padded to at least words * 16 inputs.
template <typename T>
struct Bitmap {
  const T* v;
  const uint16_t* bits;
  const int32_t* rowptr;
  int64_t rows, cols, words;

  int64_t work(int64_t r) const { return rowptr[r] + r * words; }

#if SPARSEKIT_AVX2
  // The 8-lane part of dot(): each byte of bits, 8 packed values permuted into their lanes,
  // from word k on while 16 values remain in the array (the last words of the array are
  // left to the scalar loop; p and k are advanced).
  float dot8(const T*& p, const uint16_t* b, int64_t& k, const float* x) const {
    const T* const end = v + rowptr[rows];
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (; k < words && end - p >= 16; ++k) {
      const unsigned lo = b[k] & 0xFFu, hi = b[k] >> 8;
      a0 = _mm256_fmadd_ps(expand8(lo, p), _mm256_loadu_ps(x + 16 * k), a0);
      p += __builtin_popcount(lo);
      a1 = _mm256_fmadd_ps(expand8(hi, p), _mm256_loadu_ps(x + 16 * k + 8), a1);
      p += __builtin_popcount(hi);
    }
    return hsum8(_mm256_add_ps(a0, a1));
  }
#endif

  float dot(int64_t r, const float* x) const {
    const T* p = v + rowptr[r];
    const uint16_t* b = bits + r * words;
    int64_t k = 0;
    float acc = 0.f;
#if SPARSEKIT_AVX512
    if constexpr (std::is_same_v<T, bf16>) {
      // 16 lanes: whole loads expanded in registers while 32 values remain in the array
      // (masked and expand-loads from memory stall the streaming loop on AMD Zen 4/5).
      const T* const end = v + rowptr[rows];
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
      for (; k + 2 <= words && end - p >= 32; k += 2) {
        const __mmask16 m0 = b[k], m1 = b[k + 1];
        a0 = _mm512_fmadd_ps(_mm512_maskz_expand_ps(m0, load16(p)),
                             _mm512_loadu_ps(x + 16 * k), a0);
        p += __builtin_popcount(m0);
        a1 = _mm512_fmadd_ps(_mm512_maskz_expand_ps(m1, load16(p)),
                             _mm512_loadu_ps(x + 16 * k + 16), a1);
        p += __builtin_popcount(m1);
      }
      acc = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    } else {
      // fp32 and int8 values: the 8-lane table expand below ran 1.2-1.9x faster than the
      // 16-lane expand at 11008x4096 on AMD Zen 5 (benchmarks/kernels.py).
      acc = dot8(p, b, k, x);
    }
#elif SPARSEKIT_AVX2
    acc = dot8(p, b, k, x);
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
#elif SPARSEKIT_AVX2
      for (unsigned half = 0; half < 2; ++half) {
        const unsigned m = (b[k] >> (8 * half)) & 0xFFu;
        const __m256i at =
            _mm256_load_si256(reinterpret_cast<const __m256i*>(kByteTables.pack[m]));
        const __m256i first = _mm256_set1_epi32(static_cast<int>(16 * k + 8 * half));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + n), _mm256_add_epi32(at, first));
        n += __builtin_popcount(m);
      }
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
