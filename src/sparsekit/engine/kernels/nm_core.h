// The packed N:M kernel core (see nm.cpp for the op), compiled once per instruction set
// (cores_impl.h): each value's field names its input within its group of M.

namespace sparsekit::SPARSEKIT_ISA::rows {

// A packed N:M weight: `width` values of type T (float, bf16 or int8) per row, fields packed 16
// values per 32 * fbits / 2 bits.
// The input of packed N:M value k from its row's fields q (fbits bits each). n and m are
// powers of two (nm.cpp, qlinear.cpp check): shifts, not the divisions that made the AVX2
// decode of a batch-8 N:M int8 layer (11008x4096) take 35 ms. The float cores' PackedNM and
// the W8A8 cores' NM both read their fields with it.
inline int64_t nm_input(const uint32_t* q, int64_t k, int64_t n, int64_t m, int64_t fbits) {
  const int64_t bit = k * fbits;
  return ((k >> __builtin_ctzll(n)) << __builtin_ctzll(m)) +
         ((q[bit >> 5] >> (bit & 31)) & (m - 1));
}

template <typename T>
struct PackedNM {
  const T* v;
  const uint32_t* idx;
  int64_t rows, cols, n, m, fbits, width, words;

  int64_t work(int64_t r) const { return r * width; }

  int64_t col(const uint32_t* q, int64_t k) const { return nm_input(q, k, n, m, fbits); }

#if SPARSEKIT_AVX512
  // Inputs of values k..k+15 relative to input k / n * m (0 .. 16 / n * m - 1).
  struct Fields {
    __m512i sel, shift, field, base;
    __mmask16 words16;
    explicit Fields(const PackedNM& w) {
      const __m512i bitpos =
          _mm512_mullo_epi32(lanes(), _mm512_set1_epi32(static_cast<int>(w.fbits)));
      sel = _mm512_srli_epi32(bitpos, 5);  // which 32-bit word holds a lane's field
      shift = _mm512_and_si512(bitpos, _mm512_set1_epi32(31));
      field = _mm512_set1_epi32(static_cast<int>(w.m - 1));
      base = _mm512_sllv_epi32(_mm512_srlv_epi32(lanes(), _mm512_set1_epi32(__builtin_ctzll(w.n))),
                               _mm512_set1_epi32(__builtin_ctzll(w.m)));  // lane / n * m
      words16 = w.fbits == 2 ? 0x1 : 0x3;  // words of fields per 16 values
    }
    __m512i at(const uint32_t* q) const {  // q: the fields of the 16 values
      // one or two 32-bit words, loaded whole (masked loads stall the streaming loop)
      const __m512i f = words16 == 0x1
          ? _mm512_set1_epi32(static_cast<int>(q[0]))
          : _mm512_castsi128_si512(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q)));
      // one word (M=4) is already in every lane; two (M=8) are spread by a permute
      const __m512i spread = words16 == 0x1 ? f : _mm512_permutexvar_epi32(sel, f);
      return _mm512_add_epi32(base, _mm512_and_si512(_mm512_srlv_epi32(spread, shift), field));
    }
  };
#endif

  // Row r times x, zero-padded by at least 64 inputs beyond the last group.
  float dot(int64_t r, const float* x) const {
    return span(v + r * width, idx + r * words, x, width);
  }

  // Row r times x where each group of `size` inputs has its scale s[g] (Grouped; the op
  // checks that a group's values fill whole words of fields). AVX-512: each group's sums
  // stay a vector, scaled into the row's, one horizontal sum per row, as Bitmap::dot_groups.
  float dot_groups(int64_t r, const float* x, const float* s, int64_t size) const {
    const T* p = v + r * width;
    const uint32_t* q = idx + r * words;
    const int64_t count = size / m * n, step = count / 16 * (fbits / 2);  // per group
#if SPARSEKIT_AVX512
    const Fields fields(*this);  // once per row, not per group
    __m512 acc = _mm512_setzero_ps();
    for (int64_t g = 0; g * count < width; ++g) {
      acc = _mm512_fmadd_ps(span_vec(p + g * count, q + g * step, x + g * size, count, fields),
                            _mm512_set1_ps(s[g]), acc);
    }
    return _mm512_reduce_add_ps(acc);
#elif SPARSEKIT_AVX2
    __m256 acc = _mm256_setzero_ps();
    for (int64_t g = 0; g * count < width; ++g) {
      acc = _mm256_fmadd_ps(span_vec(p + g * count, q + g * step, x + g * size, count),
                            _mm256_set1_ps(s[g]), acc);
    }
    return hsum8(acc);
#else
    float acc = 0.f;
    for (int64_t g = 0; g * count < width; ++g) {
      acc += s[g] * span(p + g * count, q + g * step, x + g * size, count);
    }
    return acc;
#endif
  }

  // The products of `count` values at p, whose fields start at q (a whole word: p is 16
  // values into its row), with their inputs, x at the first input of p's group: dot() is the
  // span of a whole row, a row of int8 codes scaled per group of inputs (Grouped) sums a
  // span per group.
  float span(const T* p, const uint32_t* q, const float* x, int64_t count) const {
#if SPARSEKIT_AVX512
    return _mm512_reduce_add_ps(span_vec(p, q, x, count, Fields(*this)));
#elif SPARSEKIT_AVX2
    return hsum8(span_vec(p, q, x, count));
#else
    float acc = 0.f;
    for (int64_t k = 0; k < count; ++k) acc += to_float(p[k]) * x[col(q, k)];
    return acc;
#endif
  }

