// The W8A8 bitmap-column GEMV core (see act_bitmap_gemv.cpp for the op
// act_bitmap_qgemv), compiled once per instruction set (cores_impl.h, after qlinear_core.h,
// whose byte expansions it uses, and act_bitmap_gemv_core.h, whose storage it reads): the
// kept inputs of the row come quantized to int8 codes (the op does that), and each output's
// sum over the kept columns is an exact int32 integer dot product.
//
// Why: act_bitmap_gemv's int8 values with float inputs widen every expanded code to a float
// and FMA it, 13 vector instructions per 64 weights of a kept column (a vpexpandb, four
// vpermb, four conversions, four FMAs): compute-bound, so TEAL gained little on int8
// weights. Here four kept columns share one integer dot product per output: their
// expansions are interleaved byte by byte into the 32-bit lanes of their outputs (two
// unpacks per column), so 64 weights of a column cost about 5 instructions. Measured
// (1024x1024 at 50 %, one thread, from L2, Intel Xeon): 31 kept weights per ns against 18
// for the float-input kernel.
//
// - AVX-512 (with VNNI, VBMI, VBMI2, BITALG; qcores()): the weights are the unsigned operand
//   of vpdpbusd, biased by 128 (an XOR of the expanded bytes: a missing weight becomes 128,
//   code 0), the input codes the signed one, and 128 times the sum of the input codes is
//   subtracted from every output at the end.
// - AVX2: vpmaddubsw with the sign trick of qlinear_core.h, vpmaddwd into int32.
// - scalar: plain int32 loops over the set bits.
// The unpacks interleave within 128-bit lanes, so the sums of a step keep their outputs in
// the order of sum_position. Every sum is exact: at most in_features * 255 * 127 in
// magnitude (the op checks in_features <= 65536, as the W8A8 ops do).

