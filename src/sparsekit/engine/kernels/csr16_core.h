// The CSR kernel core (see csr16.cpp for the op): y = x @ W.T for W in CSR with fp32, bf16
// or int8 values and uint16 or int32 column indices. Compiled once per instruction set
// (cores_impl.h).
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
      const int64_t first = c[k];
      const __m512 xv = c[k + 15] - first < kWindow
          ? window16(x + first, _mm512_sub_epi32(columns16(c + k),
                                                 _mm512_set1_epi32(static_cast<int>(first))))
          : gather16(x, c + k);
      a0 = _mm512_fmadd_ps(load16(v + k), xv, a0);
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
      const int64_t first = c[k];
      const __m256 xv = c[k + 7] - first < kWindow
          ? window8(x + first, _mm256_sub_epi32(columns8(c + k),
                                                _mm256_set1_epi32(static_cast<int>(first))))
          : gather8(x, c + k);
      a0 = _mm256_fmadd_ps(load8(v + k), xv, a0);
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
          const float* x_in, Output out, float* y, int T) {
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
      const float sum = windowed ? row_dot<true>(v + s, c + s, e - s, x)
                                 : row_dot<false>(v + s, c + s, e - s, x);
      y[r] = finish(out, sum, r);
    }
  }
}

// One row of W times NV vectors of transposed inputs starting at xt (leading dimension ld).
// U independent accumulator sets hide the FMA latency when NV is small.
template <typename V, int NV, typename Value, typename I>
inline void row_chunk(const Value* v, const I* c, int64_t s, int64_t e, const float* xt,
                      int64_t ld, float* out) {
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
      const float w = to_float(v[k + u]);
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
    const float w = to_float(v[k]);
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

template <typename V, typename Value, typename I>
inline void row_chunk_n(int nv, const Value* v, const I* c, int64_t s, int64_t e,
                        const float* xt, int64_t ld, float* out) {
  switch (nv) {
    case 8: row_chunk<V, 8>(v, c, s, e, xt, ld, out); break;
    case 7: row_chunk<V, 7>(v, c, s, e, xt, ld, out); break;
    case 6: row_chunk<V, 6>(v, c, s, e, xt, ld, out); break;
    case 5: row_chunk<V, 5>(v, c, s, e, xt, ld, out); break;
    case 4: row_chunk<V, 4>(v, c, s, e, xt, ld, out); break;
    case 3: row_chunk<V, 3>(v, c, s, e, xt, ld, out); break;
    case 2: row_chunk<V, 2>(v, c, s, e, xt, ld, out); break;
    default: row_chunk<V, 1>(v, c, s, e, xt, ld, out); break;
  }
}

// Y (batch, rows) = X (batch, cols) @ W.T. X is transposed into xt (cols, ld) so that each
// nonzero w[r, c] is one broadcast-FMA over a contiguous row xt[c, :]. Rows are computed in
// tiles of kRowTile so that results are written to Y as contiguous runs, not 4 KiB strides.
template <typename V, typename Value, typename I>
void spmm(const Value* v, const I* c, const int32_t* rowptr, const Linear& io) {
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
          row_chunk_n<V>(nv, v, c, rowptr[r], rowptr[r + 1], xt + b0, ld, tile[r - t0]);
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

template <typename Value, typename I>
void run(const Value* v, const I* c, const CsrArgs& a) {
  const Linear& io = a.io;
  if (io.batch <= kGemvMaxBatch) {  // a few GEMVs beat a half-empty 16-lane SpMM
    for (int64_t b = 0; b < io.batch; ++b) {
      gemv(v, c, a.rowptr, io.rows, io.cols, io.x + b * io.cols, io.out, io.y + b * io.rows,
           io.threads);
    }
  } else if (io.batch <= 8 || kVectorBytes < 64) {  // 16-lane vectors: AVX-512 only
    spmm<vec8>(v, c, a.rowptr, io);  // 8 lanes up to batch 8: no idle half
  } else {
    spmm<vec16>(v, c, a.rowptr, io);
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
