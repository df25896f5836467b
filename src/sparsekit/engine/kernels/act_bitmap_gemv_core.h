// The bitmap-column GEMV core (see act_bitmap_gemv.cpp for the op), compiled once per
// instruction set (cores_impl.h, after bitmap_core.h, whose word expansions it uses, and
// act_gemv_core.h, whose output helpers it shares): every kept input column expands its
// packed values into the lanes of their outputs by its bitmap words and adds x_j times them
// into fp32 sums that stay in cache — no index per value and no scattered store.
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
//
// On an Intel Xeon (Sapphire Rapids class, AVX-512 VBMI2; one thread, thread CPU time, 64 MB
// written between calls, loaded machine) this kernel with the table expansion and 4096-output
// tiles ran 50 % x 50 % at only 1.1-1.35x the row bitmap (bitmap_core.h, its best expansion)
// of the same dtype on 11008x4096: the same code ran 1.5-2x faster from L2 than from memory
// (a latency-bound stream of 3 runs per column) and its expansions were the rest. One tile
// of 16384 outputs and the expansion "vpexpand" (Expanded) took it to 1.6-1.7x in bf16,
// 1.8-1.9x in int8 and 2.0x in fp32 the row bitmap (11008x4096 and 4096x11008), and to
// 1.3-1.8x on the LLaMA shapes (2048 and 5632 wide) at 50 % and 70 % weight sparsity.