namespace sparsekit::SPARSEKIT_ISA::act {

#if SPARSEKIT_AVX512
constexpr int kQLanes = 4;  // 128-bit lanes per vector: 64 outputs per step
constexpr bool kQBiased = true;  // weights biased by 128 (vpdpbusd's unsigned operand)
#elif SPARSEKIT_AVX2
constexpr int kQLanes = 2;  // 32 outputs per step
constexpr bool kQBiased = false;  // vpmaddubsw with the sign trick (qlinear_core.h)
#else
constexpr int kQLanes = 0;  // scalar loops: sums in output order
constexpr bool kQBiased = false;
#endif

// Where the int32 sums keep output o of a step of 16 * kQLanes outputs: where the unpacks
// put it (the step's output 16 L + 4 k + d in lane 4 L + d of its k-th vector of sums), or
// in output order for the scalar loops.
constexpr int64_t sum_position(int64_t o) {
  if (kQLanes == 0) return o;
  constexpr int64_t step = 16 * kQLanes;
  return (o & ~(step - 1)) | ((o >> 2) & 3) * (step / 4) | ((o >> 4) & (kQLanes - 1)) << 2 |
         (o & 3);
}

// Kept columns per pass over a block's sums: two groups of four.
constexpr int kQColumns = 8;
// Blocks a pass adds at once: a column's blocks follow each other in its run of codes, its
// bits and the sums, so a span of blocks is one block to add_qblock, and the per-block work
// (the columns' offsets, the bounds check, the prefetch loops) is paid once per span. Four
// (1024 outputs of 256-output blocks) against one ran cold calls 1.13-1.35x faster
// (2048x2048 1.13x, 5632x2048, 2048x5632 and 6144x2048 1.29-1.35x; 50 % x 50 %, two
// threads, AMD Zen 4, one process taking turns); spans of two 1.1-1.2x slower than four,
// of eight or sixteen 1.05-1.4x slower (all of a 2048-output column: the next group's whole
// runs prefetched at once, as kAhead's note found slower). On Zen 4, expanding by 256-bit
// halves (as its W8A8 rows do) ran 1.05-1.15x slower than the 512-bit expand-loads here.
constexpr int64_t kQSpan = 4;
// Groups of kept columns between the one being added and the one prefetched to L2, a block
// of the prefetched group per block added: 2 ran the cold 2048x5632x4 stack 1.05-1.1x faster
// than 1 or 4 and 1.1-1.2x faster than none (Intel Xeon, 50 % x 50 %, two threads, whole
// runs prefetched at once). Spread over the blocks, the prefetches no longer stall the
// loads behind a burst of misses: cold single calls (caches flushed by the other layers'
// weights, 50 % x 50 %, two threads, same Xeon) ran 1.10-1.12x faster on 5632x2048,
// 1.07-1.15x on 2048x5632 and 1.03-1.05x on 2048x2048 than with whole runs at once.
constexpr int kAhead = 2;

// y[o0:o1) = (the sums of outputs [o0, o1) over `count` threads' parts - correction) * sx:
// whole steps of 16 * kQLanes outputs as vectors (sum_position keeps a step's outputs as a
// 4 x kQLanes grid of 4-output chunks, transposed here by 128-bit lane shuffles), the rest
// one output at a time. o0 starts a step. A call on a 5632x2048 layer that keeps no column
// took 17.8 us with it, 22.0 with the scalar loop (two threads, Intel Xeon).
inline void finish_qsums(const int32_t* const* sums, int count, int64_t o0, int64_t o1,
                         int32_t correction, float sx, float* y) {
  int64_t o = o0;
#if SPARSEKIT_AVX512
  const __m512i corr = _mm512_set1_epi32(correction);
  const __m512 scale = _mm512_set1_ps(sx);
  for (; o + 64 <= o1; o += 64) {
    __m512i z[4];
    for (int k = 0; k < 4; ++k) {
      z[k] = _mm512_sub_epi32(_mm512_loadu_si512(sums[0] + o + 16 * k), corr);
      for (int u = 1; u < count; ++u) {
        z[k] = _mm512_add_epi32(z[k], _mm512_loadu_si512(sums[u] + o + 16 * k));
      }
    }
    // z[k] holds chunks (k, L = 0..3); output 16 L + 4 k + d is lane 4 k + d of vector L
    const __m512i t0 = _mm512_shuffle_i32x4(z[0], z[1], 0x44);
    const __m512i t1 = _mm512_shuffle_i32x4(z[0], z[1], 0xEE);
    const __m512i t2 = _mm512_shuffle_i32x4(z[2], z[3], 0x44);
    const __m512i t3 = _mm512_shuffle_i32x4(z[2], z[3], 0xEE);
    const __m512i out[4] = {
        _mm512_shuffle_i32x4(t0, t2, 0x88), _mm512_shuffle_i32x4(t0, t2, 0xDD),
        _mm512_shuffle_i32x4(t1, t3, 0x88), _mm512_shuffle_i32x4(t1, t3, 0xDD)};
    for (int L = 0; L < 4; ++L) {
      _mm512_storeu_ps(y + o + 16 * L, _mm512_mul_ps(_mm512_cvtepi32_ps(out[L]), scale));
    }
  }
#elif SPARSEKIT_AVX2
  const __m256i corr = _mm256_set1_epi32(correction);
  const __m256 scale = _mm256_set1_ps(sx);
  for (; o + 32 <= o1; o += 32) {
    const auto load = [o](const int32_t* part, int k) {
      return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(part + o + 8 * k));
    };
    __m256i z[4];
    for (int k = 0; k < 4; ++k) {
      z[k] = _mm256_sub_epi32(load(sums[0], k), corr);
      for (int u = 1; u < count; ++u) z[k] = _mm256_add_epi32(z[k], load(sums[u], k));
    }
    // z[k] holds chunks (k, L = 0..1); output 16 L + 4 k + d is lane 4 k + d of L's pair
    const __m256i out[4] = {_mm256_permute2x128_si256(z[0], z[1], 0x20),
                            _mm256_permute2x128_si256(z[2], z[3], 0x20),
                            _mm256_permute2x128_si256(z[0], z[1], 0x31),
                            _mm256_permute2x128_si256(z[2], z[3], 0x31)};
    for (int v = 0; v < 4; ++v) {
      _mm256_storeu_ps(y + o + 8 * v, _mm256_mul_ps(_mm256_cvtepi32_ps(out[v]), scale));
    }
  }
#endif
  for (; o < o1; ++o) {
    int32_t s = -correction;
    for (int u = 0; u < count; ++u) s += sums[u][sum_position(o)];
    y[o] = static_cast<float>(s) * sx;
  }
}

