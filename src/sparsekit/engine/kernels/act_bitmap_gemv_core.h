// The bitmap-column GEMV core (see act_bitmap_gemv.cpp for the op), compiled once per
// instruction set (cores_impl.h, after bitmap_core.h, whose word expansions it uses, and
// act_gemv_core.h, whose output helpers it shares): every kept input column expands its
// packed values into the lanes of their outputs by its bitmap words and adds x_j times them
// into fp32 sums that stay in L1 — no index per value and no scattered store.
//
// A column's values are one contiguous run over all output blocks, so kColumns kept columns
// stream from memory side by side, as act_gemv's transposed rows do. The first version
// walked block by block with the block's sums in 16 zmm registers: each (block, column)
// was a separate 256-byte run, the prefetchers lost track, and it ran at 6-10 % of its floor
// (5632x2048, 50 % x 50 %, one thread, Zen 5). A block-major layout (a block's (column,
// block) runs in column order, so the kept columns are one forward stream with gaps), the
// 256 sums in 16 zmm registers and software prefetch of the runs 4-64 kept columns ahead
// (to L1 or L2) did not beat this either: faster from cache (1.1x), but from memory
// 0.6-0.9x of this kernel in fp32 and bf16 and 1.03-1.14x in int8 on AVX-512, 0.7-1.05x
// on AVX2 (the four LLaMA shapes, 50 % x 50 %, one thread's CPU time, Zen 4, loaded
// machine).