#if SPARSEKIT_AVX2 && !SPARSEKIT_AVX512
  // span's sums before the horizontal one, the scalar tail's in lane 0 (Grouped scales them
  // per group, summing once per row). Always inlined: called once per group, its set-up (the
  // pattern's constants and branches) is hoisted out of the group loop.
  __attribute__((always_inline)) __m256 span_vec(const T* p, const uint32_t* q, const float* x,
                                                 int64_t count) const {
    int64_t k = 0;
    // 8 values at a time: their fields (all in one 32-bit word) give inputs c relative to
    // the first input of their groups; the inputs are picked from the 16 or 32 loaded ones
    // by permutes and blends on bits 3 and 4 of c (no gathers: slow on many AVX2 CPUs), or
    // gathered where 8 values span 64 inputs (1:8).
    const int64_t inputs8 = 8 / n * m;
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i lane_shift =
        _mm256_mullo_epi32(lane, _mm256_set1_epi32(static_cast<int>(fbits)));
    const __m256i field = _mm256_set1_epi32(static_cast<int>(m - 1));
    const __m256i base = _mm256_sllv_epi32(
        _mm256_srlv_epi32(lane, _mm256_set1_epi32(__builtin_ctzll(n))),
        _mm256_set1_epi32(__builtin_ctzll(m)));  // lane / n * m
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    const float* xs = x;
    // x at the inputs c of 8 values whose groups span the 16 inputs at xs, values 0-3 in
    // the first 8 and 4-7 in the last 8 (2:4 and 4:8): a fixed blend of two vpermps, which
    // read only the low 3 bits of c.
    const auto pick = [](const float* xs, __m256i c) {
      return _mm256_blend_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(xs), c),
                             _mm256_permutevar8x32_ps(_mm256_loadu_ps(xs + 8), c), 0xF0);
    };
    // The same for 8 values over 32 inputs (1:4): value l from the l / 2-th 8 of them.
    const auto pick32 = [](const float* xs, __m256i c) {
      const auto at = [xs, c](int e) {
        return _mm256_permutevar8x32_ps(_mm256_loadu_ps(xs + 8 * e), c);
      };
      return _mm256_blend_ps(_mm256_blend_ps(at(0), at(1), 0x0C),
                             _mm256_blend_ps(at(2), at(3), 0xC0), 0xF0);
    };
    // 2:4, 1:4 and 4:8 take 16 values a step: indices(w, &c0, &c1) turns the field words at
    // w (`words` of them) into the picks' indices of the first and the second 8, by shifts,
    // masks and bases that are loop constants. Through the general loop below (a word and a
    // shift worked out per 8 values, blends on bits 3 and 4 of each index) 4:8 ran 1.6x and
    // 1:4 1.2-1.3x slower (11008x4096 from cold caches: 4:8 bf16 3.5 against 2.1 ms, int8
    // 3.3 against 2.0; 1:4 bf16 2.6 against 2.15, int8 2.6 against 1.95; AMD Zen 3, 2 threads).
    const uint32_t* qw = q;
    const auto run16 = [&](auto indices, auto pick_inputs, int64_t words) {
      for (; k + 16 <= count; k += 16, xs += 2 * inputs8, qw += words) {
        if ((k * sizeof(T)) % 64 == 0) prefetch_ahead(p + k);  // once per line
        __m256i c0, c1;
        indices(qw, &c0, &c1);
        a0 = _mm256_fmadd_ps(load8(p + k), pick_inputs(xs, c0), a0);
        a1 = _mm256_fmadd_ps(load8(p + k + 8), pick_inputs(xs + inputs8, c1), a1);
      }
    };
    if (m == 4 && n <= 2) {
      // one word holds the 2-bit fields of 16 values; value l of each 8 takes input
      // 4 * (l / 2) + field of pick's 16 (2:4), or 4 * l + field of pick32's 32 (1:4): at
      // (4 * (l / 2)) % 8 + field, resp. (4 * l) % 8 + field, of its permute
      const __m256i shift0 = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
      const __m256i shift1 = _mm256_add_epi32(shift0, _mm256_set1_epi32(16));
      const __m256i first = n == 2 ? _mm256_setr_epi32(0, 0, 4, 4, 0, 0, 4, 4)
                                   : _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4);
      const auto indices = [&](const uint32_t* w, __m256i* c0, __m256i* c1) {
        const __m256i word = _mm256_set1_epi32(static_cast<int>(*w));
        *c0 = _mm256_add_epi32(first, _mm256_and_si256(_mm256_srlv_epi32(word, shift0), field));
        *c1 = _mm256_add_epi32(first, _mm256_and_si256(_mm256_srlv_epi32(word, shift1), field));
      };
      if (n == 2) run16(indices, pick, 1); else run16(indices, pick32, 1);
    } else if (n == 4 && m == 8) {
      // a word holds the 4-bit fields of 8 values, each one's input among pick's 16
      const __m256i shift = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
      const auto indices = [&shift](const uint32_t* w, __m256i* c0, __m256i* c1) {
        *c0 = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(w[0])), shift);
        *c1 = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(w[1])), shift);
      };
      run16(indices, pick, 2);
    }
    for (; k + 8 <= count; k += 8, xs += inputs8) {
      // unsigned: the division and remainder by 32 are a shift and a mask, without the sign
      // fix-ups a signed one takes (6 more instructions per 8 values)
      const uint64_t bit = static_cast<uint64_t>(k * fbits);
      const __m256i shift =
          _mm256_add_epi32(lane_shift, _mm256_set1_epi32(static_cast<int>(bit % 32)));
      const __m256i f =
          _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(q[bit / 32])), shift);
      const __m256i c = _mm256_add_epi32(base, _mm256_and_si256(f, field));
      const __m256 bit3 = _mm256_castsi256_ps(_mm256_slli_epi32(c, 28));  // c & 8 as the sign
      __m256 xv;
      if (inputs8 == 16) {
        xv = _mm256_blendv_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(xs), c),
                              _mm256_permutevar8x32_ps(_mm256_loadu_ps(xs + 8), c), bit3);
      } else if (inputs8 == 32) {
        const __m256 lo = _mm256_blendv_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(xs), c),
                                           _mm256_permutevar8x32_ps(_mm256_loadu_ps(xs + 8), c),
                                           bit3);
        const __m256 hi =
            _mm256_blendv_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(xs + 16), c),
                             _mm256_permutevar8x32_ps(_mm256_loadu_ps(xs + 24), c), bit3);
        xv = _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(c, 27)));
      } else {
        xv = _mm256_i32gather_ps(xs, c, 4);
      }
      a0 = _mm256_fmadd_ps(load8(p + k), xv, a0);
      std::swap(a0, a1);  // two independent sums hide the FMA latency
    }
    float tail = 0.f;
    for (; k < count; ++k) tail += to_float(p[k]) * x[col(q, k)];
    return _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_setr_ps(tail, 0.f, 0.f, 0.f, 0.f, 0.f,
                                                               0.f, 0.f));
  }
