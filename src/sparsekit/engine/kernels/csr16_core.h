// The CSR kernel core (see csr16.cpp for the op): y = x @ W.T for W in CSR with fp32, bf16
// or int8 values (int8: times a scale per row, or per row and group of inputs) and uint16
// or int32 column indices. Compiled once per instruction set (cores_impl.h).
//
// Batch 1 (up to 3) is a GEMV per input that gathers x at each row's columns; larger batches
// transpose x once into a padded per-thread workspace (reused across calls) and stream each row of W once per chunk
// of 64/128 inputs. Rows are split across OpenMP threads so that each thread gets a similar
// share of nonzeros + rows.

namespace sparsekit::SPARSEKIT_ISA::csr {

constexpr int64_t kGemvMaxBatch = 3;  // batches up to this size run one GEMV per row of x
constexpr int64_t kPrefetch = 512;  // nonzeros (2 KiB of values) prefetched ahead in GEMV
typedef float vec16 __attribute__((vector_size(64)));  // batched-kernel vectors
typedef float vec8 __attribute__((vector_size(32)));

// The GEMV picks x at a vector of consecutive nonzeros (16 on AVX-512, 8 on AVX2) from one
// window of kWindow inputs starting at the first one's column, loaded whole and selected by
// permutes, where those nonzeros lie within it; otherwise it builds the vector from scalar
// loads (vector gathers lost to them on AMD Zen 5 and are slower still on Zen 3). A row
// takes the window path when the expected column span of a vector of its nonzeros,
// (lanes - 1) * cols / nonzeros, is at most kMaxFill of the window: above that, falling
// back (a mispredicted branch and the scalar loads) costs more than the windows save. On
// Zen 5 (one thread, 11008x4096) the windows ran 50% 1.5x faster with AVX-512 (fp32, bf16,
// int8) and 1.0-1.1x with AVX2, 70% 1.03-1.2x with AVX-512; with AVX2 they lost at 70%.
#if SPARSEKIT_AVX512
constexpr int64_t kLanes = 16, kWindow = 64;
constexpr double kMaxFill = 0.85;
#else
constexpr int64_t kLanes = 8, kWindow = 32;
constexpr double kMaxFill = 0.5;
#endif

#if SPARSEKIT_AVX512
inline __m512i columns16(const uint16_t* c) {
  return _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c)));
}
inline __m512i columns16(const int32_t* c) { return _mm512_loadu_si512(c); }
// xs[i] for the 16 offsets i (each below 64): four loads, two two-register permutes and a
// blend on bit 5.
inline __m512 window16(const float* xs, __m512i i) {
  const __m512 lo = _mm512_permutex2var_ps(_mm512_loadu_ps(xs), i, _mm512_loadu_ps(xs + 16));
  const __m512 hi = _mm512_permutex2var_ps(_mm512_loadu_ps(xs + 32), i, _mm512_loadu_ps(xs + 48));
  return _mm512_mask_mov_ps(lo, _mm512_test_epi32_mask(i, _mm512_set1_epi32(32)), hi);
}
#elif SPARSEKIT_AVX2
inline __m256i columns8(const uint16_t* c) {
  return _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c)));
}
inline __m256i columns8(const int32_t* c) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c));
}
// xs[i] for the 8 offsets i (each below 32): four loads, four permutes and blends on bits 3
// and 4.
inline __m256 window8(const float* xs, __m256i i) {
  const __m256 bit3 = _mm256_castsi256_ps(_mm256_slli_epi32(i, 28));  // as the sign
  const __m256 lo = _mm256_blendv_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(xs), i),
                                     _mm256_permutevar8x32_ps(_mm256_loadu_ps(xs + 8), i), bit3);
  const __m256 hi = _mm256_blendv_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(xs + 16), i),
                                     _mm256_permutevar8x32_ps(_mm256_loadu_ps(xs + 24), i), bit3);
  return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(i, 27)));
}
#endif