namespace sparsekit::SPARSEKIT_ISA::act {

// Elements that a vector expansion may read past a (block, column)'s last value (a 16-byte
// shuffle or an 8-float load per word, bitmap_core.h; 64 codes per 4 int8 words, Expanded):
// one within a full block plus this many elements of the end of `values` takes the bounded
// scalar loop, so bits that promise more values than the offsets hold never read outside
// `values`.
constexpr int64_t kOverread = 64;
// Outputs per tile: their sums (64 KiB) stay in L2 while every kept column streams its run
// of the tile. 4096 outputs (sums in L1) split each column of an 11008-output layer into 3
// runs, each restarting the prefetchers: 16384 ran it 1.25x faster in bf16 and int8 (Intel
// Xeon, 50 % x 50 %, one thread, cache flushed). Prefetching each block of the next kept
// columns to L2 while the current ones add that block (add_columns) gained 0-4 % there but
// 1.1-1.2x on the LLaMA shapes (2048 and 5632 outputs, bf16), whose short runs the hardware
// prefetchers barely follow; it replaced a prefetch of the first line of each run.
constexpr int64_t kTileOutputs = 16384;

// Runs of at most this many outputs (a kept column over a tile) have the next kept columns'
// runs prefetched while the current ones add (add_columns). On AVX2 (Zen 3, 2 threads, bf16,
// 50 % x 50 %, weights streamed from memory) the prefetch ran 1024-output layers 1.15x
// faster, 2048-output ones alike, and layers of 3072 outputs and more 1.05-1.27x slower
// (11008x4096 1.57 -> 1.23 ms without it): the hardware prefetchers follow long runs on their
// own, and the prefetch loop costs instructions in a loop bound by them. AVX-512 keeps it
// for every run (the Intel measurement above).
constexpr int64_t kPrefetchRunsUpTo = SPARSEKIT_AVX512 ? kTileOutputs : 2048;

// Where the sums keep output o of a block: in output order (Interleaved false), or per 32
// outputs the 16 even ones and then the 16 odd ones (an expansion into the low and high
// halves of 32-bit lanes, Expanded's bf16).
template <bool Interleaved>
constexpr int64_t sum_index(int64_t o) {
  return Interleaved ? (o & ~int64_t{31}) | ((o & 1) << 4) | ((o >> 1) & 15) : o;
}

// The table expansion of bitmap_core.h (rows::expand16), on every instruction set: one word
// at a time into the lanes of its outputs, which hold the values times kUnit (1; AVX2's
// int8 codes: 2^24, rows::kExpandUnit).
struct ByTables {
  template <typename T>
  static constexpr int kWords = 1;  // bitmap words per expansion: 16 * kWords lanes
  template <typename T>
  static constexpr bool kInterleaved = false;  // the lanes' outputs (sum_index)
#if SPARSEKIT_AVX2 && !SPARSEKIT_AVX512
  template <typename T>
  static constexpr float kUnit = rows::kExpandUnit<T>;  // the lanes hold the values times kUnit
#else
  template <typename T>
  static constexpr float kUnit = 1.f;  // the lanes hold the values times kUnit
#endif
  // Kept columns added per load and store of the sums: 8 fp32 or bf16 columns on AVX-512
  // (32 registers) ran 1.15-1.3x faster than 4 (5632x2048, 50 % x 50 %, one thread, Zen 5),
  // but int8 ran 2x slower (its expansion needs more general registers, which then spill);
  // AVX2 has 16 vector registers for the broadcasts, expansions and sums.
  template <typename T>
  static constexpr int kColumns = SPARSEKIT_AVX512 && !std::is_same_v<T, int8_t> ? 8 : 4;
#if SPARSEKIT_AVX512
  template <typename T>
  void operator()(const uint16_t* b, const T*& p, __m512* lanes) const {
    lanes[0] = rows::expand16(*b, p);
  }
  // bf16 by the 256-bit shuffles of AVX2 (rows::expand8: each byte's values straight to the
  // top halves of their lanes) joined into one register, instead of two 128-bit shuffles
  // widened by vpmovzx and a shift: 1.1x faster from cache (one thread) and 1.06-1.15x from
  // memory (two threads) on the LLaMA shapes at 50 % x 50 % (AMD Zen 4, interleaved A/B
  // across builds), where 512-bit widening and shifts take two passes each. The row bitmap
  // (bitmap_core.h) keeps rows::expand16's widening: the same change measured there within
  // that machine's noise (0.9-1.2x across shapes).
  void operator()(const uint16_t* b, const bf16*& p, __m512* lanes) const {
    __m256 first, second;
    rows::expand16(*b, p, &first, &second);
    lanes[0] = _mm512_insertf32x8(_mm512_castps256_ps512(first), second, 1);
  }
#endif
};

// sums[0:16 words) += a * the (block, column) at p with bitmap words b, reading at most
// `count` values, into sums laid out by sum_index<Interleaved>: the bounded path of every ISA
// and the whole path of the scalar one.
template <bool Interleaved, typename T>
inline void add_bounded(float* __restrict sums, const uint16_t* b, int64_t words, const T* p,
                        int64_t count, float a) {
  const T* const end = p + count;
  for (int64_t k = 0; k < words; ++k) {
    for (unsigned m = b[k]; m && p < end; m &= m - 1) {
      sums[sum_index<Interleaved>(16 * k + __builtin_ctz(m))] += a * to_float(*p++);
    }
  }
}

#if SPARSEKIT_AVX512 || SPARSEKIT_AVX2
// sums[0:16 words) += sum over i < N of a[i] * the (block, column) i at p[i] with bitmap
// words b[i]: one load and store of the sums per expansion for N columns, each expanded by
// `expand` (AVX-512; AVX2 takes the tables). Each p[i] moves past the values it read.
template <int N, typename T, typename Expand>
__attribute__((always_inline)) inline void add_vector(float* __restrict sums,
                                                      const uint16_t* const* b, int64_t words,
                                                      const T** p, const float* a,
                                                      Expand expand) {
#if SPARSEKIT_AVX512
  constexpr int W = Expand::template kWords<T>;
  __m512 av[N];
  for (int i = 0; i < N; ++i) av[i] = _mm512_set1_ps(a[i] / Expand::template kUnit<T>);
  for (int64_t k = 0; k < words; k += W) {
    __m512 s[W];
    for (int w = 0; w < W; ++w) s[w] = _mm512_loadu_ps(sums + 16 * (k + w));
    for (int i = 0; i < N; ++i) {
      __m512 lanes[W];
      expand(b[i] + k, p[i], lanes);
      for (int w = 0; w < W; ++w) s[w] = _mm512_fmadd_ps(lanes[w], av[i], s[w]);
    }
    for (int w = 0; w < W; ++w) _mm512_storeu_ps(sums + 16 * (k + w), s[w]);
  }
#else
  (void)expand;
  __m256 av[N];
  for (int i = 0; i < N; ++i) av[i] = _mm256_set1_ps(a[i] / Expand::template kUnit<T>);
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

// The runs of the N kept columns `next` over blocks [b0, b1), prefetched to L2 a block at a
// time (`block()`) while the current columns add theirs. A block's values are taken as the
// run's average per block, read from the offsets once per column: reading two offsets of
// every next column at every block (and a prefetch loop per block between them) ran the
// whole kernel 1.08x slower (a standalone copy of this loop, 2048x5632 and 5632x2048, bf16,
// 50 % x 50 %, one thread's CPU time, weights from memory, AMD Zen 4).
template <int N, typename T>
struct Lookahead {
  const char* values[N] = {};
  const char* bits[N] = {};
  int64_t step[N] = {};  // bytes of values per block, on average over the run
  int64_t bit_bytes;  // bytes of bits per block

  // next == nullptr: no runs (block() must not be called)
  Lookahead(const ActBitmapGemvArgs& a, const T* v, const int32_t* next, int64_t b0,
            int64_t b1)
      : bit_bytes(a.block / 8) {
    for (int i = 0; next && i < N; ++i) {
      const int32_t* o = a.offsets + next[i] * (a.nblocks + 1);
      values[i] = reinterpret_cast<const char*>(v + o[b0]);
      step[i] = (o[b1] - o[b0]) * static_cast<int64_t>(sizeof(T)) / (b1 - b0);
      bits[i] = reinterpret_cast<const char*>(a.bits + (next[i] * a.nblocks + b0) * (a.block / 16));
    }
  }
  // The next block of each run: its values (a line past the average too) and its bits.
  __attribute__((always_inline)) void block() {
    for (int i = 0; i < N; ++i) {
      for (int64_t c = 0; c <= step[i]; c += 64) __builtin_prefetch(values[i] + c, 0, 2);
      for (int64_t c = 0; c < bit_bytes; c += 64) __builtin_prefetch(bits[i] + c, 0, 2);
      values[i] += step[i];
      bits[i] += bit_bytes;
    }
  }
};

// sums of blocks [b0, b1) (block floats each) += the N kept columns j[i] (values a[i]); the
// same blocks of the N columns `next` (nullptr: none) are prefetched to L2 meanwhile.
// On AVX-512, where every block of the tile may hold a full block of values without
// reading past `values` (all but the last columns of the values), each column's pointer
// moves on from block to block by its bits alone; otherwise each block starts at its
// offset and reads no further than its next offset. Reading 8 columns' offsets at every
// block had cost the kernel 1.06x (the standalone copy above); in the kernel, with the
// Lookahead, the AVX-512 build ran 1.08-1.35x faster in bf16 and 1.01-1.12x in fp32 than
// before (the LLaMA shapes 6144x2048, 11264x2048, 2048x5632, 2048x2048 at 50 % x 50 %, two
// threads, medians of 21 interleaved rounds, AMD Zen 4), and the AVX2 build, with 16
// registers for the column pointers, sums and expansions, 0.92-1.0x: it keeps the offsets.
template <int N, typename T, typename Expand>
__attribute__((always_inline)) inline void add_columns(const ActBitmapGemvArgs& a,
                                                       const T* values, const int32_t* j,
                                                       const float* x, int64_t b0, int64_t b1,
                                                       float* sums, Expand expand,
                                                       const int32_t* next) {
  const int64_t words = a.block / 16;
  const int32_t* off[N];
  const uint16_t* bits[N];
  const T* p[N];
  for (int i = 0; i < N; ++i) {
    off[i] = a.offsets + j[i] * (a.nblocks + 1);
    bits[i] = a.bits + (j[i] * a.nblocks + b0) * words;
  }
  Lookahead<N, T> ahead(a, values, next, b0, b1);
#if SPARSEKIT_AVX512
  bool whole = true;
  for (int i = 0; i < N; ++i) {
    p[i] = values + off[i][b0];
    whole &= off[i][b0] <= a.stored - (b1 - b0) * a.block - kOverread;
  }
  if (whole) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      if (next) ahead.block();
      add_vector<N>(sums + (blk - b0) * a.block, bits, words, p, x, expand);
      for (int i = 0; i < N; ++i) bits[i] += words;
    }
    return;
  }
#endif
  const int64_t safe_end = a.stored - a.block - kOverread;
  for (int64_t blk = b0; blk < b1; ++blk) {
    float* s = sums + (blk - b0) * a.block;
    bool safe = true;
    for (int i = 0; i < N; ++i) {
      p[i] = values + off[i][blk];
      safe &= off[i][blk] <= safe_end;
    }
    if (next) ahead.block();
#if SPARSEKIT_AVX512 || SPARSEKIT_AVX2
    if (safe) {
      add_vector<N>(s, bits, words, p, x, expand);
      for (int i = 0; i < N; ++i) bits[i] += words;
      continue;
    }
#else
    (void)safe;
    (void)expand;
#endif
    for (int i = 0; i < N; ++i) {
      add_bounded<Expand::template kInterleaved<T>>(s, bits[i], words, p[i],
                                                    off[i][blk + 1] - off[i][blk], x[i]);
      bits[i] += words;
    }
  }
}

