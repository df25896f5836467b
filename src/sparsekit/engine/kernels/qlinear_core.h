// The W8A8 kernel cores (see qlinear.cpp for the ops): y = sx[b] * sw[r] * sum_k qw[r, k] *
// qx[b, k] (+ bias[r]) for int8 weight codes qw with per-row scales sw, and input rows
// quantized here: qx[b] = round(x[b] / sx[b]) on the symmetric int8 grid of
// sparsekit.quantize (sx[b] = max |x[b]| / 127, 1 for an all-zero row; codes in [-127, 127],
// rounding half to even), so that the sums are exact int32 integer dot products. Compiled
// once per instruction set (cores_impl.h):
//
// - AVX-512 (with VNNI, VBMI, VBMI2 and BITALG): vpdpbusd multiplies unsigned by signed
//   bytes, 64 products per instruction. The codes are stored biased, qx + 128 in [1, 255],
//   and the row sum of the weights times 128 (one more vpdpbusd per weight vector, shared by
//   every input row) is subtracted. Bitmap rows expand 64 packed codes by 64 bits of the
//   bitmap with one vpermb by the ranks of the set bits (ranks64), or with one vpexpandb
//   where the bitmap expansion is "vpexpand" (BitmapArgs::vpexpand; isa.cpp: the default on
//   Intel and AMD Zen 4; on Zen 4 the rows of 1-2 input rows take two 256-bit vpexpandb:
//   Bitmap::add_halves); N:M rows pick each value's input code with vpermi2b from
//   the fields spread to bytes by vpmultishiftqb.
// - AVX2: vpmaddubsw with the sign trick: |w| (unsigned, at most 128) times sign(w) * qx
//   (signed, at most 127 in magnitude), so a pair of products is at most 2 * 128 * 127 =
//   32512 and the 16-bit sums never saturate; vpmaddwd then widens them to int32. Bitmap
//   rows expand 8 codes per bitmap byte with a table of pshufb masks; 2:4 and 4:8 rows pick
//   each value's input code with pshufb (no gathers: slow on AMD Zen 3).
// - scalar (and the tails of the others): plain int32 loops.
// Every sum is exact for in_features <= 65536 (checked by the ops).

#include "qlinear.h"

namespace sparsekit::SPARSEKIT_ISA::q {

#if SPARSEKIT_AVX512
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,popcnt,bmi,bmi2,avx512vnni,avx512vbmi,avx512vbmi2,avx512bitalg")
constexpr bool kBiased = true;  // codes stored as qx + 128 (unsigned operand of vpdpbusd)
constexpr int kMaxNB = 8;       // input rows per pass over a weight row
#elif SPARSEKIT_AVX2
constexpr bool kBiased = false;
constexpr int kMaxNB = 4;
#else
constexpr bool kBiased = false;
constexpr int kMaxNB = 4;
#endif
constexpr int kZero = kBiased ? 128 : 0;  // the stored byte of code 0
constexpr int64_t kTileRows = 8;  // weight rows run together against each block of inputs

// The signed code of a stored byte.
inline int code(uint8_t stored) {
  return kBiased ? static_cast<int>(stored) - 128 : static_cast<int>(static_cast<int8_t>(stored));
}

// Round to nearest (half to even: the default rounding mode), clamp, store.
inline uint8_t store_code(float t) {
  t = __builtin_nearbyintf(t);
  t = t < -127.f ? -127.f : (t > 127.f ? 127.f : t);
  return static_cast<uint8_t>(static_cast<int>(t) + kZero);
}

// max |x[k]| over n inputs: NaN if one is NaN (infinite if one is infinite).
inline float abs_max(const float* x, int64_t n) {
  int64_t k = 0;
  float amax = 0.f;
#if SPARSEKIT_AVX512
  __m512 m = _mm512_setzero_ps();
  __mmask16 nan = 0;
  for (; k + 16 <= n; k += 16) {
    const __m512 v = _mm512_loadu_ps(x + k);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    m = _mm512_max_ps(m, _mm512_abs_ps(v));
  }
  amax = nan ? __builtin_nanf("") : _mm512_reduce_max_ps(m);
#endif
  for (; k < n; ++k) {
    const float a = __builtin_fabsf(x[k]);
    amax = (a > amax || a != a) ? a : amax;  // NaN, once seen, stays
  }
  return amax;
}

// Quantizes x (n inputs) into q (ld bytes, stored codes; zero codes beyond n); returns the
// row's scale sx. A row with a NaN or infinite input has no int8 grid: its codes are zero
// and its scale NaN, so that every output of the row is NaN on every instruction set, as
// F.linear's would be NaN (or infinite) there.
inline float quantize_row(const float* x, int64_t n, uint8_t* q, int64_t ld) {
  const float amax = abs_max(x, n);
  if (!__builtin_isfinite(amax)) {
    std::memset(q, kZero, ld);
    return __builtin_nanf("");
  }
  const float s = amax > 0.f ? amax / 127.f : 1.f;
  int64_t k = 0;
#if SPARSEKIT_AVX512
  const __m512 sv = _mm512_set1_ps(s), lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
  for (; k + 16 <= n; k += 16) {
    __m512 t = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(x + k), sv),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    t = _mm512_min_ps(_mm512_max_ps(t, lo), hi);
    const __m512i c = _mm512_add_epi32(_mm512_cvtps_epi32(t), _mm512_set1_epi32(kZero));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm512_cvtepi32_epi8(c));
  }
#endif
  for (; k < n; ++k) q[k] = store_code(x[k] / s);
  std::memset(q + n, kZero, ld - n);
  return s;
}

#if SPARSEKIT_AVX512
inline __m512i bias128() { return _mm512_set1_epi8(static_cast<char>(0x80)); }

// The rank of bit i of a 64-bit bitmap m among its set bits (how many set bits lie below
// it), as byte i of a vector: a vpermb by these ranks, masked by m, expands popcount(m)
// packed bytes into the lanes of m's set bits. Byte i is the count of set bits in the bytes
// of m below byte i / 8 plus those of byte i / 8 below bit i % 8: vpermb spreads each byte of
// m (and its count) to its 8 lanes, vpopcntb counts the bits below each lane (kBitsBelow).
// The counts of the bytes below each byte come from vector registers (ranks64: vpopcntb,
// vpmullq) or general-purpose ones (ranks64_scalar_counts: a SWAR popcount per byte),
// whichever leaves the loop's busier units free: the W8A8 GEMV ran 1.05x faster with the
// first and the float-input one (busy with conversions and FMAs) 1.1x faster with the second
// on AMD Zen 4 (11008x4096 at 50-90%, one thread). vpexpandb does the whole expansion in one
// instruction; it ran the GEMVs 1.3-2.7x slower on AMD Zen 5, and on Zen 4 first 1.3x
// slower, later (session 29, weights from memory) 1.06-1.3x faster, so Zen 4 now takes it
// for int8 codes (isa.cpp).
alignas(64) inline constexpr uint8_t kByteOfLane[64] = {  // lane i: byte i / 8 of a qword
    0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3,
    4, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7};
alignas(64) inline constexpr uint8_t kBitsBelow[64] = {  // lane i: the bits below bit i % 8
    0, 1, 3, 7, 15, 31, 63, 127, 0, 1, 3, 7, 15, 31, 63, 127, 0, 1, 3, 7, 15, 31, 63, 127,
    0, 1, 3, 7, 15, 31, 63, 127, 0, 1, 3, 7, 15, 31, 63, 127, 0, 1, 3, 7, 15, 31, 63, 127,
    0, 1, 3, 7, 15, 31, 63, 127, 0, 1, 3, 7, 15, 31, 63, 127};