#if SPARSEKIT_AVX512
// x at the 16 nonzeros' columns c[0..15]: from one window where they lie within it (when
// Windowed: x zero-padded by kWindow), else from scalar loads.
template <bool Windowed, typename I>
inline __m512 inputs16(const float* x, const I* c) {
  if (!Windowed || c[15] - c[0] >= kWindow) return gather16(x, c);
  return window16(x + c[0],
                  _mm512_sub_epi32(columns16(c), _mm512_set1_epi32(static_cast<int>(c[0]))));
}
#elif SPARSEKIT_AVX2
template <bool Windowed, typename I>
inline __m256 inputs8(const float* x, const I* c) {
  if (!Windowed || c[7] - c[0] >= kWindow) return gather8(x, c);
  return window8(x + c[0],
                 _mm256_sub_epi32(columns8(c), _mm256_set1_epi32(static_cast<int>(c[0]))));
}
#endif

// Sum of v[k] * x[c[k]] over one row of n nonzeros (also a fan-in row's); x is zero-padded by
// kWindow inputs when Windowed.
template <bool Windowed = false, typename Value, typename I>
inline float row_dot(const Value* v, const I* c, int64_t n, const float* x) {
  int64_t k = 0;
  float tail = 0.f;
#if SPARSEKIT_AVX512
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  if (Windowed) {
    for (; k + 16 <= n; k += 16) {
      a0 = _mm512_fmadd_ps(load16(v + k), inputs16<true>(x, c + k), a0);
      std::swap(a0, a1);  // two independent sums hide the FMA latency
    }
  }
  for (; k + 32 <= n; k += 32) {
    a0 = _mm512_fmadd_ps(load16(v + k), gather16(x, c + k), a0);
    a1 = _mm512_fmadd_ps(load16(v + k + 16), gather16(x, c + k + 16), a1);
  }
  for (; k + 16 <= n; k += 16) a0 = _mm512_fmadd_ps(load16(v + k), gather16(x, c + k), a0);
  tail = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#elif SPARSEKIT_AVX2
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  if (Windowed) {
    for (; k + 8 <= n; k += 8) {
      a0 = _mm256_fmadd_ps(load8(v + k), inputs8<true>(x, c + k), a0);
      std::swap(a0, a1);
    }
  }
  for (; k + 16 <= n; k += 16) {
    a0 = _mm256_fmadd_ps(load8(v + k), gather8(x, c + k), a0);
    a1 = _mm256_fmadd_ps(load8(v + k + 8), gather8(x, c + k + 8), a1);
  }
  for (; k + 8 <= n; k += 8) a0 = _mm256_fmadd_ps(load8(v + k), gather8(x, c + k), a0);
  tail = hsum8(_mm256_add_ps(a0, a1));
#endif
  for (; k < n; ++k) tail += to_float(v[k]) * x[c[k]];
  return tail;
}

// row_dot with int8 codes scaled per group of `size` inputs (`scale`: the row's, one per
// group): the sum over groups of each group's dot product times its scale. A row's columns
// rise, so a vector of nonzeros lies in the current group unless its last column is past
// it; then its products are added lane-masked to the group they fall in, each finished
// group's vector sum scaled into the total, and the next group found by stepping, not
// dividing (per-group runs of row_dot, each with its horizontal sum, and a division per
// group ran 4-5x slower than per-row scales at g128, Intel Xeon). Columns out of order
// (refused by the format's checks) give a wrong sum, never an out-of-bounds read.
template <bool Windowed, typename Value, typename I>
inline float grouped_row_dot(const Value* v, const I* c, int64_t n, const float* x,
                             const float* scale, int64_t size) {
  if (n == 0) return 0.f;
  int64_t k = 0, g = c[0] / size, begin = g * size, end = begin + size;
  const auto enter = [&](int64_t col) {  // the group of a column past the current one
    do {
      ++g;
      end += size;
    } while (col >= end);
    begin = end - size;
  };
  float sum = 0.f;
#if SPARSEKIT_AVX512 || SPARSEKIT_AVX2
#if SPARSEKIT_AVX512
  typedef __m512 F;
  const auto inputs = [&](const I* ck) { return inputs16<Windowed>(x, ck); };
  // acc plus the lanes of p whose columns lie in [begin, end); the lanes at or past end
  const auto add_in = [&](F& acc, F p, __m512i cols) {
    const __mmask16 past = _mm512_cmpge_epi32_mask(cols, _mm512_set1_epi32(static_cast<int>(end)));
    const __mmask16 in =
        _mm512_cmpge_epi32_mask(cols, _mm512_set1_epi32(static_cast<int>(begin))) & ~past;
    acc = _mm512_mask_add_ps(acc, in, acc, p);
    return static_cast<unsigned>(past);
  };
  const auto columns = [](const I* ck) { return columns16(ck); };
  const auto load = [](const Value* p) { return load16(p); };
  const auto set1 = [](float f) { return _mm512_set1_ps(f); };
  const auto reduce = [](F t) { return _mm512_reduce_add_ps(t); };
#else
  typedef __m256 F;
  const auto inputs = [&](const I* ck) { return inputs8<Windowed>(x, ck); };
  const auto add_in = [&](F& acc, F p, __m256i cols) {
    const __m256i past = _mm256_cmpgt_epi32(cols, _mm256_set1_epi32(static_cast<int>(end - 1)));
    const __m256i in = _mm256_andnot_si256(
        past, _mm256_cmpgt_epi32(cols, _mm256_set1_epi32(static_cast<int>(begin - 1))));
    acc = _mm256_add_ps(acc, _mm256_and_ps(p, _mm256_castsi256_ps(in)));
    return static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(past)));
  };
  const auto columns = [](const I* ck) { return columns8(ck); };
  const auto load = [](const Value* p) { return load8(p); };
  const auto set1 = [](float f) { return _mm256_set1_ps(f); };
  const auto reduce = [](F t) { return hsum8(t); };