namespace sparsekit::SPARSEKIT_ISA::act {

// Elements that a vector expansion may read past a (block, column)'s last value (a 16-byte
// shuffle or an 8-float load per word, bitmap_core.h): one within a full block plus this
// many elements of the end of `values` takes the bounded scalar loop, so bits that promise
// more values than the offsets hold never read outside `values`.
constexpr int64_t kOverread = 16;
constexpr int64_t kTileOutputs = 4096;  // 16 KiB of sums stay in L1 while the columns stream
// Kept columns of values T added per load and store of the sums: 8 fp32 or bf16 columns on
// AVX-512 (32 registers) ran 1.15-1.3x faster than 4 (5632x2048, 50 % x 50 %, one thread,
// Zen 5), but int8 ran 2x slower (its expansion needs more general registers, which then
// spill); AVX2 has 16 vector registers for the broadcasts, expansions and sums.
template <typename T>
constexpr int kColumns = SPARSEKIT_AVX512 && !std::is_same_v<T, int8_t> ? 8 : 4;

// sums[0:16 words) += a * the (block, column) at p with bitmap words b, reading at most
// `count` values: the bounded path of every ISA and the whole path of the scalar one.
template <typename T>
inline void add_bounded(float* __restrict sums, const uint16_t* b, int64_t words, const T* p,
                        int64_t count, float a) {
  const T* const end = p + count;
  for (int64_t k = 0; k < words; ++k) {
    for (unsigned m = b[k]; m && p < end; m &= m - 1) {
      sums[16 * k + __builtin_ctz(m)] += a * to_float(*p++);
    }
  }
}

#if SPARSEKIT_AVX512 || SPARSEKIT_AVX2
// sums[0:16 words) += sum over i < N of a[i] * the (block, column) i at p[i] with bitmap
// words b[i]: one load and store of the sums per word for N columns.
template <int N, typename T>
inline void add_vector(float* __restrict sums, const uint16_t* const* b, int64_t words,
                       const T* const* start, const float* a) {
  const T* p[N];
  for (int i = 0; i < N; ++i) p[i] = start[i];
#if SPARSEKIT_AVX512
  __m512 av[N];
  for (int i = 0; i < N; ++i) av[i] = _mm512_set1_ps(a[i]);
  for (int64_t k = 0; k < words; ++k) {
    __m512 s = _mm512_loadu_ps(sums + 16 * k);
    for (int i = 0; i < N; ++i) s = _mm512_fmadd_ps(rows::expand16(b[i][k], p[i]), av[i], s);
    _mm512_storeu_ps(sums + 16 * k, s);
  }
#else
  __m256 av[N];
  for (int i = 0; i < N; ++i) av[i] = _mm256_set1_ps(a[i]);
  for (int64_t k = 0; k < words; ++k) {
    __m256 s0 = _mm256_loadu_ps(sums + 16 * k), s1 = _mm256_loadu_ps(sums + 16 * k + 8);
    for (int i = 0; i < N; ++i) {
      __m256 first, second;
      rows::expand16(b[i][k], p[i], &first, &second);
      s0 = _mm256_fmadd_ps(first, av[i], s0);
      s1 = _mm256_fmadd_ps(second, av[i], s1);
    }
    _mm256_storeu_ps(sums + 16 * k, s0);
    _mm256_storeu_ps(sums + 16 * k + 8, s1);
  }
#endif
}
#endif

// sums of blocks [b0, b1) (block floats each) += the N kept columns j[i] (values a[i]).
template <int N, typename T>
void add_columns(const ActBitmapGemvArgs& a, const T* values, const int32_t* j,
                 const float* x, int64_t b0, int64_t b1, float* sums) {
  const int64_t words = a.block / 16, safe_end = a.stored - a.block - kOverread;
  const int32_t* off[N];
  const uint16_t* bits[N];
  for (int i = 0; i < N; ++i) {
    off[i] = a.offsets + j[i] * (a.nblocks + 1);
    bits[i] = a.bits + j[i] * a.nblocks * words;
  }
  for (int64_t blk = b0; blk < b1; ++blk) {
    float* s = sums + (blk - b0) * a.block;
    const T* p[N];
    const uint16_t* b[N];
    bool safe = true;
    for (int i = 0; i < N; ++i) {
      p[i] = values + off[i][blk];
      b[i] = bits[i] + blk * words;
      safe &= off[i][blk] <= safe_end;
    }
#if SPARSEKIT_AVX512 || SPARSEKIT_AVX2
    if (safe) {
      add_vector<N>(s, b, words, p, x);
      continue;
    }
#else
    (void)safe;
#endif
    for (int i = 0; i < N; ++i) {
      add_bounded(s, b[i], words, p[i], off[i][blk + 1] - off[i][blk], x[i]);
    }
  }
}

// y of blocks [b0, b1): Output(the sums of every kept column), a tile of blocks at a time.
template <typename T, typename B>
void bitmap_columns(const ActBitmapGemvArgs& a, const T* values, const B* bias, int64_t b0,
                    int64_t b1) {
  const int64_t tile = std::max<int64_t>(1, kTileOutputs / a.block);
  float* sums = workspace(tile * a.block);
  for (int64_t t0 = b0; t0 < b1; t0 += tile) {
    const int64_t t1 = std::min(b1, t0 + tile);
    std::fill(sums, sums + (t1 - t0) * a.block, 0.f);
    int64_t k = 0;
    constexpr int C = kColumns<T>;
    for (; k + C <= a.kept; k += C) {
      if (k + 2 * C <= a.kept) {  // where the next columns start in this tile
        for (int i = C; i < 2 * C; ++i) {
          const int64_t o = a.offsets[a.idx[k + i] * (a.nblocks + 1) + t0];
          __builtin_prefetch(values + o);
          __builtin_prefetch(a.bits + (a.idx[k + i] * a.nblocks + t0) * (a.block / 16));
        }
      }
      add_columns<C>(a, values, a.idx + k, a.val + k, t0, t1, sums);
    }
    for (; k < a.kept; ++k) add_columns<1>(a, values, a.idx + k, a.val + k, t0, t1, sums);
    const int64_t o0 = t0 * a.block, n = std::min(t1 * a.block, a.out) - o0;
    const float* scale = a.scale ? a.scale + o0 : nullptr;
    const B* bb = bias ? bias + o0 : nullptr;
    float* y = a.y + o0;
    start(y, scale, bb, n);
    for (int64_t o = 0; o < n; ++o) y[o] += sums[o];
    if (scale) scale_add(y, scale, bb, n);
  }
}

}  // namespace sparsekit::SPARSEKIT_ISA::act

namespace sparsekit::SPARSEKIT_ISA {

// Each thread owns a range of whole output blocks (the same share of every column), so no
// two threads write the same output.
void act_bitmap_gemv(const ActBitmapGemvArgs& a) {
  with_values(a.value, a.values, [&](auto values) {
    act::with_bias(a.bias_bf16, a.bias, [&](auto bias) {
#pragma omp parallel num_threads(a.threads) if (a.threads > 1)
      {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        act::bitmap_columns(a, values, bias, a.nblocks * t / nt, a.nblocks * (t + 1) / nt);
      }
    });
  });
}

}  // namespace sparsekit::SPARSEKIT_ISA
