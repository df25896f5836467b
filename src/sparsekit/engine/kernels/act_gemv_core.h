// The activation-sparse GEMV core (see act_gemv.cpp for the op), compiled once per
// instruction set (cores_impl.h): y = Output(sum over the kept inputs j of x_j * wt[j, :])
// for float32, bf16 or int8 (scaled per output) weights, fp32 sums.

namespace sparsekit::SPARSEKIT_ISA::act {

// Outputs per tile: their sums (64 KiB) stay in L2 while every kept row of wt streams its run
// of the tile. 2048 (sums in L1) split each row of an 11008-output layer into runs of 2-8
// KiB, each restarting the prefetchers: 16384 ran 11008x4096 at 50 % x 50 % 1.1-1.6x faster
// from cold caches in fp32, bf16 and int8 (AMD Zen 3, 2 threads, two interleaved pairs of
// runs), as the bitmap-column kernel's tiles did (act_bitmap_gemv_core.h).
constexpr int64_t kTile = 16384;

// y[0:n] += sum over k < 4 of a[k] * w[k][0:n] (four rows at once: fewer passes over y).
template <typename W>
inline void axpy4(float* __restrict y, const W* __restrict w0, const W* __restrict w1,
                  const W* __restrict w2, const W* __restrict w3, float a0, float a1, float a2,
                  float a3, int64_t n) {
#pragma omp simd
  for (int64_t o = 0; o < n; ++o) {
    y[o] += a0 * to_float(w0[o]) + a1 * to_float(w1[o]) + a2 * to_float(w2[o]) +
            a3 * to_float(w3[o]);
  }
}

template <typename W>
inline void axpy1(float* __restrict y, const W* __restrict w, float a, int64_t n) {
#pragma omp simd
  for (int64_t o = 0; o < n; ++o) y[o] += a * to_float(w[o]);
}

#if SPARSEKIT_AVX2 && !SPARSEKIT_AVX512
// int8 rows on AVX2, 8 codes at a time widened by one vpmovsxbd from memory: the vectoriser
// widened 32 codes through 16-bit lanes (a vpmovsxbw, two extracts and four vpmovsxwd per row
// and 32 outputs), and those shuffles bound the loop (Zen 3, 2 threads, 50 % of the rows of
// 2048x2048 from memory: 0.148 ms against 0.124 for all of the dense int8 GEMV; now 0.115,
// and 11008x4096 1.30 -> 0.67 ms, at the streaming rate).
inline __m256 codes8(const int8_t* p) {
  const __m128i codes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(codes));
}
inline void axpy4(float* __restrict y, const int8_t* __restrict w0, const int8_t* __restrict w1,
                  const int8_t* __restrict w2, const int8_t* __restrict w3, float a0, float a1,
                  float a2, float a3, int64_t n) {
  const __m256 v0 = _mm256_set1_ps(a0), v1 = _mm256_set1_ps(a1), v2 = _mm256_set1_ps(a2),
               v3 = _mm256_set1_ps(a3);
  int64_t o = 0;
  for (; o + 8 <= n; o += 8) {
    __m256 s = _mm256_fmadd_ps(v0, codes8(w0 + o), _mm256_loadu_ps(y + o));
    s = _mm256_fmadd_ps(v1, codes8(w1 + o), s);
    s = _mm256_fmadd_ps(v2, codes8(w2 + o), s);
    _mm256_storeu_ps(y + o, _mm256_fmadd_ps(v3, codes8(w3 + o), s));
  }
  for (; o < n; ++o) y[o] += a0 * w0[o] + a1 * w1[o] + a2 * w2[o] + a3 * w3[o];
}
#endif

// y[0:n] = scale[0:n] * y[0:n] + bias[0:n] (the output stage of scaled int8 sums; bias may be
// nullptr).
template <typename B>
inline void scale_add(float* __restrict y, const float* __restrict scale,
                      const B* __restrict bias, int64_t n) {
  if (bias) {
    for (int64_t o = 0; o < n; ++o) y[o] = y[o] * scale[o] + to_float(bias[o]);
  } else {
    for (int64_t o = 0; o < n; ++o) y[o] *= scale[o];
  }
}

// y[0:n] = bias[0:n] (zero without a bias, or with a scale, which the bias follows).
template <typename B>
inline void start(float* __restrict y, const float* scale, const B* __restrict bias,
                  int64_t n) {
  if (bias && !scale) {
    for (int64_t o = 0; o < n; ++o) y[o] = to_float(bias[o]);
  } else {
    std::fill(y, y + n, 0.f);
  }
}