// The ranks from `own` (lane i: byte i / 8 of m) and `lower` (lane i: the set bits of the
// bytes below it).
inline __m512i ranks64_from(__m512i own, __m512i lower) {
  return _mm512_add_epi8(
      lower, _mm512_popcnt_epi8(_mm512_and_si512(own, _mm512_load_si512(kBitsBelow))));
}

inline __m512i ranks64(uint64_t m) {
  const __m512i bits = _mm512_set1_epi64(static_cast<int64_t>(m));
  const __m512i lower = _mm512_slli_epi64(  // in each qword: the set bits in the lower bytes
      _mm512_mullo_epi64(_mm512_popcnt_epi8(bits), _mm512_set1_epi64(0x0101010101010101LL)), 8);
  const __m512i sel = _mm512_load_si512(kByteOfLane);
  return ranks64_from(_mm512_permutexvar_epi8(sel, bits), _mm512_permutexvar_epi8(sel, lower));
}

inline __m512i ranks64_scalar_counts(uint64_t m) {
  uint64_t c = m - ((m >> 1) & 0x5555555555555555ULL);  // the set bits of each byte
  c = (c & 0x3333333333333333ULL) + ((c >> 2) & 0x3333333333333333ULL);
  c = (c + (c >> 4)) & 0x0F0F0F0F0F0F0F0FULL;
  const uint64_t lower = (c * 0x0101010101010101ULL) << 8;  // in the bytes below each byte
  const __m512i both = _mm512_castsi128_si512(  // m in bytes 0-7, lower in bytes 8-15
      _mm_set_epi64x(static_cast<int64_t>(lower), static_cast<int64_t>(m)));
  const __m512i sel = _mm512_load_si512(kByteOfLane);
  return ranks64_from(_mm512_permutexvar_epi8(sel, both),
                      _mm512_permutexvar_epi8(_mm512_add_epi8(sel, _mm512_set1_epi8(8)), both));
}

// The codes of the bits m (4 bitmap words), packed from byte 0 of `codes`, in the lanes of
// their inputs (zeros where a bit is clear): by vpexpandb where `vpexpandb` (the bitmap
// expansion "vpexpand", isa.cpp), else by a vpermb by the ranks of the set bits (ranks64).
// On Intel (Granite Rapids) vpexpandb ran the W8A8 bitmap rows 1.2-1.7x faster at batch 1-4
// and the float-input int8 GEMV 1.3-1.5x faster (11008x4096 and 4096x4096 at 50 and 70 %,
// one thread); on AMD Zen 4 it is faster too, on Zen 5 the slower one (see ranks64).
inline __m512i expand64(uint64_t m, __m512i codes, bool vpexpandb) {
  return vpexpandb ? _mm512_maskz_expand_epi8(m, codes)
                   : _mm512_maskz_permutexvar_epi8(m, ranks64(m), codes);
}
#elif SPARSEKIT_AVX2
// acc += the int32 sums of 4 products |w| * (sign(w) * x) per lane (no 16-bit saturation:
// see the header comment).
inline __m256i dot32(__m256i acc, __m256i wabs, __m256i w, __m256i x) {
  const __m256i pairs = _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(x, w));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}
inline int32_t hsum8i(__m256i v) {
  const __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  const __m128i t = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1)));
}
#endif

// A dense weight of int8 codes (rows, cols).
struct Dense {
  const int8_t* w;
  int64_t rows, cols;

  int64_t work(int64_t r) const { return r * cols; }
  int64_t span() const { return cols; }  // inputs a row reads

  // out[b] = sum_k w[r, k] * qx[b, k] for NB input rows of stored codes (leading dim ld).
  template <int NB>
  void dots(int64_t r, const uint8_t* x, int64_t ld, int32_t* out) const {
    const int8_t* wr = w + r * cols;
    int64_t k = 0;
    int32_t sum[NB] = {};
#if SPARSEKIT_AVX512
    __m512i acc[NB], corr = _mm512_setzero_si512();
    for (int b = 0; b < NB; ++b) acc[b] = _mm512_setzero_si512();
    for (; k + 64 <= cols; k += 64) {
      prefetch_ahead(wr + k);
      const __m512i wv = _mm512_loadu_si512(wr + k);
      corr = _mm512_dpbusd_epi32(corr, bias128(), wv);
      for (int b = 0; b < NB; ++b) {
        acc[b] = _mm512_dpbusd_epi32(acc[b], _mm512_loadu_si512(x + b * ld + k), wv);
      }
    }
    if (k < cols) {  // the last partial vector: x is padded, W is not
      const __mmask64 m = (~0ULL) >> (64 - (cols - k));
      const __m512i wv = _mm512_maskz_loadu_epi8(m, wr + k);
      corr = _mm512_dpbusd_epi32(corr, bias128(), wv);
      for (int b = 0; b < NB; ++b) {
        acc[b] = _mm512_dpbusd_epi32(acc[b], _mm512_loadu_si512(x + b * ld + k), wv);
      }
      k = cols;
    }
    const int32_t c = _mm512_reduce_add_epi32(corr);
    for (int b = 0; b < NB; ++b) sum[b] = _mm512_reduce_add_epi32(acc[b]) - c;
#elif SPARSEKIT_AVX2
    __m256i acc[NB];
    for (int b = 0; b < NB; ++b) acc[b] = _mm256_setzero_si256();
    for (; k + 32 <= cols; k += 32) {
      prefetch_ahead(wr + k);
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + k));
      const __m256i wa = _mm256_abs_epi8(wv);
      for (int b = 0; b < NB; ++b) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + b * ld + k));
        acc[b] = dot32(acc[b], wa, wv, xv);
      }
    }
    for (int b = 0; b < NB; ++b) sum[b] = hsum8i(acc[b]);
#endif
    for (; k < cols; ++k) {
      for (int b = 0; b < NB; ++b) sum[b] += wr[k] * code(x[b * ld + k]);
    }
    for (int b = 0; b < NB; ++b) out[b] = sum[b];
  }
};

#if SPARSEKIT_AVX2 && !SPARSEKIT_AVX512
// The 16 codes of bitmap word `bits` in their lanes (zero elsewhere), from the packed codes
// at p (reads 16 bytes): bitmap_core.h's expansion, which moves its own pointer.
inline __m128i expand16(unsigned bits, const int8_t* p) { return rows::expand16_codes(bits, p); }
#endif

// Bitmap rows of int8 codes: `words` 16-bit words of bits per row, the codes of the set bits
// packed row by row, int32 row pointers.
struct Bitmap {
  const int8_t* v;
  const uint16_t* bits;
  const int32_t* rowptr;
  int64_t rows, cols, words;
#if SPARSEKIT_AVX512
  bool vpexpandb;  // expand64's instruction (BitmapArgs::vpexpand)
  bool halves;     // vpexpandb by 256-bit halves at batch 1-2 (BitmapArgs::vpexpand_halves)
#endif

  int64_t work(int64_t r) const { return rowptr[r] + 2 * r * words; }  // bytes
  int64_t span() const { return words * 16; }

#if SPARSEKIT_AVX512
  // Input rows up to which `halves` applies: from 3 on the dot products, not the
  // expansions, bound the rows (halves ran 1.22-1.28x faster at 1 input row, 1.08-1.15x at
  // 2, 0.87-0.93x at 3: 11008x4096 and 5632x2048 at 50 % and 30 % density, two threads).
  static constexpr int kHalvesUpTo = 2;