#endif
  constexpr int64_t L = sizeof(F) / sizeof(float);
  F acc = set1(0.f), total = set1(0.f);
  for (; k + L <= n; k += L) {
    const F p = load(v + k) * inputs(c + k);
    if (c[k + L - 1] < end) {  // the whole vector in the current group
      acc += p;
      continue;
    }
    const auto cols = columns(c + k);
    for (unsigned past; (past = add_in(acc, p, cols)) != 0;) {
      total += acc * set1(scale[g]);  // the group is finished
      acc = set1(0.f);
      enter(c[k + __builtin_ctz(past)]);  // the first lane past it
    }
  }
  sum = reduce(total + acc * set1(scale[g]));
#endif
  for (; k < n; ++k) {
    if (c[k] >= end) enter(c[k]);
    sum += to_float(v[k]) * x[c[k]] * scale[g];
  }
  return sum;
}

// int8 codes scaled per row and group of `size` inputs: row r's scale of input column c is
// scale[r * groups + c / size]; none (nullptr) with per-row scales, which the output stage
// applies.
struct Groups {
  const float* scale = nullptr;
  int64_t size = 0, groups = 0;

  const float* row(int64_t r) const { return scale + r * groups; }

  // The groups of a core's arguments (group_scales, group_size) for rows of `cols` inputs.
  static Groups of(const float* scale, int64_t size, int64_t cols) {
    return {scale, size, scale ? cols / size : 0};
  }
};

// Row r's sum over its n nonzeros: the dot product, or with group scales each group's dot
// product times the row's scale of that group.
template <bool Windowed, typename Value, typename I>
inline float row_sum(const Value* v, const I* c, int64_t n, const float* x, const Groups& gs,
                     int64_t r) {
  return gs.scale ? grouped_row_dot<Windowed>(v, c, n, x, gs.row(r), gs.size)
                  : row_dot<Windowed>(v, c, n, x);
}

// The scale of each nonzero of one row (Grouped batched kernels): nonzeros met in rising
// columns find their group with one division per group, not per nonzero.
struct GroupCursor {
  const float* scale;  // the row's scales, one per group
  int64_t size, begin = 0, end = 0;
  float current = 0.f;

  float at(int64_t col) {
    if (col < begin || col >= end) {
      const int64_t g = col / size;
      begin = g * size;
      end = begin + size;
      current = scale[g];
    }
    return current;
  }
};

// Whether a row of `nonzeros` of `cols` inputs takes x from windows (row_dot<true>): the
// expected column span of a vector of its nonzeros is at most kMaxFill of the window.
inline bool windows_pay(int64_t cols, int64_t nonzeros) {
  return static_cast<double>((kLanes - 1) * cols) <=
         kMaxFill * static_cast<double>(kWindow) * static_cast<double>(nonzeros);
}

