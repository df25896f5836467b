// The W8A8 bitmap-column GEMV core (see act_bitmap_gemv.cpp for the op
// act_bitmap_qgemv), compiled once per instruction set (cores_impl.h, after qlinear_core.h,
// whose byte expansion it uses, and act_bitmap_gemv_core.h, whose tiles and prefetch it
// shares): the kept inputs of the row come quantized to int8 codes (the op does that), and
// each output's sum over the kept columns is an exact int32 integer dot product.
//
// Why: act_bitmap_gemv's int8 values with float inputs widen every expanded code to a
// float and FMA it, 13 vector instructions per 64 weights of a kept column (a vpexpandb,
// four vpermb, four conversions, four FMAs); that made it compute-bound (5.0 ms of work
// over the 28 weights of the 2048x5632x4 LLaMA at 50 % x 50 %, whose bytes take 2.1 ms at
// the copy bandwidth), so TEAL gained little on int8 weights. Here four kept columns share
// one vpdpbusd per 16 outputs: their 64-output expansions are interleaved byte by byte into
// the 32-bit lanes of their outputs (eight unpacks for four columns), so 64 weights of a
// column cost 5 instructions.
//
// - AVX-512 (with VNNI, VBMI, VBMI2, BITALG; qcores()): the weights are the unsigned operand
//   of vpdpbusd, biased by 128 (an XOR of the expanded bytes: a missing weight becomes 128,
//   code 0), the input codes the signed one, and 128 times the sum of the input codes is
//   subtracted from every output at the end. The unpacks interleave within 128-bit lanes,
//   so the sums of a 64-output chunk are kept in the order of sum_position.
// - every other instruction set: plain int32 loops over the set bits (correct, not fast:
//   the autotuner then keeps the weight-only formats there).
// Every sum is exact: at most in_features * 127 * 127 in magnitude (the op checks
// in_features <= 65536, as the W8A8 ops do).

namespace sparsekit::SPARSEKIT_ISA::act {

#if SPARSEKIT_AVX512
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,popcnt,bmi,bmi2,avx512vnni,avx512vbmi,avx512vbmi2,avx512bitalg")
constexpr bool kQPermuted = true;
#else
constexpr bool kQPermuted = false;
#endif

// Where the int32 sums keep output o of a 64-output chunk: in output order, or (kQPermuted)
// where the unpacks put it: output 16 L + 4 k + d in lane 4 L + d of the k-th vector.
constexpr int64_t sum_position(int64_t o) {
  return kQPermuted ? (o & ~int64_t{63}) | (((o >> 2) & 3) << 4) | (((o >> 4) & 3) << 2) | (o & 3)
                    : o;
}

// Kept columns per pass over a block's sums: two groups of four.
constexpr int kQColumns = 8;

constexpr int kAhead = 2;

// Blocks [b0, b1) of the N columns next[i] (their values and bits) prefetched to L2.
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

#if SPARSEKIT_AVX512
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
#endif

// sums of one block += code * each set bit's weight of one column (at most `count`
// weights from p; the block's stored weights biased by kZero, as the vector path adds them),
// in sum_position order: the scalar path, and the vector one's for a block whose bits could
// promise more codes than `values` holds after it.
inline void add_qbits(int32_t* __restrict sums, const uint16_t* b, int64_t words,
                      const int8_t* p, int64_t count, int code) {
  const int8_t* const end = p + count;
  if (kQPermuted) {
    for (int64_t o = 0; o < 16 * words; ++o) sums[o] += 128 * code;  // every weight biased
  }
  for (int64_t k = 0; k < words; ++k) {
    for (unsigned m = b[k]; m && p < end; m &= m - 1) {
      sums[sum_position(16 * k + __builtin_ctz(m))] += code * *p++;
    }
  }
}

// sums (every block) += the kept columns [k0, k1): each column's codes times its inputs'
// code, in sum_position order.
inline void add_qcolumns(const ActBitmapQGemvArgs& q, int64_t k0, int64_t k1, int32_t* sums) {
  const ActBitmapGemvArgs& a = q.a;
  const auto* values = static_cast<const int8_t*>(a.values);
  const int64_t words = a.block / 16;
#if SPARSEKIT_AVX512
  static const uint16_t kNoBits[4096 / 16] = {};  // a padding column: no weights
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
    if (kAhead > 0 && k + (kAhead + 1) * kQColumns <= k1) {
      prefetch_runs<kQColumns>(a, values, a.idx + k + kAhead * kQColumns, 0, a.nblocks);
    }
    for (int64_t blk = 0; blk < a.nblocks; ++blk) {
      const int8_t* p[kQColumns];
      const uint16_t* b[kQColumns];
      bool safe = true;  // a block reads at most `block` codes: inside `values` from here
      for (int i = 0; i < kQColumns; ++i) {
        p[i] = values + off[i][blk];
        b[i] = bits[i] ? bits[i] + blk * words : kNoBits;
        safe &= !bits[i] || off[i][blk] <= a.stored - a.block;
      }
      int32_t* s = sums + blk * a.block;
      if (!safe) {
        for (int i = 0; i < n; ++i) {
          add_qbits(s, b[i], words, p[i], off[i][blk + 1] - off[i][blk], q.codes[k + i]);
        }
      } else if (n > 4) {
        add_qblock<8>(s, b, words, p, groups, a.vpexpand);
      } else {
        add_qblock<4>(s, b, words, p, groups, a.vpexpand);
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

// Each thread adds its share of the kept columns, whole columns, into its own sums, then
// finishes a share of the outputs from every thread's sums: y = (sum - the biased weights'
// share) * sx, * scale (+ bias), as the W8A8 ops finish their rows. Whole columns, not
// act_bitmap_gemv's share of every column's blocks: a thread then reads each kept column
// as one run, and reading half of the columns ran 1.15-1.3x faster so than by halves of
// columns (pure loads, 128 MB of 1.3-7 KB columns, half of them, two threads, Intel Xeon).
inline void act_bitmap_qgemv(const ActBitmapQGemvArgs& q) {
  const ActBitmapGemvArgs& a = q.a;
  const int64_t padded = a.nblocks * a.block;
  const int32_t correction = act::kQPermuted ? 128 * q.code_sum : 0;
  std::vector<const int32_t*> partial(a.threads);
  act::with_bias(a.bias_bf16, a.bias, [&](auto bias) {
#pragma omp parallel num_threads(a.threads) if (a.threads > 1)
    {
      const int t = omp_get_thread_num(), nt = omp_get_num_threads();
      auto* sums = reinterpret_cast<int32_t*>(workspace(padded));
      std::fill(sums, sums + padded, 0);
      act::add_qcolumns(q, a.kept * t / nt, a.kept * (t + 1) / nt, sums);
      partial[t] = sums;
#pragma omp barrier
      const int64_t lines = (a.out + 63) / 64;
      const int64_t o0 = std::min(a.out, lines * t / nt * 64);
      const int64_t o1 = std::min(a.out, lines * (t + 1) / nt * 64);
      for (int64_t o = o0; o < o1; ++o) {
        int32_t s = -correction;
        for (int u = 0; u < nt; ++u) s += partial[u][act::sum_position(o)];
        a.y[o] = static_cast<float>(s) * q.sx;
      }
      act::scale_add(a.y + o0, a.scale + o0, bias ? bias + o0 : nullptr, o1 - o0);
    }
  });
}

}  // namespace sparsekit::SPARSEKIT_ISA