  // acc[j], corr += the words from k on, 128 inputs a step while the step's codes lie inside
  // the array, each 64 expanded as two 256-bit halves with 256-bit dot products (`halves`);
  // moves p and k past them.
  template <int NB>
  __attribute__((always_inline)) void add_halves(const int8_t*& at, const uint16_t* b,
                                                 int64_t& from, const int8_t* end,
                                                 const uint8_t* x, int64_t ld, __m512i* acc,
                                                 __m512i& corr) const {
    const int8_t* p = at;
    int64_t k = from;
    const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
    __m256i sums[2][NB], c[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
    for (int h = 0; h < 2; ++h) {
      for (int j = 0; j < NB; ++j) sums[h][j] = _mm256_setzero_si256();
    }
    for (; k + 8 <= words && end - p >= 128; k += 8) {
      prefetch_ahead(p);
      for (int u = 0; u < 2; ++u) {  // 64 inputs
        uint64_t m;
        __builtin_memcpy(&m, b + k + 4 * u, sizeof m);
        __m256i e[2];
        for (int h = 0; h < 2; ++h) {  // 32 inputs
          const uint32_t half = static_cast<uint32_t>(m >> (32 * h));
          e[h] = _mm256_maskz_expand_epi8(half,
                                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
          p += __builtin_popcount(half);
          c[h] = _mm256_dpbusd_epi32(c[h], flip, e[h]);
          for (int j = 0; j < NB; ++j) {
            const auto* xs = reinterpret_cast<const __m256i*>(x + j * ld + 16 * (k + 4 * u));
            sums[h][j] = _mm256_dpbusd_epi32(sums[h][j], _mm256_loadu_si256(xs + h), e[h]);
          }
        }
      }
    }
    at = p;
    from = k;
    corr = _mm512_add_epi32(corr, _mm512_inserti64x4(_mm512_castsi256_si512(c[0]), c[1], 1));
    for (int j = 0; j < NB; ++j) {
      acc[j] = _mm512_add_epi32(
          acc[j], _mm512_inserti64x4(_mm512_castsi256_si512(sums[0][j]), sums[1][j], 1));
    }
  }
#endif

#if SPARSEKIT_AVX512
  // Input rows up to which add_two_chains runs: one row's sums are one chain of vpdpbusd
  // (5 cycles each) per 64 inputs, which bounds a 512-bit row where the bytes do not; from
  // 3 rows their chains already overlap. Two alternating sets ran the 16 W8A8 decode layers
  // of the 2048/5632 LLaMA at 50 % 0.81-0.97x the time of one set (Intel Xeon, Emerald
  // Rapids class, two threads, one process taking turns: 0.81 with the weights in its L3,
  // 0.95-0.97 from memory); four sets ran 1.13-1.18x slower (one thread).
  static constexpr int kTwoChainsUpTo = 2;

  // acc[j], corr += the 64 inputs of words [k, k + 4), their codes at p (whole 64-byte
  // loads: the caller keeps them inside the array), which moves past them.
  template <int NB>
  __attribute__((always_inline)) void add64(const int8_t*& p, const uint16_t* b, int64_t k,
                                            const uint8_t* x, int64_t ld, __m512i* acc,
                                            __m512i& corr) const {
    uint64_t m;
    __builtin_memcpy(&m, b + k, sizeof m);  // 4 words: the bits of 64 inputs
    const __m512i wv = expand64(m, _mm512_loadu_si512(p), vpexpandb);
    p += __builtin_popcountll(m);
    corr = _mm512_dpbusd_epi32(corr, bias128(), wv);
    for (int j = 0; j < NB; ++j) {
      acc[j] = _mm512_dpbusd_epi32(acc[j], _mm512_loadu_si512(x + j * ld + 16 * k), wv);
    }
  }

  // acc[j], corr += the words from k on, 128 inputs a step while the step's codes lie
  // inside the array, by two sets of sums that take turns per 64 inputs (add64); moves p
  // and k past them.
  template <int NB>
  __attribute__((always_inline)) void add_two_chains(const int8_t*& at, const uint16_t* b,
                                                     int64_t& from, const int8_t* end,
                                                     const uint8_t* x, int64_t ld,
                                                     __m512i* acc, __m512i& corr) const {
    const int8_t* p = at;
    int64_t k = from;
    __m512i sums[2][NB], c[2] = {corr, _mm512_setzero_si512()};
    for (int j = 0; j < NB; ++j) {
      sums[0][j] = acc[j];
      sums[1][j] = _mm512_setzero_si512();
    }
    for (; k + 8 <= words && end - p >= 128; k += 8) {
      prefetch_ahead(p);
      for (int u = 0; u < 2; ++u) add64<NB>(p, b, k + 4 * u, x, ld, sums[u], c[u]);
    }
    at = p;
    from = k;
    corr = _mm512_add_epi32(c[0], c[1]);
    for (int j = 0; j < NB; ++j) acc[j] = _mm512_add_epi32(sums[0][j], sums[1][j]);
  }
#endif

  template <int NB>
  void dots(int64_t r, const uint8_t* x, int64_t ld, int32_t* out) const {
    const int8_t* p = v + rowptr[r];
    const uint16_t* b = bits + r * words;
    int64_t k = 0;  // bitmap word
    int32_t sum[NB] = {};
#if SPARSEKIT_AVX2
    const int8_t* const end = v + rowptr[rows];  // whole loads stay inside the array
#endif
#if SPARSEKIT_AVX512
    __m512i acc[NB], corr = _mm512_setzero_si512();
    for (int j = 0; j < NB; ++j) acc[j] = _mm512_setzero_si512();
    if constexpr (NB <= kHalvesUpTo) {
      if (vpexpandb && halves) add_halves<NB>(p, b, k, end, x, ld, acc, corr);
    }
    if constexpr (NB <= kTwoChainsUpTo) add_two_chains<NB>(p, b, k, end, x, ld, acc, corr);
    for (; k + 4 <= words && end - p >= 64; k += 4) {
      prefetch_ahead(p);
      add64<NB>(p, b, k, x, ld, acc, corr);
    }
    const int32_t c = _mm512_reduce_add_epi32(corr);
    for (int j = 0; j < NB; ++j) sum[j] = _mm512_reduce_add_epi32(acc[j]) - c;
#elif SPARSEKIT_AVX2
    __m256i acc[NB];
    for (int j = 0; j < NB; ++j) acc[j] = _mm256_setzero_si256();
    // The codes kPrefetchBytes ahead, every step, as the float-input AVX2 rows do: without
    // it the hardware prefetchers alone left this compute-heavy loop's misses unhidden, and
    // a cold 5632x2048 layer at 50 % took 0.63-0.78 ms instead of 0.45-0.49 (70 %: 0.48-0.58
    // against 0.42-0.47; Intel Xeon on its AVX2 path, two threads, interleaved in one
    // process), slower than the dense W8A8 rows it now beats.
    const auto step = [&] {
      prefetch_ahead(p);
      const __m128i lo = expand16(b[k], p);
      p += __builtin_popcount(b[k]);
      const __m128i hi = expand16(b[k + 1], p);
      p += __builtin_popcount(b[k + 1]);
      const __m256i wv = _mm256_set_m128i(hi, lo);
      const __m256i wa = _mm256_abs_epi8(wv);
      for (int j = 0; j < NB; ++j) {
        const __m256i xv =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + j * ld + 16 * k));
        acc[j] = dot32(acc[j], wa, wv, xv);
      }
    };
    // Two words read at most 32 codes from p, which stays within the row: a row with 32
    // codes after it in the array runs its whole words without checking p each step.
    if (end - (v + rowptr[r + 1]) >= 32) {
      for (; k + 2 <= words; k += 2) step();
    } else {
      for (; k + 2 <= words && end - p >= 32; k += 2) step();
    }
    for (int j = 0; j < NB; ++j) sum[j] = hsum8i(acc[j]);
#endif
    for (; k < words; ++k) {
      for (unsigned m = b[k]; m; m &= m - 1) {
        const int64_t i = 16 * k + __builtin_ctz(m);
        const int w = *p++;
        for (int j = 0; j < NB; ++j) sum[j] += w * code(x[j * ld + i]);
      }
    }
    for (int j = 0; j < NB; ++j) out[j] = sum[j];
  }