// x (cols inputs) zero-padded by kWindow in this thread's buffer: a window never reads past
// it (reused across calls).
inline const float* padded(const float* x, int64_t cols) {
  thread_local std::vector<float> xpad;
  xpad.assign(cols + kWindow, 0.f);
  std::memcpy(xpad.data(), x, cols * sizeof(float));
  return xpad.data();
}

template <typename Value, typename I>
void gemv(const Value* v, const I* c, const int32_t* rowptr, int64_t rows, int64_t cols,
          const float* x_in, Output out, float* y, int T, const Groups& gs) {
  const float* x = padded(x_in, cols);
#pragma omp parallel num_threads(T)
  {
    int64_t r0, r1;
    thread_rows(rowptr, rows, omp_get_thread_num(), omp_get_num_threads(), &r0, &r1);
    // Software prefetch kPrefetch nonzeros ahead: the x loads fill the out-of-order window,
    // so the hardware prefetchers alone leave DRAM bandwidth unused.
    int64_t ahead = rowptr[r0];
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t s = rowptr[r], e = rowptr[r + 1];
      for (const int64_t stop = std::min<int64_t>(e + kPrefetch, rowptr[r1]); ahead < stop;
           ahead += 32) {
        __builtin_prefetch(v + ahead, 0, 3);  // 32 values: 128 (bf16: 64, int8: 32) bytes
        if (sizeof(Value) == 4) __builtin_prefetch(v + ahead + 16, 0, 3);
        __builtin_prefetch(c + ahead, 0, 3);
      }
      const bool windowed = windows_pay(cols, e - s);
      const float sum = windowed ? row_sum<true>(v + s, c + s, e - s, x, gs, r)
                                 : row_sum<false>(v + s, c + s, e - s, x, gs, r);
      y[r] = finish(out, sum, r);
    }
  }
}

// One row of W times NV vectors of transposed inputs starting at xt (leading dimension ld),
// each value times its group's scale when Grouped (`gs`: the row's scales).
// U independent accumulator sets hide the FMA latency when NV is small.
template <typename V, int NV, bool Grouped, typename Value, typename I>
inline void row_chunk(const Value* v, const I* c, int64_t s, int64_t e, const float* xt,
                      int64_t ld, float* out, GroupCursor gs) {
  constexpr int64_t L = sizeof(V) / sizeof(float);
  constexpr int U = NV >= 6 ? 1 : NV >= 3 ? 2 : 4;
  V acc[U][NV];
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) acc[u][j] = V{};
  int64_t k = s;
  for (; k + U <= e; k += U) {
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
      const float w = Grouped ? to_float(v[k + u]) * gs.at(c[k + u]) : to_float(v[k + u]);
      const float* xr = xt + static_cast<int64_t>(c[k + u]) * ld;
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) {
        V xv;
        __builtin_memcpy(&xv, xr + j * L, sizeof(V));
        acc[u][j] += w * xv;
      }
    }
  }
  for (; k < e; ++k) {
    const float w = Grouped ? to_float(v[k]) * gs.at(c[k]) : to_float(v[k]);
    const float* xr = xt + static_cast<int64_t>(c[k]) * ld;
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) {
      V xv;
      __builtin_memcpy(&xv, xr + j * L, sizeof(V));
      acc[0][j] += w * xv;
    }
  }
#pragma GCC unroll 4
  for (int u = 1; u < U; ++u)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) acc[0][j] += acc[u][j];
  __builtin_memcpy(out, acc[0], sizeof(acc[0]));
}

template <typename V, bool Grouped, typename Value, typename I>
inline void row_chunk_n(int nv, const Value* v, const I* c, int64_t s, int64_t e,
                        const float* xt, int64_t ld, float* out, GroupCursor gs) {
  switch (nv) {
    case 8: row_chunk<V, 8, Grouped>(v, c, s, e, xt, ld, out, gs); break;
    case 7: row_chunk<V, 7, Grouped>(v, c, s, e, xt, ld, out, gs); break;
    case 6: row_chunk<V, 6, Grouped>(v, c, s, e, xt, ld, out, gs); break;
    case 5: row_chunk<V, 5, Grouped>(v, c, s, e, xt, ld, out, gs); break;
    case 4: row_chunk<V, 4, Grouped>(v, c, s, e, xt, ld, out, gs); break;
    case 3: row_chunk<V, 3, Grouped>(v, c, s, e, xt, ld, out, gs); break;
    case 2: row_chunk<V, 2, Grouped>(v, c, s, e, xt, ld, out, gs); break;
    default: row_chunk<V, 1, Grouped>(v, c, s, e, xt, ld, out, gs); break;
  }
}

