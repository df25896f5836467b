// The bitmap-row kernel core (see bitmap.cpp for the op), compiled once per instruction set
// (cores_impl.h): each row's bits say which inputs its packed values multiply.

namespace sparsekit::SPARSEKIT_ISA::rows {

#if SPARSEKIT_AVX2
// Decoding tables, per byte m of a bitmap (bit i: input i of 8 stored or not):
//  - pack[m][j]: the position of m's j-th set bit (columns for the batched path);
//  - rank[m][i]: the rank of bit i among m's set bits, i.e. the packed value lane i takes
//    (an index for vpermps);
//  - keep[m][i]: all ones where bit i is set, else zero (the lanes vpermps filled rightly);
//  - words[m]: 16 pshufb controls moving 8 packed bf16 values (2 bytes each) in place;
//  - halves[m], codes[m]: 32 vpshufb controls (both 128-bit halves index the same 16
//    packed bytes) putting each of 8 bf16 values, resp. int8 codes, at the top of the
//    32-bit lane of its input (expand8);
//  - bytes[m][h]: 16 pshufb controls putting the int8 codes of byte h of a word (h = 0:
//    lanes 0-7, 1: lanes 8-15), packed in the low 8 bytes, at their lanes (expand16_codes).
// A shuffle from such a table replaced the earlier permute-and-blend expansion, which is
// 3-4x slower on AMD Zen 5 (and AVX-512 VBMI2 vpexpandw/vpexpandb, 2-3x slower there:
// benchmarks/kernels.py, bitmap at 50% on 11008x4096); on Intel, bf16 words take vpexpandw
// instead (BitmapVpexpand below).
struct ByteTables {
  uint8_t bytes[256][2][16];  // int8 code of rank r -> byte 8h + i (bit i of byte h): r
  int32_t pack[256][8];
  int32_t rank[256][8];
  int32_t keep[256][8];
  uint8_t words[256][16];
  uint8_t halves[256][32];  // bf16 value of rank r -> bytes 2, 3 of its lane: 2r, 2r + 1
  uint8_t codes[256][32];   // int8 code of rank r -> byte 3 of its lane: r
};

constexpr ByteTables make_byte_tables() {
  ByteTables t{};
  for (int m = 0; m < 256; ++m) {
    int n = 0;
    for (int i = 0; i < 8; ++i) {
      const bool set = (m >> i) & 1;
      t.rank[m][i] = n;
      t.keep[m][i] = set ? -1 : 0;
      t.words[m][2 * i] = set ? 2 * n : 0x80;
      t.words[m][2 * i + 1] = set ? 2 * n + 1 : 0x80;
      const int at = 16 * (i / 4) + 4 * (i % 4);  // lane i's bytes in its 128-bit half
      for (int b = 0; b < 4; ++b) {
        t.halves[m][at + b] = set && b >= 2 ? 2 * n + b - 2 : 0x80;
        t.codes[m][at + b] = set && b == 3 ? n : 0x80;
      }
      t.bytes[m][0][i] = set ? n : 0x80;
      t.bytes[m][0][8 + i] = 0x80;
      t.bytes[m][1][i] = 0x80;
      t.bytes[m][1][8 + i] = set ? n : 0x80;
      if (set) t.pack[m][n++] = i;
    }
  }
  return t;
}

alignas(64) inline constexpr ByteTables kByteTables = make_byte_tables();

inline __m128i control16(const uint8_t* control) {
  return _mm_load_si128(reinterpret_cast<const __m128i*>(control));
}
inline __m128i shuffle16(const void* p, const uint8_t* control) {
  return _mm_shuffle_epi8(_mm_loadu_si128(static_cast<const __m128i*>(p)), control16(control));
}

// The 16 values of bitmap word w, packed at p, in the lanes of their inputs (zeros where a
// bit is clear) as 16 bytes, bf16 halves or fp32 quarters; p moves past them. Each reads
// at most 16 bytes from p (bf16: per shuffle): the caller keeps 16 values in the array.
// int8: two shuffles of 8-byte loads (bytes[m][h]) and an OR, no general-purpose register
// moved into a vector; the W8A8 GEMVs (qlinear_core.h, act_bitmap_qgemv_core.h) expand with
// it too. On Zen 3 their time did not change measurably against a control built in general
// registers (11008x4096 at 50 %: 3.1-3.7 ms before and after, within that machine's noise).
inline __m128i expand16_codes(unsigned w, const int8_t*& p) {
  const unsigned lo = w & 0xFFu, hi = w >> 8;
  const __m128i low = _mm_shuffle_epi8(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)),
                                       control16(kByteTables.bytes[lo][0]));
  p += __builtin_popcount(lo);
  const __m128i high = _mm_shuffle_epi8(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)),
                                        control16(kByteTables.bytes[hi][1]));
  p += __builtin_popcount(hi);
  return _mm_or_si128(low, high);
}
inline __m256i expand16_halves(unsigned w, const bf16*& p) {
  const unsigned lo = w & 0xFFu, hi = w >> 8;
  const __m128i e0 = shuffle16(p, kByteTables.words[lo]);
  p += __builtin_popcount(lo);
  const __m128i e1 = shuffle16(p, kByteTables.words[hi]);
  p += __builtin_popcount(hi);
  return _mm256_inserti128_si256(_mm256_castsi128_si256(e0), e1, 1);
}