  // Row r's codes in the lanes of their inputs, zeros elsewhere, into dense (span() bytes):
  // a batch of more than kMaxNB input rows runs against this once-expanded row instead of
  // expanding the row again for every kMaxNB of them.
  // Prefetched as the row dots are: a batch of 8 rows on 11008x4096 at 50 %, cold, ran
  // 1.2x faster with it (AVX2 5.18 -> 4.36 ms, AVX-512 1.54 -> 1.22; Intel Xeon, two
  // threads, interleaved in one process).
  void expand(int64_t r, int8_t* dense) const {
    const int8_t* p = v + rowptr[r];
    const uint16_t* b = bits + r * words;
    int64_t k = 0;
#if SPARSEKIT_AVX2
    const int8_t* const end = v + rowptr[rows];  // whole loads stay inside the array
#endif
#if SPARSEKIT_AVX512
    for (; k + 4 <= words && end - p >= 64; k += 4) {
      uint64_t m;
      __builtin_memcpy(&m, b + k, sizeof m);
      prefetch_ahead(p);
      _mm512_storeu_si512(dense + 16 * k, expand64(m, _mm512_loadu_si512(p), vpexpandb));
      p += __builtin_popcountll(m);
    }
#elif SPARSEKIT_AVX2
    for (; k < words && end - p >= 16; ++k) {
      prefetch_ahead(p);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dense + 16 * k), expand16(b[k], p));
      p += __builtin_popcount(b[k]);
    }
#endif
    std::memset(dense + 16 * k, 0, 16 * (words - k));
    for (; k < words; ++k) {
      for (unsigned m = b[k]; m; m &= m - 1) dense[16 * k + __builtin_ctz(m)] = *p++;
    }
  }
};

#if SPARSEKIT_AVX512
// Byte 4j + 3 of group g's vector is byte 16g + j of an expanded vector (the other bytes are
// zeroed by kTopBytesMask): one vpermb puts 16 expanded codes in the top bytes of 16 int32
// lanes, code * 2^24, which vcvtdq2ps turns into floats exactly.
struct TopBytes {
  uint8_t index[4][64];
};

constexpr TopBytes make_top_bytes() {
  TopBytes t{};
  for (int g = 0; g < 4; ++g) {
    for (int j = 0; j < 16; ++j) t.index[g][4 * j + 3] = static_cast<uint8_t>(16 * g + j);
  }
  return t;
}

alignas(64) inline constexpr TopBytes kTopBytes = make_top_bytes();
constexpr __mmask64 kTopBytesMask = 0x8888888888888888ULL;

// Bitmap rows of int8 codes times float inputs (the bitmap_linear op's int8 values): the
// float cores' rows::Bitmap<int8_t> with a GEMV row that expands 64 codes at a time with this
// instruction set's byte permutes (expand64), 1.3x faster on AMD Zen 5 than 16 codes per
// pshufb (bitmap_core.h), whose controls come from general-purpose registers. Each 16 of
// them become floats by one vpermb into the top bytes of int32 lanes (kTopBytes) and one
// conversion, where a vextracti32x4 and a vpmovsxbd did it before: 1.1x faster on AMD Zen 4
// (11008x4096 at 50-90%, one thread). dot() takes x times kInputScale = 2^-24, so that its
// products, codes times 2^24 times these inputs, are exactly the codes times x (inputs
// below 2^-102 in magnitude lose bits to underflow); decode(), for larger batches, takes x
// as it is. Where BitmapArgs::vpexpand, vpexpandb expands the codes instead.
struct BitmapFloat : rows::Bitmap<int8_t> {
  static constexpr float kInputScale = 0x1p-24f;
  bool vpexpandb;  // the expanding instruction (BitmapArgs::vpexpand)

  float dot(int64_t r, const float* x) const {
    const int8_t* p = v + rowptr[r];
    return _mm512_reduce_add_ps(span_vec(p, bits + r * words, 0, words, x));
  }

  // rows::Bitmap::dot_groups with this instruction set's spans (an always-inlined span
  // cannot be inlined into code compiled for fewer instruction sets).
  float dot_groups(int64_t r, const float* x, const float* s, int64_t size) const {
    const int8_t* p = v + rowptr[r];
    const uint16_t* b = bits + r * words;
    const int64_t gw = size / 16;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t g = 0; g * gw < words; ++g) {
      acc = _mm512_fmadd_ps(span_vec(p, b, g * gw, (g + 1) * gw, x), _mm512_set1_ps(s[g]), acc);
    }
    return _mm512_reduce_add_ps(acc);
  }

  // The products of words [k, k1) of a row (bits b) whose codes start at p, which moves past
  // them, summed but for the horizontal sum (dot_groups scales one per group of inputs).
  __attribute__((always_inline)) __m512 span_vec(const int8_t*& p, const uint16_t* b,
                                                 int64_t k, int64_t k1, const float* x) const {
    const int8_t* const end = v + rowptr[rows];  // whole loads stay inside the array
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                     _mm512_setzero_ps()};
    // x[0:64] times the 64 inputs' codes, expanded from `codes` by their bits m
    const auto step = [this, &acc](uint64_t m, __m512i codes, const float* xs) {
      // codes in a register: folded into vpexpandb as an expand-load from memory (where
      // the loop was unswitched on vpexpandb) they ran it 1.5x slower on AMD Zen 4
      asm("" : "+v"(codes));
      const __m512i e = vpexpandb
          ? _mm512_maskz_expand_epi8(m, codes)
          : _mm512_maskz_permutexvar_epi8(m, ranks64_scalar_counts(m), codes);
      for (int g = 0; g < 4; ++g) {
        const __m512i top = _mm512_maskz_permutexvar_epi8(
            kTopBytesMask, _mm512_load_si512(kTopBytes.index[g]), e);
        acc[g] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(top), _mm512_loadu_ps(xs + 16 * g), acc[g]);
      }
    };
    for (; k + 4 <= k1 && end - p >= 64; k += 4) {
      prefetch_ahead(p);
      uint64_t m;
      __builtin_memcpy(&m, b + k, sizeof m);  // 4 words: the bits of 64 inputs
      step(m, _mm512_loadu_si512(p), x + 16 * k);
      p += __builtin_popcountll(m);
    }
    for (; k < k1; k += 4) {  // the last words (or codes): masked loads
      uint64_t m = 0;
      __builtin_memcpy(&m, b + k, std::min<int64_t>(4, k1 - k) * sizeof(uint16_t));
      const int64_t n = __builtin_popcountll(m);
      step(m, _mm512_maskz_loadu_epi8(_bzhi_u64(~0ULL, n), p), x + 16 * k);
      p += n;
    }
    return _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
  }
};
#endif