// sums of blocks [t0, t1) += the kept columns [k0, k1), C at a time, each group prefetching
// the next group's runs where they are short (kPrefetchRunsUpTo).
template <typename T, typename Expand>
__attribute__((always_inline)) inline void add_kept(const ActBitmapGemvArgs& a, const T* values,
                                                    int64_t k0, int64_t k1, int64_t t0,
                                                    int64_t t1, float* sums, Expand expand) {
  constexpr int C = Expand::template kColumns<T>;
  const bool prefetch = (t1 - t0) * a.block <= kPrefetchRunsUpTo;
  int64_t k = k0;
  for (; k + C <= k1; k += C) {
    add_columns<C>(a, values, a.idx + k, a.val + k, t0, t1, sums, expand,
                   prefetch && k + 2 * C <= k1 ? a.idx + k + C : nullptr);
  }
  for (; k < k1; ++k) {
    add_columns<1>(a, values, a.idx + k, a.val + k, t0, t1, sums, expand, nullptr);
  }
}

// y = Output(the sums of every kept column) on the threads of the enclosing parallel region,
// which share the kept columns (share_kept), a tile of blocks at a time, the words expanded
// by `expand`; with group scales each group's run of kept columns is summed apart
// (add_by_group).
template <typename T, typename B, typename Expand>
__attribute__((always_inline)) inline void bitmap_columns(const ActBitmapGemvArgs& a,
                                                          const T* values, const B* bias,
                                                          float** parts, Expand expand) {
  const ActGroups groups{a.group_scales, a.group_size, a.out};
  share_kept(
      a.kept, a.nblocks, std::max<int64_t>(1, kTileOutputs / a.block), a.block, parts,
      [&](int64_t k0, int64_t k1, int64_t b0, int64_t b1, float* sums)
          __attribute__((always_inline)) {
        if (!groups.scale) {
          add_kept(a, values, k0, k1, b0, b1, sums, expand);
          return;
        }
        const int64_t o0 = b0 * a.block;
        add_by_group(groups, a.idx, k0, k1, o0, std::min(b1 * a.block, a.out) - o0,
                     (b1 - b0) * a.block, sums,
                     [](int64_t o) { return sum_index<Expand::template kInterleaved<T>>(o); },
                     [&](int64_t r0, int64_t r1, float* s) __attribute__((always_inline)) {
                       add_kept(a, values, r0, r1, b0, b1, s, expand);
                     });
      },
      [&](int64_t b0, int64_t b1, const float* const* sums, int count, int64_t first) {
        const int64_t o0 = b0 * a.block, n = std::min(b1 * a.block, a.out) - o0;
        if (n <= 0) return;
        output_sums(a.y + o0, a.scale ? a.scale + o0 : nullptr, bias ? bias + o0 : nullptr, n,
                    sums, count, o0 - first * a.block,
                    [](int64_t o) { return sum_index<Expand::template kInterleaved<T>>(o); });
      });
}