// The 16 values of word w (packed at p, which moves past them) as floats in the lanes of
// their inputs: 2 x 8 lanes, holding the values times kExpandUnit<T>, a byte of bits at a
// time. int8 and bf16: one 256-bit shuffle of the packed values (loaded into both 128-bit
// halves) whose controls (halves, codes) put each value's bytes at the top of its 32-bit
// lane, where a bf16 already is its float and an int8 code its integer times 2^24, a float
// exactly (the caller scales the sum back by 2^-24, also exactly). fp32: one vpermps of 8
// packed values by the byte's ranks and an AND with its keep mask.
// On AMD Zen 3 (AVX2 only, 11008x4096 at 50%, 2 threads) the bf16 GEMV took 2.4 ms with this
// shuffle instead of 3.2 with the 16-lane one widened by vpmovzx and shifts (the AVX-512
// path's expansion). The loop is then bound by the core, not by memory (one thread streams
// ~11 GB/s at any density, two 21), so each word is expanded with few instructions: its two
// table entries are addressed straight from its bits (bits << 5, bits >> 3, one mask each),
// its second half starts at p + popcount(low byte) and p moves once, by popcount(word); no
// arithmetic shift for int8 (the 2^24), and for fp32 2 operations per byte instead of 4
// shuffles of 4 values. That made fp32 at 90% 1.27x and int8 at 90% 1.15x faster (Zen 3,
// interleaved A/B); bf16 did not move (a microbenchmark of its loop ran 2.1 cycles per byte
// with the data in cache, 1.5 without either the input loads or the control loads).
template <typename T>
constexpr float kExpandUnit = std::is_same_v<T, int8_t> ? 0x1p24f : 1.f;

// The 32 bytes at byte `offset` (a multiple of 32) of a table of 32-byte entries.
inline __m256i entry32(const void* table, unsigned offset) {
  return _mm256_load_si256(
      reinterpret_cast<const __m256i*>(static_cast<const char*>(table) + offset));
}
// The 8 values packed at p as floats in the lanes of their inputs (times kExpandUnit), by the
// table entries at byte `offset`, 32 times their bitmap byte. They read 32 bytes from p
// (fp32), 16 (bf16) or 8 (int8).
inline __m256 expand8(unsigned offset, const float* p) {
  const __m256 moved =
      _mm256_permutevar8x32_ps(_mm256_loadu_ps(p), entry32(kByteTables.rank, offset));
  return _mm256_and_ps(moved, _mm256_castsi256_ps(entry32(kByteTables.keep, offset)));
}
inline __m256 expand8(unsigned offset, const bf16* p) {
  const __m256i packed =
      _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_shuffle_epi8(packed, entry32(kByteTables.halves, offset)));
}
inline __m256 expand8(unsigned offset, const int8_t* p) {
  const __m256i packed =
      _mm256_broadcastq_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  return _mm256_cvtepi32_ps(_mm256_shuffle_epi8(packed, entry32(kByteTables.codes, offset)));
}
template <typename T>
inline void expand16(unsigned w, const T*& p, __m256* first, __m256* second) {
  const unsigned low = w & 0xFFu;
  *first = expand8(low << 5, p);
  *second = expand8((w >> 3) & 0x1FE0u, p + __builtin_popcount(low));
  p += __builtin_popcount(w);
}
#endif