#if SPARSEKIT_AVX512
// (The constants and sum_position above are compiled for every target: the output loop of
// act_bitmap_qgemv, outside this region, inlines sum_position; called across targets it
// was a call through the PLT per output, 10 % of a call that keeps no column.)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,popcnt,bmi,bmi2,avx512vnni,avx512vbmi,avx512vbmi2,avx512bitalg")
// sums of one block (words 16-bit words of bits) += the N (a multiple of 4) columns with
// bitmap words b[i], packed codes from p[i] and input codes c (N bytes, 4 per group):
// per 64 outputs one load and store of four vectors of sums for all N columns.
template <int N>
__attribute__((always_inline)) inline void add_qblock(int32_t* __restrict sums,
                                                      const uint16_t* const* b, int64_t words,
                                                      const int8_t* const* start,
                                                      const int32_t* groups, bool vpexpandb) {
  const int8_t* p[N];
  for (int i = 0; i < N; ++i) p[i] = start[i];
  __m512i xs[N / 4];
  for (int g = 0; g < N / 4; ++g) xs[g] = _mm512_set1_epi32(groups[g]);
  const __m512i flip = q::bias128();
  for (int64_t k = 0; k < words; k += 4) {
    int32_t* s = sums + 16 * k;
    __m512i acc[4];
    for (int v = 0; v < 4; ++v) acc[v] = _mm512_loadu_si512(s + 16 * v);
    for (int g = 0; g < N / 4; ++g) {
      __m512i e[4];
      for (int i = 0; i < 4; ++i) {
        uint64_t m;
        __builtin_memcpy(&m, b[4 * g + i] + k, sizeof m);
        const int n = __builtin_popcountll(m);
        // vpexpandb from memory: one mask move fewer than a load and a vpexpandb (port 5
        // limits this loop); elsewhere the ranks of qlinear_core.h
        const __m512i w = vpexpandb ? _mm512_maskz_expandloadu_epi8(m, p[4 * g + i])
                                    : q::expand64(m, _mm512_loadu_si512(p[4 * g + i]), false);
        p[4 * g + i] += n;
        e[i] = _mm512_xor_si512(w, flip);
      }
      const __m512i lo01 = _mm512_unpacklo_epi8(e[0], e[1]), hi01 = _mm512_unpackhi_epi8(e[0], e[1]);
      const __m512i lo23 = _mm512_unpacklo_epi8(e[2], e[3]), hi23 = _mm512_unpackhi_epi8(e[2], e[3]);
      acc[0] = _mm512_dpbusd_epi32(acc[0], _mm512_unpacklo_epi16(lo01, lo23), xs[g]);
      acc[1] = _mm512_dpbusd_epi32(acc[1], _mm512_unpackhi_epi16(lo01, lo23), xs[g]);
      acc[2] = _mm512_dpbusd_epi32(acc[2], _mm512_unpacklo_epi16(hi01, hi23), xs[g]);
      acc[3] = _mm512_dpbusd_epi32(acc[3], _mm512_unpackhi_epi16(hi01, hi23), xs[g]);
    }
    for (int v = 0; v < 4; ++v) _mm512_storeu_si512(s + 16 * v, acc[v]);
  }
}
#elif SPARSEKIT_AVX2
// The same with 256-bit vectors, 32 outputs per step: 16 codes per bitmap word by the pshufb
// table of qlinear_core.h (reading 16 bytes, inside a safe block), and per 8 outputs
// vpmaddubsw of |w| by the input codes carrying w's sign (pairs of products at most
// 2 * 127 * 127: no 16-bit saturation), vpmaddwd into int32.
template <int N>
__attribute__((always_inline)) inline void add_qblock(int32_t* __restrict sums,
                                                      const uint16_t* const* b, int64_t words,
                                                      const int8_t* const* start,
                                                      const int32_t* groups, bool) {
  const int8_t* p[N];
  for (int i = 0; i < N; ++i) p[i] = start[i];
  __m256i xs[N / 4];
  for (int g = 0; g < N / 4; ++g) xs[g] = _mm256_set1_epi32(groups[g]);
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t k = 0; k < words; k += 2) {
    int32_t* s = sums + 16 * k;
    __m256i acc[4];
    for (int v = 0; v < 4; ++v) {
      acc[v] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + 8 * v));
    }
    for (int g = 0; g < N / 4; ++g) {
      __m256i e[4];
      for (int i = 0; i < 4; ++i) {
        const uint16_t* w = b[4 * g + i] + k;
        const __m128i lo = q::expand16(w[0], p[4 * g + i]);
        p[4 * g + i] += __builtin_popcount(w[0]);
        const __m128i hi = q::expand16(w[1], p[4 * g + i]);
        p[4 * g + i] += __builtin_popcount(w[1]);
        e[i] = _mm256_set_m128i(hi, lo);
      }
      const __m256i lo01 = _mm256_unpacklo_epi8(e[0], e[1]), hi01 = _mm256_unpackhi_epi8(e[0], e[1]);
      const __m256i lo23 = _mm256_unpacklo_epi8(e[2], e[3]), hi23 = _mm256_unpackhi_epi8(e[2], e[3]);
      const __m256i u[4] = {_mm256_unpacklo_epi16(lo01, lo23), _mm256_unpackhi_epi16(lo01, lo23),
                            _mm256_unpacklo_epi16(hi01, hi23), _mm256_unpackhi_epi16(hi01, hi23)};
      for (int v = 0; v < 4; ++v) {
        const __m256i pairs =
            _mm256_maddubs_epi16(_mm256_abs_epi8(u[v]), _mm256_sign_epi8(xs[g], u[v]));
        acc[v] = _mm256_add_epi32(acc[v], _mm256_madd_epi16(pairs, ones));
      }
    }
    for (int v = 0; v < 4; ++v) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(s + 8 * v), acc[v]);
    }
  }
}
#endif