// Packed N:M rows of int8 codes: `width` codes per row, fbits-bit fields naming each one's
// input within its group of m, 16 fields per fbits / 2 32-bit words.
struct NM {
  const int8_t* v;
  const uint32_t* idx;
  int64_t rows, cols, n, m, fbits, width, words;

  NM(const NMArgs& a)
      : v(static_cast<const int8_t*>(a.values)), idx(a.idx), rows(a.io.rows), cols(a.io.cols),
        n(a.n), m(a.m), fbits(a.fbits), width(a.width), words(a.words)
#if SPARSEKIT_AVX512
        , fields(*this)
#endif
  {
#if SPARSEKIT_AVX2 && !SPARSEKIT_AVX512
    for (int j = 0; j < 32; ++j) first[j] = static_cast<uint8_t>(j % 16 / n * m);
#endif
  }

  int64_t work(int64_t r) const { return r * width; }
  // Inputs the rows read: whole windows of 64 values (the vector code reads whole windows).
  int64_t span() const { return (width + 63) / 64 * (64 / n * m); }

  int64_t col(const uint32_t* q, int64_t k) const {  // the float cores' (nm_core.h)
    return rows::nm_input(q, k, n, m, fbits);
  }

#if SPARSEKIT_AVX512
  // What turns the fields of 64 values into the offsets of their inputs in the values'
  // window of 64 / n * m inputs.
  struct Fields {
    __m512i qword, shift, field, base;
    explicit Fields(const NM& w) {
      alignas(64) uint8_t sel[64], ctl[64], first[64];
      for (int j = 0; j < 64; ++j) {
        const int bit = j * static_cast<int>(w.fbits);  // of value j's field, in the window
        sel[j] = static_cast<uint8_t>(bit / 64);  // (only byte 8Q is read: qword Q's source)
        ctl[j] = static_cast<uint8_t>(bit % 64);
        first[j] = static_cast<uint8_t>(j / w.n * w.m);
      }
      alignas(64) int64_t src[8];
      for (int q = 0; q < 8; ++q) src[q] = sel[8 * q];
      qword = _mm512_load_si512(src);
      shift = _mm512_load_si512(ctl);
      field = _mm512_set1_epi8(static_cast<char>(w.m - 1));
      base = _mm512_load_si512(first);
    }
    // Offsets of the 64 values whose fields start at f (`bytes` readable bytes: whole
    // loads while the 16 or 32 bytes of fields are there).
    __m512i at(const uint8_t* f, int64_t bytes, int64_t fbits) const {
      const int64_t need = 8 * fbits;
      __m512i packed;
      if (bytes >= need) {
        packed = fbits == 2
            ? _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(f)))
            : _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(f)));
      } else {
        packed = _mm512_maskz_loadu_epi8((~0ULL) >> (64 - bytes), f);
      }
      const __m512i spread =
          _mm512_multishift_epi64_epi8(shift, _mm512_permutexvar_epi64(qword, packed));
      return _mm512_add_epi8(base, _mm512_and_si512(spread, field));
    }
  };
  Fields fields;  // built once per call
#elif SPARSEKIT_AVX2
  // Byte j: the first input of value j's group, relative to the first of its 128-bit lane's
  // 16 values (2:4, 4:8 and 1:4), built once per call: built per row, by divisions, with an
  // integer division per 32 values in the loop, it had made the 2:4 W8A8 GEMV 1.5x slower.
  alignas(32) uint8_t first[32];
#endif

  template <int NB>
  void dots(int64_t r, const uint8_t* x, int64_t ld, int32_t* out) const {
    const int8_t* p = v + r * width;
    const uint32_t* q = idx + r * words;
    int64_t k = 0;
    int32_t sum[NB] = {};
#if SPARSEKIT_AVX512
    const int64_t window = 64 / n * m, field_bytes = words * 4;
    __m512i acc[NB], corr = _mm512_setzero_si512();
    for (int j = 0; j < NB; ++j) acc[j] = _mm512_setzero_si512();
    for (int64_t first = 0; k < width; k += 64, first += window) {
      const int64_t left = width - k;
      const int64_t at = k * fbits / 8;  // first byte of the fields (k: a multiple of 64)
      prefetch_ahead(p + k);  // both streams: without, a cold 2:4 layer streamed at 0.7x
      prefetch_ahead(reinterpret_cast<const uint8_t*>(q) + at);  // the row bitmap's rate
      const __m512i wv = left >= 64
          ? _mm512_loadu_si512(p + k)
          : _mm512_maskz_loadu_epi8((~0ULL) >> (64 - left), p + k);
      const __m512i c = fields.at(reinterpret_cast<const uint8_t*>(q) + at, field_bytes - at,
                                 fbits);
      corr = _mm512_dpbusd_epi32(corr, bias128(), wv);
      for (int j = 0; j < NB; ++j) {
        const uint8_t* xs = x + j * ld + first;
        __m512i xv = _mm512_permutex2var_epi8(_mm512_loadu_si512(xs), c,
                                              _mm512_loadu_si512(xs + 64));
        if (window > 128) {  // 1:4, 64 values span 256 inputs: bit 7 picks the upper half
          const __m512i upper = _mm512_permutex2var_epi8(_mm512_loadu_si512(xs + 128), c,
                                                         _mm512_loadu_si512(xs + 192));
          xv = _mm512_mask_blend_epi8(_mm512_movepi8_mask(c), xv, upper);
        }
        acc[j] = _mm512_dpbusd_epi32(acc[j], xv, wv);
      }
    }
    const int32_t c = _mm512_reduce_add_epi32(corr);
    for (int j = 0; j < NB; ++j) sum[j] = _mm512_reduce_add_epi32(acc[j]) - c;
#elif SPARSEKIT_AVX2
    // 32 values at a time: the 16 of each 128-bit lane span 32 inputs (2:4, 4:8) or 64 (1:4).
    // Their fields, spread to bytes with pdep, plus each group's first input are indices c
    // into those input codes: pshufb picks from each 16-byte quarter or half of them (loaded
    // into both lanes, the upper lane's from half a window on), blends on bits 4 (and 5)
    // of c choose. 1:4 had run the scalar loop: 12.4 ms on 11008x4096 against 1.05 for dense
    // W8A8 (AMD Zen 3, 2 threads).
    __m256i acc[NB];
    for (int j = 0; j < NB; ++j) acc[j] = _mm256_setzero_si256();
    const int64_t window = 32 / n * m;  // inputs of 32 values
    if (window == 64 || window == 128) {
      const __m256i base = _mm256_load_si256(reinterpret_cast<const __m256i*>(first));
      const __m256i field = _mm256_set1_epi8(static_cast<char>(m - 1));
      const uint64_t spread = fbits == 2 ? 0x0303030303030303ULL : 0x0F0F0F0F0F0F0F0FULL;
      const uint32_t* f = q;  // the fields of these 32 values
      for (int64_t at = 0; k + 32 <= width; k += 32, at += window, f += fbits) {
        prefetch_ahead(p + k);  // values and fields, as the AVX-512 loop
        prefetch_ahead(f);
        int64_t d[4];  // the fields of 8 values each, one per byte
        for (int i = 0; i < 4; ++i) {
          const uint32_t bits = fbits == 2 ? (f[i / 2] >> (16 * (i % 2))) & 0xFFFFu : f[i];
          d[i] = static_cast<int64_t>(_pdep_u64(bits, spread));
        }
        const __m256i c = _mm256_add_epi8(
            base, _mm256_and_si256(_mm256_set_epi64x(d[3], d[2], d[1], d[0]), field));
        const __m256i bit4 = _mm256_slli_epi16(c, 3);  // bit 4 of each index as its sign
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + k));
        const __m256i wa = _mm256_abs_epi8(wv);
        for (int j = 0; j < NB; ++j) {
          const uint8_t* xs = x + j * ld + at;
          // the q-th 16 input codes of each lane's half of the window, picked by c
          const auto pick = [xs, c, window](int64_t q) {
            const __m128i lower = _mm_loadu_si128(reinterpret_cast<const __m128i*>(xs + 16 * q));
            const __m128i upper =
                _mm_loadu_si128(reinterpret_cast<const __m128i*>(xs + window / 2 + 16 * q));
            return _mm256_shuffle_epi8(
                _mm256_inserti128_si256(_mm256_castsi128_si256(lower), upper, 1), c);
          };
          __m256i xv = _mm256_blendv_epi8(pick(0), pick(1), bit4);
          if (window == 128) {  // and bit 5 chooses between the window's halves
            xv = _mm256_blendv_epi8(xv, _mm256_blendv_epi8(pick(2), pick(3), bit4),
                                    _mm256_slli_epi16(c, 2));
          }
          acc[j] = dot32(acc[j], wa, wv, xv);
        }
      }
    }
    for (int j = 0; j < NB; ++j) sum[j] = hsum8i(acc[j]);