#endif

#if SPARSEKIT_AVX512
  // span's sums before the horizontal one (Grouped scales them per group, summing once per
  // row); the last 16 values are masked, so no value is left to a scalar loop.
  __m512 span_vec(const T* p, const uint32_t* q, const float* x, int64_t count,
                  const Fields& fields) const {
    int64_t k = 0;
    const int64_t inputs16 = 16 / n * m, step = fbits / 2;  // inputs and field words per 16
    const bool wide = inputs16 > 32;  // 16 values span 64 inputs: two permutes and a blend
    // x at the inputs of 16 values whose fields start at qs, from the inputs at xs
    const auto pick = [&fields, wide](const float* xs, const uint32_t* qs) {
      const __m512i c = fields.at(qs);
      __m512 xv = _mm512_permutex2var_ps(_mm512_loadu_ps(xs), c, _mm512_loadu_ps(xs + 16));
      if (wide) {
        const __m512 hi =
            _mm512_permutex2var_ps(_mm512_loadu_ps(xs + 32), c, _mm512_loadu_ps(xs + 48));
        xv = _mm512_mask_mov_ps(xv, _mm512_test_epi32_mask(c, _mm512_set1_epi32(32)), hi);
      }
      return xv;
    };
    // four independent sums of 16 hide the FMA latency: 1.1-1.3x two sums on int8 2:4
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    __m512 a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    const float* xs = x;
    const uint32_t* qs = q;
    for (; k + 64 <= count; k += 64, xs += 4 * inputs16, qs += 4 * step) {
      // the 64 values' lines (sizeof(T) of them) and their fields, kPrefetchBytes ahead
      for (size_t line = 0; line < sizeof(T); ++line) {
        prefetch_ahead(p + k + 64 / sizeof(T) * line);
      }
      prefetch_ahead(qs);
      a0 = _mm512_fmadd_ps(load16(p + k), pick(xs, qs), a0);
      a1 = _mm512_fmadd_ps(load16(p + k + 16), pick(xs + inputs16, qs + step), a1);
      a2 = _mm512_fmadd_ps(load16(p + k + 32), pick(xs + 2 * inputs16, qs + 2 * step), a2);
      a3 = _mm512_fmadd_ps(load16(p + k + 48), pick(xs + 3 * inputs16, qs + 3 * step), a3);
    }
    for (; k < count; k += 16, xs += inputs16, qs += step) {
      const __mmask16 valid = count - k >= 16 ? 0xFFFF : (1u << (count - k)) - 1u;
      a0 = _mm512_fmadd_ps(valid == 0xFFFF ? load16(p + k) : load16_masked(valid, p + k),
                           pick(xs, qs), a0);
      std::swap(a0, a1);
    }
    return _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
  }