// y[0:n] = Output(the sum of the `count` partial sums parts[i], whose output o is at
// parts[i][index(at + o)]): start, add, scale.
template <typename B, typename Index>
inline void output_sums(float* __restrict y, const float* scale, const B* bias, int64_t n,
                        const float* const* parts, int count, int64_t at, Index index) {
  start(y, scale, bias, n);
  for (int i = 0; i < count; ++i) {
    const float* part = parts[i];
    for (int64_t o = 0; o < n; ++o) y[o] += part[index(at + o)];
  }
  if (scale) scale_add(y, scale, bias, n);
}

// On the threads of the enclosing parallel region, a tile of `tile` units at a time (of
// `units`, each `unit` sums of type S: float32, or int32 for the exact integer dot products
// of the W8A8 kernel, act_bitmap_qgemv_core.h, which takes the whole layer as one tile):
// add(k0, k1, u0, u1, sums) adds this thread's share [k0, k1) of the `kept` inputs over
// units [u0, u1) into its own sums (parts[thread], zeroed), then, after a barrier,
// write(u0, u1, parts, count, first) writes this thread's share of the tile's units from
// every thread's sums (whose first unit is `first`).
// Each thread so reads every kept input's run of the tile whole: splitting the outputs
// instead (each thread every kept input's run over its outputs) cut the runs to 1 / threads
// of their length, and short runs are what the prefetchers follow worst. On Zen 3 (2
// threads, bf16, 50 % x 50 %, weights streamed from memory) the bitmap columns ran 2048x2048
// 1.09x and 2048x5632 1.15x faster so, 5632x2048 and 11008x4096 alike; act_gemv's
// transposed rows 1.47x, 1.3x, 1.2x and 1.1x (int8: 1.05-1.4x).
template <typename S, typename Add, typename Write>
__attribute__((always_inline)) inline void share_kept(int64_t kept, int64_t units, int64_t tile,
                                                      int64_t unit, S** parts,
                                                      Add add, Write write) {
  static_assert(sizeof(S) == sizeof(float), "the sums live in the float workspace");
  const int t = omp_get_thread_num(), nt = omp_get_num_threads();
  S* sums = reinterpret_cast<S*>(workspace(std::min(tile, units) * unit));
  parts[t] = sums;
  const int64_t k0 = kept * t / nt, k1 = kept * (t + 1) / nt;
  for (int64_t t0 = 0; t0 < units; t0 += tile) {
    const int64_t t1 = std::min(units, t0 + tile);
    std::fill(sums, sums + (t1 - t0) * unit, S{});
    add(k0, k1, t0, t1, sums);
    if (nt == 1) {
      write(t0, t1, parts, 1, t0);
      continue;
    }
#pragma omp barrier
    write(t0 + (t1 - t0) * t / nt, t0 + (t1 - t0) * (t + 1) / nt, parts, nt, t0);
#pragma omp barrier
  }
}

// Kept rows ahead of the four being added whose runs are prefetched meanwhile (add_rows).
// A kept row is a run of `out` weights starting anywhere, and the runs come in no pattern
// the hardware prefetchers learn before a short run ends. Prefetching to L2, line by line in
// step with the additions, the run of the rows two groups of four ahead (one group ahead was
// too late, three no better) read the rows of 50 % of the inputs from memory 1.15-1.25x
// faster in bf16 and int8 on the LLaMA shapes (2048x2048, 5632x2048, 2048x5632; AMD Zen 3, 2
// threads, a standalone copy of this loop); prefetching whole runs at once was 1.2x slower.
constexpr int64_t kPrefetchRowsAhead = 8;

// sums[0:n) += sum over i < 4 of a[i] * w[i][0:n), prefetching next[i][0:n) to L2 a cache
// line of each at a time.
template <typename W>
__attribute__((always_inline)) inline void axpy4_prefetching(float* __restrict sums,
                                                             const W* const* w,
                                                             const W* const* next,
                                                             const float* a, int64_t n) {
  constexpr int64_t kLine = 64 / sizeof(W);
  int64_t o = 0;
  for (; o + kLine <= n; o += kLine) {
    for (int i = 0; i < 4; ++i) __builtin_prefetch(next[i] + o, 0, 2);
    axpy4(sums + o, w[0] + o, w[1] + o, w[2] + o, w[3] + o, a[0], a[1], a[2], a[3], kLine);
  }
  axpy4(sums + o, w[0] + o, w[1] + o, w[2] + o, w[3] + o, a[0], a[1], a[2], a[3], n - o);
}