#endif
    for (; k < width; ++k) {
      const int64_t i = col(q, k);
      const int w = p[k];
      for (int j = 0; j < NB; ++j) sum[j] += w * code(x[j * ld + i]);
    }
    for (int j = 0; j < NB; ++j) out[j] = sum[j];
  }
};

// W.dots for a run-time nb <= kMaxNB input rows.
template <typename W>
inline void dots_n(const W& w, int nb, int64_t r, const uint8_t* x, int64_t ld, int32_t* out) {
  switch (nb) {
#if SPARSEKIT_AVX512
    case 8: w.template dots<8>(r, x, ld, out); break;
    case 7: w.template dots<7>(r, x, ld, out); break;
    case 6: w.template dots<6>(r, x, ld, out); break;
    case 5: w.template dots<5>(r, x, ld, out); break;
#endif
    case 4: w.template dots<4>(r, x, ld, out); break;
    case 3: w.template dots<3>(r, x, ld, out); break;
    case 2: w.template dots<2>(r, x, ld, out); break;
    default: w.template dots<1>(r, x, ld, out); break;
  }
}

#if SPARSEKIT_AVX512
// Batches of kInterleavedMin input rows or more on AVX-512 (VNNI). The row dots above load
// 64 input codes for every 64 weights and input row and sum each product vector
// horizontally: at 8 input rows they are bound by their loads, at half of vpdpbusd's rate.
// Here the inputs are interleaved once per call, groups of 8 input rows, so that one vector
// holds 8 inputs of all 8 rows (lanes 2b and 2b + 1: row b's inputs 8s..8s+3 and 8s+4..8s+7
// of step s), and the weights are broadcast 8 at a time from their rows as they are stored:
// each vpdpbusd takes one broadcast weight qword against one interleaved vector, and a
// weight row's accumulator holds its 8 sums in lane pairs, so nothing is reduced
// horizontally (the layout torch's fbgemm packs its weights into, without packing them).
// vpdpbusd multiplies unsigned by signed bytes: the weights are flipped to w + 128 and the
// interleaved codes are signed, so 128 times each lane's code sum (per group, shared by
// every weight row) is subtracted. Rows of other formats are expanded into a tile of dense
// rows first (Bitmap::expand). 1.9x the row dots' rate on AMD Zen 4 (11008x4096 at batch
// 8, one thread, weights from cache and from memory).
// Input rows from which the interleaved path runs: dense rows from kMaxNB; bitmap rows,
// which it expands into a tile first, only where the row dots expand them too.
template <typename W>
constexpr int64_t kInterleavedMin = std::is_same_v<W, Dense> ? kMaxNB : kMaxNB + 1;
constexpr int64_t kGroupRows = 8;       // input rows per interleaved group
constexpr int kTile = 8;                // weight rows per register tile
constexpr int64_t kChunk = 1024;        // inputs per pass over a tile (weights and codes in L1)

// The interleaved codes of the first `covered` input rows: groups * steps vectors of 8
// qwords (steps of 8 inputs, covering whole 64-input blocks of span) and, per group, 128
// times each lane's code sum. (Plain words: std::vector does not align vector types beyond
// 16 bytes here.) The rows of a last partial group are left to the row dots: as a group
// they would run as many lanes as a full one.
struct Interleaved {
  std::vector<uint64_t> v;
  std::vector<int32_t> corr;
  int64_t groups = 0, steps = 0, covered = 0;

  const uint64_t* at(int64_t g, int64_t s) const { return v.data() + 8 * (g * steps + s); }

  void build(const uint8_t* xq, int64_t ld, int64_t batch, int64_t span) {
    groups = batch / kGroupRows;
    covered = groups * kGroupRows;
    steps = (span + 63) / 64 * 8;  // ld covers them: it has a whole spare vector past span
    v.assign(8 * groups * steps, 0);
    corr.assign(16 * groups, 0);
    for (int64_t b = 0; b < covered; ++b) {
      uint64_t* out = v.data() + 8 * (b / kGroupRows * steps) + b % kGroupRows;
      const uint8_t* q = xq + b * ld;
      for (int64_t s = 0; s < steps; ++s) {
        uint64_t codes;
        __builtin_memcpy(&codes, q + 8 * s, 8);
        out[8 * s] = codes ^ 0x8080808080808080ULL;  // stored (biased) codes to signed ones
      }
    }
    for (int64_t g = 0; g < groups; ++g) {
      __m512i c = _mm512_setzero_si512();
      for (int64_t s = 0; s < steps; ++s) {
        c = _mm512_dpbusd_epi32(c, bias128(), _mm512_loadu_si512(at(g, s)));
      }
      _mm512_storeu_si512(corr.data() + 16 * g, c);
    }
  }
};

// acc[i] += the products of the weight codes w[i][0:64] with 64 interleaved inputs xs.
__attribute__((always_inline)) inline void tile_block(const int8_t* const* w,
                                                     const uint64_t* xs, __m512i* acc) {
  __m512i xv[8];
  for (int j = 0; j < 8; ++j) xv[j] = _mm512_loadu_si512(xs + 8 * j);
  for (int i = 0; i < kTile; ++i) {
    prefetch_ahead(w[i]);
    for (int j = 0; j < 8; ++j) {
      uint64_t q;
      __builtin_memcpy(&q, w[i] + 8 * j, 8);
      const __m512i flipped = _mm512_xor_si512(_mm512_set1_epi64(static_cast<int64_t>(q)),
                                               bias128());
      acc[i] = _mm512_dpbusd_epi32(acc[i], flipped, xv[j]);
    }
  }
}