// Y (batch, rows) = X (batch, cols) @ W.T. X is transposed into xt (cols, ld) so that each
// nonzero w[r, c] is one broadcast-FMA over a contiguous row xt[c, :]. Rows are computed in
// tiles of kRowTile so that results are written to Y as contiguous runs, not 4 KiB strides.
// Grouped: each value times its group's scale (`gs`).
template <typename V, bool Grouped, typename Value, typename I>
void spmm(const Value* v, const I* c, const int32_t* rowptr, const Linear& io,
          const Groups& gs) {
  constexpr int64_t L = sizeof(V) / sizeof(float);
  constexpr int kMaxVec = 8;
  constexpr int64_t kChunk = kMaxVec * L;  // batch columns per pass over a row
  constexpr int64_t kRowTile = 16;
  const int64_t rows = io.rows, cols = io.cols, batch = io.batch;
  const int64_t ld = (batch + L - 1) / L * L;
  float* xt = workspace(cols * ld);
#pragma omp parallel num_threads(io.threads)
  {
    transpose_into(io.x, batch, cols, cols, ld, xt);
    int64_t r0, r1;
    thread_rows(rowptr, rows, omp_get_thread_num(), omp_get_num_threads(), &r0, &r1);
    alignas(64) float tile[kRowTile][kChunk];
    for (int64_t t0 = r0; t0 < r1; t0 += kRowTile) {
      const int64_t t1 = std::min(r1, t0 + kRowTile);
      for (int64_t b0 = 0; b0 < ld; b0 += kChunk) {
        const int nv = static_cast<int>(std::min<int64_t>(kMaxVec, (ld - b0) / L));
        for (int64_t r = t0; r < t1; ++r) {
          row_chunk_n<V, Grouped>(nv, v, c, rowptr[r], rowptr[r + 1], xt + b0, ld,
                                  tile[r - t0], GroupCursor{Grouped ? gs.row(r) : nullptr,
                                                            gs.size});
        }
        const int64_t b1 = std::min<int64_t>(batch, b0 + nv * L);
        for (int64_t b = b0; b < b1; ++b) {
          float* yb = io.y + b * rows;
          for (int64_t r = t0; r < t1; ++r) yb[r] = finish(io.out, tile[r - t0][b - b0], r);
        }
      }
    }
  }
}

template <typename V, typename Value, typename I>
void spmm_scaled(const Value* v, const I* c, const int32_t* rowptr, const Linear& io,
                 const Groups& gs) {
  if (gs.scale) {
    spmm<V, true>(v, c, rowptr, io, gs);
  } else {
    spmm<V, false>(v, c, rowptr, io, gs);
  }
}

template <typename Value, typename I>
void run(const Value* v, const I* c, const CsrArgs& a) {
  const Linear& io = a.io;
  const Groups gs = Groups::of(a.group_scales, a.group_size, io.cols);
  if (io.batch <= kGemvMaxBatch) {  // a few GEMVs beat a half-empty 16-lane SpMM
    for (int64_t b = 0; b < io.batch; ++b) {
      gemv(v, c, a.rowptr, io.rows, io.cols, io.x + b * io.cols, io.out, io.y + b * io.rows,
           io.threads, gs);
    }
  } else if (io.batch <= 8 || kVectorBytes < 64) {  // 16-lane vectors: AVX-512 only
    spmm_scaled<vec8>(v, c, a.rowptr, io, gs);  // 8 lanes up to batch 8: no idle half
  } else {
    spmm_scaled<vec16>(v, c, a.rowptr, io, gs);
  }
}

}  // namespace sparsekit::SPARSEKIT_ISA::csr

namespace sparsekit::SPARSEKIT_ISA {

void csr_linear(const CsrArgs& a) {
  with_values(a.value, a.values, [&](auto v) {
    if (a.narrow) {
      csr::run(v, static_cast<const uint16_t*>(a.col), a);
    } else {
      csr::run(v, static_cast<const int32_t*>(a.col), a);
    }
  });
}

}  // namespace sparsekit::SPARSEKIT_ISA