#if SPARSEKIT_AVX512
// The same as 16 lanes: int8 and bf16 widen once to 512 bits; fp32 permutes word w's packed
// values into place with one vpermps by the ranks of its set bits (ranks16: the high byte's
// count past the low byte's values) and a zeroing mask, 1.4x faster on AMD Zen 5 than a
// 256-bit permute per byte. On Intel, vexpandps (from a register or from memory) ran it no
// faster (0.86-1.0x at 50-90%, 11008x4096, one thread): its 2 port-5 uops and the mask move
// are as many as vpermps, its index insert and the mask move.
inline __m512i ranks16(unsigned w) {
  const unsigned lo = w & 0xFFu, hi = w >> 8;
  const __m256i first = _mm256_load_si256(reinterpret_cast<const __m256i*>(kByteTables.rank[lo]));
  const __m256i second = _mm256_add_epi32(
      _mm256_load_si256(reinterpret_cast<const __m256i*>(kByteTables.rank[hi])),
      _mm256_set1_epi32(__builtin_popcount(lo)));
  return _mm512_inserti32x8(_mm512_castsi256_si512(first), second, 1);
}
inline __m512 expand16(unsigned w, const int8_t*& p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(expand16_codes(w, p)));
}
inline __m512 expand16(unsigned w, const bf16*& p) {
  const __m256i h = expand16_halves(w, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 expand16(unsigned w, const float*& p) {
  const __m512 e =
      _mm512_maskz_permutexvar_ps(static_cast<__mmask16>(w), ranks16(w), _mm512_loadu_ps(p));
  p += __builtin_popcount(w);
  return e;
}

// The expansions above, as the argument of Bitmap::dot16.
struct Permuted {
  template <typename T>
  __m512 operator()(unsigned w, const T*& p) const {
    return expand16(w, p);
  }
};
#endif

// A bitmap-row weight with values of type T (float, bf16 or int8). x passed to dot() is
// zero-padded to at least words * 16 inputs.
template <typename T>
struct Bitmap {
  const T* v;
  const uint16_t* bits;
  const int32_t* rowptr;
  int64_t rows, cols, words;

  // Bytes of rows [0, r): the split of the rows across threads is by the bytes they stream.
  int64_t work(int64_t r) const {
    return static_cast<int64_t>(rowptr[r]) * sizeof(T) + 2 * r * words;
  }

  // Row r times x: a dense-like streaming loop that expands each word's packed values into
  // the lanes of their inputs, two words per step while 32 values remain in the array (each
  // expansion reads past its values: AVX2 8 values, AVX-512 16 bytes); the last words run
  // the scalar loop.
  float dot(int64_t r, const float* x) const {
#if SPARSEKIT_AVX512
    return dot16(r, x, Permuted{});
#else
    const T* p = v + rowptr[r];
    // An expansion reads at most 8 values from its p, which stays within the row: a row with
    // 16 values after it in the array runs its whole words unchecked.
    if (v + rowptr[rows] - (v + rowptr[r + 1]) >= 16) {
      return span<true>(p, bits + r * words, 0, words, x);
    }
    return span<false>(p, bits + r * words, 0, words, x);
#endif
  }

  // Row r times x where each group of `size` inputs (whole words) has its scale s[g]
  // (Grouped). AVX-512: each group's sums stay a vector, scaled into the row's, one
  // horizontal sum per row (per group it cost as much as the group's own products, at 128
  // inputs and 50 %). Callers compiled for more instruction sets (BitmapFloat) have their own.
  float dot_groups(int64_t r, const float* x, const float* s, int64_t size) const {
    const T* p = v + rowptr[r];
    const uint16_t* b = bits + r * words;
    const int64_t gw = size / 16;
#if SPARSEKIT_AVX512
    __m512 acc = _mm512_setzero_ps();
    for (int64_t g = 0; g * gw < words; ++g) {
      acc = _mm512_fmadd_ps(span_vec(p, b, g * gw, (g + 1) * gw, x), _mm512_set1_ps(s[g]), acc);
    }
    return _mm512_reduce_add_ps(acc);
#else
    float acc = 0.f;
    for (int64_t g = 0; g * gw < words; ++g) acc += s[g] * span(p, b, g * gw, (g + 1) * gw, x);
    return acc;
#endif
  }

  // The products of words [k, k1) of a row (bits b) whose values start at p, which moves past
  // them: dot() is the span of a whole row, a row of int8 codes scaled per group of inputs
  // (Grouped) sums a span per group. Unchecked: the row has 16 values after it in the array.
  template <bool Unchecked = false>
  float span(const T*& p, const uint16_t* b, int64_t k, int64_t k1, const float* x) const {
#if SPARSEKIT_AVX512
    return span16(p, b, k, k1, x, Permuted{});
#else
    float acc = 0.f;
#if SPARSEKIT_AVX2
    const T* const end = v + rowptr[rows];
    const T* const start = p;
    const int64_t k0 = k;
    __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                   _mm256_setzero_ps()};
    const auto step = [&] {
      prefetch_ahead(p);
      for (int u = 0; u < 2; ++u) {
        __m256 first, second;
        expand16(b[k + u], p, &first, &second);
        a[2 * u] = _mm256_fmadd_ps(first, _mm256_loadu_ps(x + 16 * (k + u)), a[2 * u]);
        a[2 * u + 1] =
            _mm256_fmadd_ps(second, _mm256_loadu_ps(x + 16 * (k + u) + 8), a[2 * u + 1]);
      }
    };
    if constexpr (Unchecked) {
      for (; k + 2 <= k1; k += 2) step();
    } else {
      for (; k + 2 <= k1 && end - p >= 32; k += 2) step();
    }
    acc = hsum8(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])));
    if constexpr (kExpandUnit<T> != 1.f) {
      acc /= kExpandUnit<T>;  // exact: a power of two
      // products of codes times 2^24 overflow where the inputs pass 2^97 / 127 or so; such a
      // span (or one with an infinite or NaN input) is summed again one nonzero at a time
      if (!std::isfinite(acc)) {
        p = start;
        return tail(p, b, k0, k1, x, 0.f);
      }
    }