// sums[0:u1 - u0) += sum over kept j in [k0, k1) of x_j * wt[j, u0:u1), four rows at a time,
// the rows kPrefetchRowsAhead further prefetched meanwhile.
template <typename W>
inline void add_rows(const W* wt, int64_t out, const int32_t* idx, const float* val,
                     int64_t k0, int64_t k1, int64_t u0, int64_t u1, float* sums) {
  const int64_t n = u1 - u0;
  const auto row = [&](int64_t k) { return wt + idx[k] * out + u0; };
  int64_t k = k0;
  for (; k + 4 + kPrefetchRowsAhead <= k1; k += 4) {
    const W* w[4] = {row(k), row(k + 1), row(k + 2), row(k + 3)};
    const int64_t f = k + kPrefetchRowsAhead;
    const W* next[4] = {row(f), row(f + 1), row(f + 2), row(f + 3)};
    axpy4_prefetching(sums, w, next, val + k, n);
  }
  for (; k + 4 <= k1; k += 4) {
    axpy4(sums, row(k), row(k + 1), row(k + 2), row(k + 3), val[k], val[k + 1], val[k + 2],
          val[k + 3], n);
  }
  for (; k < k1; ++k) axpy1(sums, row(k), val[k], n);
}

// int8 codes scaled per group of `size` inputs and output: scale (groups, out), the
// transposed grid (nullptr: one scale per output, applied by the output stage).
struct ActGroups {
  const float* scale;
  int64_t size, out;
};

// add(k0, k1, sums) for int8 codes scaled per group of inputs: the kept inputs rise, so each
// group's are one run of them, added by add(run start, run end, scratch) into this thread's
// scratch (n sums laid out as `sums`, output o at index(o)), then added into the sums times
// the group's scales of outputs [o0, o0 + outputs) and cleared. One pass over the tile's
// sums per group of inputs against one per kept input for the products themselves. Inlined
// with `add` where it is called: the bitmap columns' expansions are compiled for their own
// target (act_bitmap_gemv_core.h), which a separate function would not have (1.35x slower).
template <typename Index, typename Add>
__attribute__((always_inline)) inline void add_by_group(const ActGroups& g, const int32_t* idx,
                                                        int64_t k0, int64_t k1, int64_t o0,
                                                        int64_t outputs, int64_t n,
                                                        float* __restrict sums, Index index,
                                                        Add add) {
  thread_local std::vector<float> buffer;  // grows only: no allocation per call
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
  float* __restrict scratch = buffer.data();
  std::fill(scratch, scratch + n, 0.f);  // positions past the outputs are never cleared
  for (int64_t k = k0; k < k1;) {
    const int64_t group = idx[k] / g.size, end = (group + 1) * g.size;
    int64_t e = k + 1;
    while (e < k1 && idx[e] < end) ++e;
    add(k, e, scratch);
    const float* __restrict scale = g.scale + group * g.out + o0;
    for (int64_t o = 0; o < outputs; ++o) {
      const int64_t i = index(o);
      sums[i] += scratch[i] * scale[o];
      scratch[i] = 0.f;
    }
    k = e;
  }
}

// Calls body(bias) with the bias as const float* or const bf16* (`is_bf16`).
template <typename Body>
inline void with_bias(bool is_bf16, const void* bias, Body&& body) {
  if (is_bf16) body(static_cast<const bf16*>(bias)); else body(static_cast<const float*>(bias));
}

}  // namespace sparsekit::SPARSEKIT_ISA::act

namespace sparsekit::SPARSEKIT_ISA {

// The threads share the kept inputs (act::share_kept), a tile of kTile outputs at a time;
// with group scales each group's run of them is summed apart (act::add_by_group).
void act_gemv(const ActGemvArgs& a) {
  const act::ActGroups groups{a.group_scales, a.group_size, a.out};
  with_values(a.value, a.wt, [&](auto wt) {
    act::with_bias(a.bias_bf16, a.bias, [&](auto bias) {
      std::vector<float*> parts(std::max(1, a.threads));  // each thread's sums
#pragma omp parallel num_threads(a.threads) if (a.threads > 1)
      act::share_kept(
          a.nnz, a.out, act::kTile, 1, parts.data(),
          [&](int64_t k0, int64_t k1, int64_t u0, int64_t u1, float* sums) {
            const auto add = [&](int64_t r0, int64_t r1, float* s) {
              act::add_rows(wt, a.out, a.idx, a.val, r0, r1, u0, u1, s);
            };
            if (groups.scale) {
              act::add_by_group(groups, a.idx, k0, k1, u0, u1 - u0, u1 - u0, sums,
                                [](int64_t o) { return o; }, add);
            } else {
              add(k0, k1, sums);
            }
          },
          [&](int64_t u0, int64_t u1, const float* const* sums, int count, int64_t first) {
            act::output_sums(a.y + u0, a.scale ? a.scale + u0 : nullptr,
                             bias ? bias + u0 : nullptr, u1 - u0, sums, count, u0 - first,
                             [](int64_t o) { return o; });
          });
    });
  });
}

}  // namespace sparsekit::SPARSEKIT_ISA