// Rows [r0, r1) of y = Output(sx * (qx @ W.T)) for input codes xq (leading dimension ld),
// interleaved in x: tiles of kTile dense rows (W's own for Dense, else expanded into this
// thread's tile), each against all groups kChunk inputs at a time, then against the input
// rows past x.covered by the row dots.
template <typename W>
void interleaved_rows(const W& w, const Linear& io, const Interleaved& x, const uint8_t* xq,
                      int64_t ld, const float* sx, int64_t r0, int64_t r1) {
  constexpr bool kDense = std::is_same_v<W, Dense>;
  const int64_t span = w.span(), blocks = x.steps / 8;
  thread_local std::vector<int8_t> tile;
  thread_local std::vector<int32_t> sums;  // per group and tile row: 16 lanes
  if (!kDense) tile.resize(kTile * span + 64);  // + a vector: whole loads past the last row
  sums.resize(x.groups * kTile * 16);
  alignas(64) int8_t tail[kTile][64];  // the last partial block of W's own rows, zero-padded
  const int8_t* rows[kTile];
  for (int64_t t0 = r0; t0 < r1; t0 += kTile) {
    const int64_t n = std::min<int64_t>(kTile, r1 - t0);
    for (int i = 0; i < kTile; ++i) {  // rows past r1 repeat the tile's first (not written)
      const int64_t r = t0 + (i < n ? i : 0);
      if constexpr (kDense) {
        rows[i] = w.w + r * w.cols;
      } else {
        if (i < n) w.expand(r, tile.data() + i * span);
        rows[i] = tile.data() + (i < n ? i : 0) * span;
      }
    }
    std::fill(sums.begin(), sums.end(), 0);
    for (int64_t c0 = 0; c0 < blocks; c0 += kChunk / 64) {
      const int64_t c1 = std::min(blocks, c0 + kChunk / 64);
      for (int64_t g = 0; g < x.groups; ++g) {
        int32_t* const kept = sums.data() + 16 * kTile * g;
        __m512i acc[kTile];
        for (int i = 0; i < kTile; ++i) acc[i] = _mm512_loadu_si512(kept + 16 * i);
        for (int64_t c = c0; c < c1; ++c) {
          const int8_t* at[kTile];
          const int64_t k = 64 * c;
          if (kDense && k + 64 > w.cols) {  // W's rows end inside this block
            for (int i = 0; i < kTile; ++i) {
              std::memset(tail[i], 0, 64);
              std::memcpy(tail[i], rows[i] + k, w.cols - k);
              at[i] = tail[i];
            }
          } else {
            for (int i = 0; i < kTile; ++i) at[i] = rows[i] + k;
          }
          tile_block(at, x.at(g, 8 * c), acc);
        }
        for (int i = 0; i < kTile; ++i) _mm512_storeu_si512(kept + 16 * i, acc[i]);
      }
    }
    for (int64_t g = 0; g < x.groups; ++g) {
      for (int64_t i = 0; i < n; ++i) {
        const __m512i a = _mm512_sub_epi32(_mm512_loadu_si512(sums.data() + 16 * (kTile * g + i)),
                                           _mm512_loadu_si512(x.corr.data() + 16 * g));
        alignas(64) int32_t lane[16];  // lane 2b: the row's sum for input row b
        _mm512_store_si512(lane, _mm512_add_epi32(a, _mm512_srli_epi64(a, 32)));
        for (int64_t b = 0; b < kGroupRows; ++b) {
          const int64_t row = g * kGroupRows + b;
          io.y[row * w.rows + t0 + i] =
              finish(io.out, static_cast<float>(lane[2 * b]) * sx[row], t0 + i);
        }
      }
    }
    const int nb = static_cast<int>(io.batch - x.covered);
    for (int64_t i = 0; nb > 0 && i < n; ++i) {
      int32_t dots[kMaxNB];
      if constexpr (kDense) {
        dots_n(w, nb, t0 + i, xq + x.covered * ld, ld, dots);
      } else {
        dots_n(Dense{tile.data(), kTile, span}, nb, i, xq + x.covered * ld, ld, dots);
      }
      for (int j = 0; j < nb; ++j) {
        io.y[(x.covered + j) * w.rows + t0 + i] =
            finish(io.out, static_cast<float>(dots[j]) * sx[x.covered + j], t0 + i);
      }
    }
  }
}
#endif

// Bytes between the input rows' codes: the inputs W's rows read, plus a whole spare vector.
template <typename W>
int64_t codes_stride(const W& w) {
  return (w.span() + 127) / 64 * 64;
}

// y = Output(sx * (qx @ W.T)): the input rows are quantized once into this thread's
// workspace, then each OpenMP thread takes a share of W's rows (by work) and runs them, a
// tile of kTileRows rows at a time, against kMaxNB input rows at a time.
template <typename W>
void run(const W& w, const Linear& io) {
  const int64_t batch = io.batch, ld = codes_stride(w);
  thread_local std::vector<uint8_t> codes;
  thread_local std::vector<float> scales;
  codes.resize(batch * ld);
  scales.resize(batch);
  uint8_t* xq = codes.data();
  float* sx = scales.data();
#pragma omp parallel for num_threads(io.threads) if (batch > 1) schedule(static)
  for (int64_t b = 0; b < batch; ++b) {
    sx[b] = quantize_row(io.x + b * io.cols, io.cols, xq + b * ld, ld);
  }
#if SPARSEKIT_AVX512
  if constexpr (!std::is_same_v<W, NM>) {  // (N:M rows have no dense expansion)
    if (batch >= kInterleavedMin<W>) {
      thread_local Interleaved interleaved;
      interleaved.build(xq, ld, batch, w.span());
      const Interleaved& xi = interleaved;  // (the caller's: each thread has its own by name)
#pragma omp parallel num_threads(io.threads)
      {
        int64_t r0, r1;
        rows::thread_rows_of(w, omp_get_thread_num(), omp_get_num_threads(), &r0, &r1);
        interleaved_rows(w, io, xi, xq, ld, sx, r0, r1);
      }
      return;
    }
  }
#endif
#pragma omp parallel num_threads(io.threads)
  {
    int64_t r0, r1;
    rows::thread_rows_of(w, omp_get_thread_num(), omp_get_num_threads(), &r0, &r1);
    // Tiles of kTileRows rows, each against kMaxNB input rows at a time: the input codes of
    // a batch over kMaxNB stay in L1 across the tile's rows instead of being read again from
    // L2 for every row. Bitmap rows of such a batch are expanded once per tile.
    constexpr bool kExpands = std::is_same_v<W, Bitmap>;
    const bool expand = kExpands && batch > kMaxNB;
    thread_local std::vector<int8_t> tile;
    if (expand) tile.resize(kTileRows * w.span());
    const Dense expanded{tile.data(), kTileRows, w.span()};
    int32_t sums[kMaxNB];
    for (int64_t t0 = r0; t0 < r1; t0 += kTileRows) {
      const int64_t t1 = std::min(r1, t0 + kTileRows);
      if constexpr (kExpands) {
        if (expand) {
          for (int64_t r = t0; r < t1; ++r) w.expand(r, tile.data() + (r - t0) * w.span());
        }
      }
      for (int64_t b0 = 0; b0 < batch; b0 += kMaxNB) {
        const int nb = static_cast<int>(std::min<int64_t>(kMaxNB, batch - b0));
        for (int64_t r = t0; r < t1; ++r) {
          if (expand) {
            dots_n(expanded, nb, r - t0, xq + b0 * ld, ld, sums);
          } else {
            dots_n(w, nb, r, xq + b0 * ld, ld, sums);
          }
          for (int j = 0; j < nb; ++j) {
            io.y[(b0 + j) * w.rows + r] =
                finish(io.out, static_cast<float>(sums[j]) * sx[b0 + j], r);
          }
        }
      }
    }
  }
}