#endif

  // Columns of row r's values into c (room for cols + 32); returns its packed values.
  const T* decode(int64_t r, int32_t* c, int64_t* count) const {
    const uint32_t* q = idx + r * words;
    int64_t k = 0;
#if SPARSEKIT_AVX512
    const Fields fields(*this);
    const int64_t inputs16 = 16 / n * m, step = fbits / 2;
    for (int64_t first = 0; k < width; k += 16, first += inputs16) {
      const __m512i c0 = _mm512_set1_epi32(static_cast<int>(first));
      _mm512_storeu_si512(c + k, _mm512_add_epi32(c0, fields.at(q + k / 16 * step)));
    }
#elif SPARSEKIT_AVX2
    // 8 values' fields lie in one 32-bit word (2 or 4 bits each, 8 values a multiple of 16
    // or 32 bits in): broadcast, shifted per lane, masked, plus each lane's group start.
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i shift = _mm256_mullo_epi32(lane, _mm256_set1_epi32(static_cast<int>(fbits)));
    const __m256i field = _mm256_set1_epi32(static_cast<int>(m - 1));
    const __m256i base = _mm256_slli_epi32(_mm256_srli_epi32(lane, __builtin_ctzll(n)),
                                           __builtin_ctzll(m));
    for (int64_t first = 0; k + 8 <= width; k += 8, first += 8 / n * m) {
      const int64_t bit = k * fbits;
      const __m256i f = _mm256_set1_epi32(static_cast<int>(q[bit >> 5] >> (bit & 31)));
      const __m256i at = _mm256_and_si256(_mm256_srlv_epi32(f, shift), field);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + k),
                          _mm256_add_epi32(_mm256_add_epi32(base, at),
                                           _mm256_set1_epi32(static_cast<int>(first))));
    }
#endif
    for (; k < width; ++k) c[k] = static_cast<int32_t>(col(q, k));
    *count = width;
    return v + r * width;
  }
};

}  // namespace sparsekit::SPARSEKIT_ISA::rows

namespace sparsekit::SPARSEKIT_ISA {

void nm_linear(const NMArgs& a) {
  with_values(a.value, a.values, [&](auto v) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(v)>>;
    const rows::PackedNM<T> w{v, a.idx, a.io.rows, a.io.cols, a.n, a.m, a.fbits, a.width, a.words};
    if constexpr (std::is_same_v<T, int8_t>) {
      if (a.group_scales) {
        return rows::run(rows::Grouped<rows::PackedNM<T>>{w, a.group_scales, a.group_size}, a.io);
      }
    }
    rows::run(w, a.io);
  });
}

}  // namespace sparsekit::SPARSEKIT_ISA