// sums of one block += code * each set bit's weight of one column (at most `count`
// weights from p; the block's stored weights biased by kZero, as the vector path adds them),
// in sum_position order: the scalar path, and the vector one's for a block whose bits could
// promise more codes than `values` holds after it.
inline void add_qbits(int32_t* __restrict sums, const uint16_t* b, int64_t words,
                      const int8_t* p, int64_t count, int code) {
  const int8_t* const end = p + count;
  if (kQBiased) {
    for (int64_t o = 0; o < 16 * words; ++o) sums[o] += 128 * code;  // every weight biased
  }
  for (int64_t k = 0; k < words; ++k) {
    for (unsigned m = b[k]; m && p < end; m &= m - 1) {
      sums[sum_position(16 * k + __builtin_ctz(m))] += code * *p++;
    }
  }
}

// Blocks [b0, b1) of the N columns next[i] (their codes and bits) prefetched to L2.
template <int N>
__attribute__((always_inline)) inline void prefetch_runs(const ActBitmapGemvArgs& a,
                                                         const int8_t* values,
                                                         const int32_t* next, int64_t b0,
                                                         int64_t b1) {
  const int64_t words = a.block / 16;
  for (int i = 0; i < N; ++i) {
    const int32_t* o = a.offsets + next[i] * (a.nblocks + 1);
    const char* c = reinterpret_cast<const char*>(values + o[b0]);
    for (const char* const end = reinterpret_cast<const char*>(values + o[b1]); c < end; c += 64) {
      __builtin_prefetch(c, 0, 2);
    }
    const char* w = reinterpret_cast<const char*>(a.bits + (next[i] * a.nblocks + b0) * words);
    for (const char* const end = w + (b1 - b0) * words * 2; w < end; w += 64) {
      __builtin_prefetch(w, 0, 2);
    }
  }
}