// Float inputs against int8 codes with integer dot products: a row x is split into three
// int8 slices, x = s0 q0 + s1 q1 + s2 q2 + r (the Ozaki scheme's splitting, which emulates
// floating-point GEMMs on integer units): q0 quantizes x on the W8A8 grid (s0 = max |x| /
// 127), q1 the residual on a grid 254 times finer (s1 = s0 / 254, whose codes then stay in
// [-127, 127]), q2 the residual of that; each residual is computed with one rounding (an
// FMA). What is left, |r| <= s2 / 2 = max |x| / (2 * 127 * 254^2), is about 2^-24 of the
// largest input: the precision fp32 gives that input, shared by the row. The three slices
// are three input rows of the W8A8 dot products (one expansion of each weight vector serves
// all three), so a float-input GEMV of bitmap rows runs at the speed of a W8A8 one of three
// rows: 1.07-1.22x faster than the float FMAs (AMD Zen 4, two threads, 50 % and 70 % of
// 5632x2048, 2048x5632 and 2048x2048, cold and warm, the two taking turns in one process;
// from 1.10-1.20x a three-row W8A8 call's time to 0.94-1.03x). A fourth slice
// (error ~2^-32 of max |x|) cost 8-19 % more, most of the gain. The error is that of the row
// in block floating point: an input far below the row's largest keeps fewer bits (at 2^20
// below it, about 4; tests/test_formats_int8.py), against int8 weights' 2^-8. Rows with a
// NaN or an infinity, or so small that the last grid would be subnormal, keep the float path
// (returns false).
constexpr float kSplitMin = 1e-30f;  // smallest max |x| split: s2 = max |x| / 8.2e6 stays normal
// Weight positions (rows x inputs) from which a bitmap layer's row is split: the slicing
// costs a few microseconds a call, which a 256x2048 layer at 50 % paid with 1.3x its float
// time; at 512x2048 and 2048x512 the two broke even or the slices won (1.02-1.17x), from
// 1024x2048 on they won by 1.1-1.3x (Zen 4, two threads, cold, one process taking turns).
// N:M and dense int8 rows gained nothing cold (0.82-1.10x): they keep their float path.
constexpr int64_t kSplitMinWork = int64_t{1} << 20;
// Inputs up to which a row is split: the slices' int32 sums stay exact for at most 65536
// inputs, as the W8A8 ops' do (which refuse more; float-input layers may be wider).
constexpr int64_t kSplitMaxInputs = 65536;

inline bool split_row(const float* x, int64_t n, uint8_t* q, int64_t ld, float* s) {
  const float amax = abs_max(x, n);
  if (!__builtin_isfinite(amax) || amax < kSplitMin) return false;
  thread_local std::vector<float> residual;
  residual.resize(n);
  float* __restrict r = residual.data();
  s[0] = amax / 127.f;
  s[1] = s[0] / 254.f;
  s[2] = s[1] / 254.f;
  for (int level = 0; level < 3; ++level) {
    const float* in = level == 0 ? x : r;  // the residual of the level before (x at first)
    uint8_t* __restrict codes = q + level * ld;
    const float step = s[level], inv = 1.f / step;
    int64_t k = 0;
#if SPARSEKIT_AVX512
    const __m512 sv = _mm512_set1_ps(step), iv = _mm512_set1_ps(inv);
    const __m512 lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
    for (; k + 16 <= n; k += 16) {
      const __m512 v = _mm512_loadu_ps(in + k);
      __m512 t = _mm512_roundscale_ps(_mm512_mul_ps(v, iv),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      t = _mm512_min_ps(_mm512_max_ps(t, lo), hi);
      _mm512_storeu_ps(r + k, _mm512_fnmadd_ps(t, sv, v));  // v - t * step, one rounding
      const __m512i c = _mm512_add_epi32(_mm512_cvtps_epi32(t), _mm512_set1_epi32(kZero));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + k), _mm512_cvtepi32_epi8(c));
    }
#endif
    for (; k < n; ++k) {
      codes[k] = store_code(in[k] * inv);
      r[k] = __builtin_fmaf(-static_cast<float>(code(codes[k])), step, in[k]);
    }
    std::memset(codes + n, kZero, ld - n);
  }
  return true;
}

// y = x @ W.T for one float input row by split_row's three slices (false, untouched y: the
// row keeps the float path).
template <typename W>
bool run_split(const W& w, const Linear& io) {
  const int64_t ld = codes_stride(w);
  thread_local std::vector<uint8_t> codes;
  codes.resize(3 * ld);
  float s[3];
  if (!split_row(io.x, io.cols, codes.data(), ld, s)) return false;
  const uint8_t* xq = codes.data();
#pragma omp parallel num_threads(io.threads)
  {
    int64_t r0, r1;
    rows::thread_rows_of(w, omp_get_thread_num(), omp_get_num_threads(), &r0, &r1);
    int32_t sums[3];
    for (int64_t r = r0; r < r1; ++r) {
      w.template dots<3>(r, xq, ld, sums);
      io.y[r] = finish(io.out,
                       static_cast<float>(sums[0]) * s[0] + static_cast<float>(sums[1]) * s[1] +
                           static_cast<float>(sums[2]) * s[2],
                       r);
    }
  }
  return true;
}

}  // namespace sparsekit::SPARSEKIT_ISA::q

namespace sparsekit::SPARSEKIT_ISA {

inline void dense_qlinear(const DenseArgs& a) {
  q::run(q::Dense{static_cast<const int8_t*>(a.weight), a.io.rows, a.io.cols}, a.io);
}

inline void bitmap_qlinear(const BitmapArgs& a) {
  q::run(q::Bitmap{static_cast<const int8_t*>(a.values), a.bits, a.rowptr, a.io.rows,
                   a.io.cols, a.words
#if SPARSEKIT_AVX512
                   , a.vpexpand, a.vpexpand_halves
#endif
         },
         a.io);
}

inline void nm_qlinear(const NMArgs& a) {
  q::run(q::NM(a), a.io);
}

#if SPARSEKIT_AVX512
inline void bitmap_int8_linear(const BitmapArgs& a) {
  const q::BitmapFloat w{{static_cast<const int8_t*>(a.values), a.bits, a.rowptr, a.io.rows,
                          a.io.cols, a.words},
                         a.vpexpand};
  Linear io = a.io;
  if (io.batch == 1 && !a.group_scales && io.rows * io.cols >= q::kSplitMinWork &&
      io.cols <= q::kSplitMaxInputs &&
      q::run_split(q::Bitmap{static_cast<const int8_t*>(a.values), a.bits, a.rowptr, io.rows,
                             io.cols, a.words, a.vpexpand, false},
                   io)) {
    return;
  }
  if (io.batch <= rows::kGemvMaxBatch) {  // GEMV rows: x times BitmapFloat::kInputScale
    thread_local std::vector<float> scaled;
    scaled.resize(io.batch * io.cols);
    for (int64_t i = 0; i < io.batch * io.cols; ++i) scaled[i] = io.x[i] * w.kInputScale;
    io.x = scaled.data();
  }
  if (a.group_scales) {
    return rows::run(rows::Grouped<q::BitmapFloat>{w, a.group_scales, a.group_size}, io);
  }
  rows::run(w, io);
}
#else
inline void bitmap_int8_linear(const BitmapArgs& a) { bitmap_linear(a); }  // the float cores'
#endif

#if SPARSEKIT_AVX512
#pragma GCC pop_options
#endif

}  // namespace sparsekit::SPARSEKIT_ISA