#endif
    return tail(p, b, k, k1, x, acc);
#endif
  }

#if SPARSEKIT_AVX512
  // dot() with the 16-lane expansion expand(w, p) of word w (which moves p past its
  // values): always inlined, so that a caller compiled for more instruction sets
  // (BitmapVpexpand) inlines an expansion that uses them.
  template <typename Expand>
  __attribute__((always_inline)) float dot16(int64_t r, const float* x, Expand expand) const {
    const T* p = v + rowptr[r];
    return span16(p, bits + r * words, 0, words, x, expand);
  }
  template <typename Expand>
  __attribute__((always_inline)) float span16(const T*& p, const uint16_t* b, int64_t k,
                                              int64_t k1, const float* x, Expand expand) const {
    return _mm512_reduce_add_ps(span_vec(p, b, k, k1, x, expand));
  }
  // span16's sums before the horizontal one (the scalar tail's in lane 0): Grouped scales
  // them per group and sums once per row.
  template <typename Expand = Permuted>
  __attribute__((always_inline)) __m512 span_vec(const T*& p, const uint16_t* b, int64_t k,
                                                 int64_t k1, const float* x,
                                                 Expand expand = {}) const {
    const T* const end = v + rowptr[rows];
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (; k + 2 <= k1 && end - p >= 32; k += 2) {
      prefetch_ahead(p);
      a0 = _mm512_fmadd_ps(expand(b[k], p), _mm512_loadu_ps(x + 16 * k), a0);
      a1 = _mm512_fmadd_ps(expand(b[k + 1], p), _mm512_loadu_ps(x + 16 * k + 16), a1);
    }
    const __m512 sums = _mm512_add_ps(a0, a1);
    if (k == k1) return sums;
    return _mm512_mask_add_ps(sums, 1, sums, _mm512_set1_ps(tail(p, b, k, k1, x, 0.f)));
  }