#if SPARSEKIT_AVX512
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,popcnt,bmi,bmi2,avx512vbmi,avx512vbmi2")
// Lane i of kTopByte[g]: byte 16 g + i / 4 of a vector, in the top byte of 32-bit lane i / 4
// (the other bytes are masked to zero).
struct TopBytes {
  uint8_t index[4][64];
};
constexpr TopBytes make_top_bytes() {
  TopBytes t{};
  for (int g = 0; g < 4; ++g) {
    for (int i = 0; i < 64; ++i) t.index[g][i] = static_cast<uint8_t>(16 * g + i / 4);
  }
  return t;
}
alignas(64) inline constexpr TopBytes kTopByte = make_top_bytes();

// The VBMI2 expansion (ActBitmapGemvArgs::vpexpand, the bitmap expansion "vpexpand"):
// packed values into the lanes of their outputs by vpexpandw / vpexpandb / vexpandps.
// - bf16, two words at once: one expand-load of 32 values into 32 16-bit lanes, whose high
//   halves are the odd outputs' floats and whose low halves, shifted up, the even ones'
//   (sum_index<true>).
// - int8, four words at once: one vpexpandb of 64 codes (a 64-byte load) into byte lanes,
//   then per 16 outputs one vpermb into the top bytes of 32-bit lanes: floats 2^24 times the
//   codes (kUnit; x is scaled by 2^-24 instead, so the products are exact).
// - fp32, a word at a time: one vexpandps from memory.
// Intel Xeon (AVX-512 VBMI2), 11008x4096 and 4096x11008 at 50 % x 50 %, one thread, thread
// CPU time, cache flushed: see the header comment.
struct Expanded {
  template <typename T>
  static constexpr int kWords = std::is_same_v<T, bf16> ? 2 : std::is_same_v<T, int8_t> ? 4 : 1;
  template <typename T>
  static constexpr bool kInterleaved = std::is_same_v<T, bf16>;
  template <typename T>
  static constexpr float kUnit = std::is_same_v<T, int8_t> ? 0x1p24f : 1.f;
  // 8 columns for int8 too: its expansion needs a bit load, a popcount and a mask move per
  // 4 words, so no general registers spill; 1.2x faster than 4 on 4096x11008, the same
  // (0.96-1.05x) on 11008x4096 and the LLaMA shapes (Intel Xeon, 50 % x 50 %, one thread).
  template <typename T>
  static constexpr int kColumns = 8;