// sums (every block) += the kept columns [k0, k1): each column's codes times its inputs'
// code, in sum_position order, kQColumns columns a pass, kQSpan blocks at a time.
inline void add_qcolumns(const ActBitmapQGemvArgs& q, int64_t k0, int64_t k1, int32_t* sums) {
  const ActBitmapGemvArgs& a = q.a;
  const auto* values = static_cast<const int8_t*>(a.values);
  const int64_t words = a.block / 16;
#if SPARSEKIT_AVX512 || SPARSEKIT_AVX2
  static const uint16_t kNoBits[kQSpan * 4096 / 16] = {};  // a padding column: no weights
  for (int64_t k = k0; k < k1; k += kQColumns) {
    const int n = static_cast<int>(std::min<int64_t>(kQColumns, k1 - k));
    const int32_t* off[kQColumns];
    const uint16_t* bits[kQColumns];
    int32_t groups[kQColumns / 4] = {};
    for (int i = 0; i < kQColumns; ++i) {
      const int64_t j = i < n ? a.idx[k + i] : 0;
      off[i] = a.offsets + j * (a.nblocks + 1);
      bits[i] = i < n ? a.bits + j * a.nblocks * words : nullptr;
      const int32_t c = i < n ? q.codes[k + i] : 0;
      groups[i / 4] |= static_cast<int32_t>(static_cast<uint32_t>(c & 0xFF) << (8 * (i % 4)));
    }
    const int32_t* next =
        k + (kAhead + 1) * kQColumns <= k1 ? a.idx + k + kAhead * kQColumns : nullptr;
    for (int64_t b0 = 0; b0 < a.nblocks; b0 += kQSpan) {
      const int64_t b1 = std::min(a.nblocks, b0 + kQSpan);
      if (next) prefetch_runs<kQColumns>(a, values, next, b0, b1);
      const int8_t* p[kQColumns];
      const uint16_t* b[kQColumns];
      // a block's bits move p by at most `block` codes, whatever the offsets say (a forged
      // bitmap may hold more bits than they count): the span reads inside `values` if it
      // starts at least `block` codes per block of it before their end
      bool safe = true;
      for (int i = 0; i < kQColumns; ++i) {
        p[i] = values + off[i][b0];
        b[i] = bits[i] ? bits[i] + b0 * words : kNoBits;
        safe &= !bits[i] || off[i][b0] <= a.stored - (b1 - b0) * a.block;
      }
      int32_t* s = sums + b0 * a.block;
      const int64_t span_words = (b1 - b0) * words;
      if (!safe) {
        for (int64_t blk = b0; blk < b1; ++blk) {
          for (int i = 0; i < n; ++i) {
            add_qbits(sums + blk * a.block, bits[i] + blk * words, words, values + off[i][blk],
                      off[i][blk + 1] - off[i][blk], q.codes[k + i]);
          }
        }
      } else if (n > 4) {
        add_qblock<8>(s, b, span_words, p, groups, a.vpexpand);
      } else {
        add_qblock<4>(s, b, span_words, p, groups, a.vpexpand);
      }
    }
  }
#else
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t j = a.idx[k];
    const int32_t* off = a.offsets + j * (a.nblocks + 1);
    const uint16_t* bits = a.bits + j * a.nblocks * words;
    for (int64_t blk = 0; blk < a.nblocks; ++blk) {
      add_qbits(sums + blk * a.block, bits + blk * words, words, values + off[blk],
                off[blk + 1] - off[blk], q.codes[k]);
    }
  }
#endif
}

#if SPARSEKIT_AVX512
#pragma GCC pop_options
#endif

}  // namespace sparsekit::SPARSEKIT_ISA::act

namespace sparsekit::SPARSEKIT_ISA {

// Each thread adds its share of the kept columns, whole columns, into its own int32 sums
// (act::share_kept with the whole layer as one tile), then finishes a share of the output
// blocks from every thread's sums: y = (sum - the biased weights' share) * sx, * scale
// (+ bias), as the W8A8 ops finish their rows. Whole columns, not a share of every column's
// blocks: a thread then reads each kept column as one run, and reading half of the columns
// ran 1.15-1.3x faster so than by halves of columns (pure loads, 128 MB of 1.3-7 KB columns,
// half of them, two threads, Intel Xeon).
inline void act_bitmap_qgemv(const ActBitmapQGemvArgs& q) {
  const ActBitmapGemvArgs& a = q.a;
  const int32_t correction = act::kQBiased ? 128 * q.code_sum : 0;
  std::vector<int32_t*> parts(std::max(1, a.threads));  // each thread's sums
  act::with_bias(a.bias_bf16, a.bias, [&](auto bias) {
#pragma omp parallel num_threads(a.threads) if (a.threads > 1)
    act::share_kept(
        a.kept, a.nblocks, a.nblocks, a.block, parts.data(),
        [&](int64_t k0, int64_t k1, int64_t, int64_t, int32_t* sums) {
          act::add_qcolumns(q, k0, k1, sums);
        },
        [&](int64_t b0, int64_t b1, const int32_t* const* sums, int count, int64_t) {
          const int64_t o0 = std::min(a.out, b0 * a.block), o1 = std::min(a.out, b1 * a.block);
          act::finish_qsums(sums, count, o0, o1, correction, q.sx, a.y);
          act::scale_add(a.y + o0, a.scale + o0, bias ? bias + o0 : nullptr, o1 - o0);
        });
  });
}

}  // namespace sparsekit::SPARSEKIT_ISA