#endif

  // acc plus the products of words [k, k1) (their values at p, which moves past them), one
  // nonzero at a time.
  float tail(const T*& p, const uint16_t* b, int64_t k, int64_t k1, const float* x,
             float acc) const {
    for (; k < k1; ++k) {
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

#if SPARSEKIT_AVX512
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,popcnt,bmi,bmi2,avx512vbmi2")
// bf16 rows where BitmapArgs::vpexpand says so (the bitmap expansion "vpexpand", isa.cpp:
// the default on Intel CPUs with VBMI2): one vpexpandw loads word w's packed values straight
// into the upper halves of the 32-bit lanes of their inputs (its mask: w's bits spread to the
// odd 16-bit lanes by pdep) and zeros the rest, which are then the lanes' floats: 3 port-5
// uops a word on Intel (vpexpandw takes 2, the mask move 1) where the pshufb tables take 4 and
// integer work besides. On an Intel Xeon with AVX-512 VBMI2 (11008x4096, one thread, thread
// CPU time, interleaved, outputs bit-identical) it ran the GEMV 1.2x faster at 50% and 2:4
// and 1.4x at 70% and 90% than the tables (vpermw by table ranks: 0.85-1.0x; vpexpandw from
// a register: 1.2-1.4x too); the same expand-loads stalled the streaming loop on AMD Zen 5,
// so the tables stay the default there. Expanding 2 words at once into 32 16-bit lanes and
// taking the even and odd ones as floats (x reordered to match) ran 1.0-1.15x faster still,
// but sums in another order.
struct ExpandLoaded {
  __m512 operator()(unsigned w, const bf16*& p) const {
    const __m512i e = _mm512_maskz_expandloadu_epi16(_pdep_u32(w, 0xAAAAAAAAu), p);
    p += __builtin_popcount(w);
    return _mm512_castsi512_ps(e);
  }
};

struct BitmapVpexpand : Bitmap<bf16> {
  float dot(int64_t r, const float* x) const { return dot16(r, x, ExpandLoaded{}); }
};
#pragma GCC pop_options
#endif

}  // namespace sparsekit::SPARSEKIT_ISA::rows

namespace sparsekit::SPARSEKIT_ISA {

void bitmap_linear(const BitmapArgs& a) {
  with_values(a.value, a.values, [&](auto v) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(v)>>;
    const rows::Bitmap<T> w{v, a.bits, a.rowptr, a.io.rows, a.io.cols, a.words};
    if constexpr (std::is_same_v<T, int8_t>) {
      if (a.group_scales) {
        return rows::run(rows::Grouped<rows::Bitmap<T>>{w, a.group_scales, a.group_size}, a.io);
      }
    }
#if SPARSEKIT_AVX512
    if constexpr (std::is_same_v<T, bf16>) {
      if (a.vpexpand) return rows::run(rows::BitmapVpexpand{w}, a.io);
    }
#endif
    rows::run(w, a.io);
  });
}

}  // namespace sparsekit::SPARSEKIT_ISA