  void operator()(const uint16_t* b, const bf16*& p, __m512* lanes) const {
    uint32_t m;
    __builtin_memcpy(&m, b, sizeof m);
    const __m512i e = _mm512_maskz_expandloadu_epi16(m, p);
    p += __builtin_popcount(m);
    lanes[0] = _mm512_castsi512_ps(_mm512_slli_epi32(e, 16));
    lanes[1] = _mm512_castsi512_ps(_mm512_and_si512(e, _mm512_set1_epi32(~0xFFFF)));
  }
  void operator()(const uint16_t* b, const int8_t*& p, __m512* lanes) const {
    uint64_t m;
    __builtin_memcpy(&m, b, sizeof m);
    const __m512i e = _mm512_maskz_expand_epi8(m, _mm512_loadu_si512(p));
    p += __builtin_popcountll(m);
    for (int g = 0; g < 4; ++g) {
      lanes[g] = _mm512_cvtepi32_ps(_mm512_maskz_permutexvar_epi8(
          0x8888888888888888ull, _mm512_load_si512(kTopByte.index[g]), e));
    }
  }
  void operator()(const uint16_t* b, const float*& p, __m512* lanes) const {
    lanes[0] = _mm512_maskz_expandloadu_ps(static_cast<__mmask16>(*b), p);
    p += __builtin_popcount(*b);
  }
};

template <typename T, typename B>
void bitmap_columns_expanded(const ActBitmapGemvArgs& a, const T* values, const B* bias,
                             float** parts) {
  bitmap_columns(a, values, bias, parts, Expanded{});
}
#pragma GCC pop_options
#endif

}  // namespace sparsekit::SPARSEKIT_ISA::act

namespace sparsekit::SPARSEKIT_ISA {

// Each thread adds a share of the kept columns and writes a share of the outputs
// (act::bitmap_columns).
void act_bitmap_gemv(const ActBitmapGemvArgs& a) {
  with_values(a.value, a.values, [&](auto values) {
    act::with_bias(a.bias_bf16, a.bias, [&](auto bias) {
      std::vector<float*> parts(std::max(1, a.threads));  // each thread's sums
#pragma omp parallel num_threads(a.threads) if (a.threads > 1)
      {
#if SPARSEKIT_AVX512
        if (a.vpexpand) {
          act::bitmap_columns_expanded(a, values, bias, parts.data());
        } else {
          act::bitmap_columns(a, values, bias, parts.data(), act::ByTables{});
        }
#else
        act::bitmap_columns(a, values, bias, parts.data(), act::ByTables{});
#endif
      }
    });
  });
}

}  // namespace sparsekit::SPARSEKIT_ISA
