// The bitmap-column GEMV core (see act_bitmap_gemv.cpp for the op), compiled once per
// instruction set (cores_impl.h, after bitmap_core.h, whose word expansions it uses, and
// act_gemv_core.h, whose output helpers it shares): for each output block, every kept input
// column expands its packed values into the block's lanes by its bitmap words and adds
// x_j times them into the block's fp32 sums: no index per value and no scattered store.

namespace sparsekit::SPARSEKIT_ISA::act {

// Elements that a vector expansion may read past a column's last value (a 16-byte shuffle
// or an 8-float load per word, bitmap_core.h): a column within this many elements (plus a
// full block) of the end of `values` takes the bounded scalar loop.
constexpr int64_t kOverread = 16;

// One output block's sums (block floats) += a * the column at p with bitmap words b
// (words of 16 outputs), reading at most `count` values: the bounded path of every ISA, and
// the whole path of the scalar one.
template <typename T>
inline void add_column_bounded(float* __restrict sums, const uint16_t* b, int64_t words,
                               const T* p, int64_t count, float a) {
  const T* const end = p + count;
  for (int64_t k = 0; k < words; ++k) {
    for (unsigned m = b[k]; m && p < end; m &= m - 1) {
      sums[16 * k + __builtin_ctz(m)] += a * to_float(*p++);
    }
  }
}

// The same, unbounded (the column has `words` * 16 + kOverread elements after p): vectors of
// 16 lanes per word, the sums in L1.
template <typename T>
inline void add_column(float* __restrict sums, const uint16_t* b, int64_t words, const T* p,
                       float a) {
#if SPARSEKIT_AVX512
  const __m512 av = _mm512_set1_ps(a);
  for (int64_t k = 0; k < words; ++k) {
    float* s = sums + 16 * k;
    _mm512_storeu_ps(s, _mm512_fmadd_ps(rows::expand16(b[k], p), av, _mm512_loadu_ps(s)));
  }
#elif SPARSEKIT_AVX2
  const __m256 av = _mm256_set1_ps(a);
  for (int64_t k = 0; k < words; ++k) {
    __m256 first, second;
    rows::expand16(b[k], p, &first, &second);
    float* s = sums + 16 * k;
    _mm256_storeu_ps(s, _mm256_fmadd_ps(first, av, _mm256_loadu_ps(s)));
    _mm256_storeu_ps(s + 8, _mm256_fmadd_ps(second, av, _mm256_loadu_ps(s + 8)));
  }
#else
  add_column_bounded(sums, b, words, p, int64_t{16} * words, a);
#endif
}

// The block at bits/offsets (one block's rows of each) into sums (`a.block` floats, zero):
// every kept column, in L1 (any block height).
template <typename T>
void block_in_l1(const ActBitmapGemvArgs& a, const T* values, const uint16_t* bits,
                 const int32_t* off, float* sums) {
  const int64_t words = a.block / 16, safe_end = a.stored - a.block - kOverread;
  for (int64_t k = 0; k < a.kept; ++k) {
    const int64_t j = a.idx[k], o = off[j];
    if (o <= safe_end) {
      add_column(sums, bits + j * words, words, values + o, a.val[k]);
    } else {
      add_column_bounded(sums, bits + j * words, words, values + o, off[j + 1] - o, a.val[k]);
    }
  }
}

#if SPARSEKIT_AVX512 || SPARSEKIT_AVX2
#if SPARSEKIT_AVX512
constexpr int64_t kRegisterBlock = 256;  // 16 zmm of sums: 16 words per column
#else
constexpr int64_t kRegisterBlock = 64;  // 8 ymm of sums: 4 words per column
#endif
constexpr int kRegisterWords = static_cast<int>(kRegisterBlock / 16);

// block_in_l1 for a block of kRegisterBlock outputs, the sums in registers throughout; a
// column near the end of `values` adds through memory.
template <typename T>
void block_in_registers(const ActBitmapGemvArgs& a, const T* values, const uint16_t* bits,
                        const int32_t* off, float* sums) {
  const int64_t safe_end = a.stored - kRegisterBlock - kOverread;
#if SPARSEKIT_AVX512
  __m512 acc[kRegisterWords];
  for (auto& v : acc) v = _mm512_setzero_ps();
#else
  __m256 acc[2 * kRegisterWords];
  for (auto& v : acc) v = _mm256_setzero_ps();
#endif
  for (int64_t k = 0; k < a.kept; ++k) {
    const int64_t j = a.idx[k], o = off[j];
    const uint16_t* b = bits + j * kRegisterWords;
    if (o > safe_end) {
      add_column_bounded(sums, b, kRegisterWords, values + o, off[j + 1] - o, a.val[k]);
      continue;
    }
    const T* p = values + o;
#if SPARSEKIT_AVX512
    const __m512 av = _mm512_set1_ps(a.val[k]);
#pragma GCC unroll 16
    for (int w = 0; w < kRegisterWords; ++w) {
      acc[w] = _mm512_fmadd_ps(rows::expand16(b[w], p), av, acc[w]);
    }
#else
    const __m256 av = _mm256_set1_ps(a.val[k]);
#pragma GCC unroll 4
    for (int w = 0; w < kRegisterWords; ++w) {
      __m256 first, second;
      rows::expand16(b[w], p, &first, &second);
      acc[2 * w] = _mm256_fmadd_ps(first, av, acc[2 * w]);
      acc[2 * w + 1] = _mm256_fmadd_ps(second, av, acc[2 * w + 1]);
    }
#endif
  }
#if SPARSEKIT_AVX512
  for (int w = 0; w < kRegisterWords; ++w) {
    _mm512_storeu_ps(sums + 16 * w, _mm512_add_ps(acc[w], _mm512_loadu_ps(sums + 16 * w)));
  }
#else
  for (int w = 0; w < 2 * kRegisterWords; ++w) {
    _mm256_storeu_ps(sums + 8 * w, _mm256_add_ps(acc[w], _mm256_loadu_ps(sums + 8 * w)));
  }
#endif
}
#endif

// y of blocks [b0, b1): Output(the sums of every kept column).
template <typename T, typename B>
void bitmap_blocks(const ActBitmapGemvArgs& a, const T* values, const B* bias, int64_t b0,
                   int64_t b1) {
  float* sums = workspace(a.block);
  const int64_t words = a.block / 16;
  for (int64_t blk = b0; blk < b1; ++blk) {
    std::fill(sums, sums + a.block, 0.f);
    const uint16_t* bits = a.bits + blk * a.in * words;
    const int32_t* off = a.offsets + blk * (a.in + 1);
#if SPARSEKIT_AVX512 || SPARSEKIT_AVX2
    if (a.block == kRegisterBlock) {
      block_in_registers(a, values, bits, off, sums);
    } else {
      block_in_l1(a, values, bits, off, sums);
    }
#else
    block_in_l1(a, values, bits, off, sums);
#endif
    const int64_t o0 = blk * a.block, n = std::min(a.block, a.out - o0);
    const float* scale = a.scale ? a.scale + o0 : nullptr;
    const B* bb = bias ? bias + o0 : nullptr;
    float* yb = a.y + o0;
    start(yb, scale, bb, n);
    for (int64_t o = 0; o < n; ++o) yb[o] += sums[o];
    if (scale) scale_add(yb, scale, bb, n);
  }
}

}  // namespace sparsekit::SPARSEKIT_ISA::act

namespace sparsekit::SPARSEKIT_ISA {

// Each thread owns whole output blocks, split by their stored values (offsets[b, 0] precede
// block b) plus one per column, so no two threads write the same output.
void act_bitmap_gemv(const ActBitmapGemvArgs& a) {
  auto before = [&a](int64_t i) {
    return (i < a.nblocks ? static_cast<int64_t>(a.offsets[i * (a.in + 1)]) : a.stored) +
           i * a.in;
  };
  with_values(a.value, a.values, [&](auto values) {
    act::with_bias(a.bias_bf16, a.bias, [&](auto bias) {
#pragma omp parallel num_threads(a.threads) if (a.threads > 1)
      {
        int64_t b0, b1;
        thread_rows_by(before, a.nblocks, omp_get_thread_num(), omp_get_num_threads(), &b0,
                       &b1);
        act::bitmap_blocks(a, values, bias, b0, b1);
      }
    });
  });
}

}  // namespace sparsekit::SPARSEKIT_ISA
