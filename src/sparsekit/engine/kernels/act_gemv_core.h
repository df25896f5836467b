// The activation-sparse GEMV core (see act_gemv.cpp for the op), compiled once per
// instruction set (cores_impl.h): y = Output(sum over the kept inputs j of x_j * wt[j, :])
// for float32, bf16 or int8 (scaled per output) weights, fp32 sums.

namespace sparsekit::SPARSEKIT_ISA::act {

constexpr int64_t kAlign = 16;  // floats per 64-byte cache line: slices start on a line
// Outputs per tile: their sums (64 KiB) stay in L2 while every kept row of wt streams its run
// of the tile. 2048 (sums in L1) split each row of an 11008-output layer into runs of 2-8
// KiB, each restarting the prefetchers: 16384 ran 11008x4096 at 50 % x 50 % 1.1-1.6x faster
// from cold caches in fp32, bf16 and int8 (AMD Zen 3, 2 threads, two interleaved pairs of
// runs), as the bitmap-column kernel's tiles did (act_bitmap_gemv_core.h); layers of at most
// 2048 outputs per thread are one tile either way.
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

// y[o0:o1] = Output(sum over kept j of x_j * wt[j, o0:o1]), tile by tile.
template <typename W, typename B>
void slice(const W* wt, int64_t out, const int32_t* idx, const float* val,
           int64_t nnz, const float* scale, const B* bias, float* y, int64_t o0, int64_t o1) {
  for (int64_t t0 = o0; t0 < o1; t0 += kTile) {
    const int64_t n = std::min(kTile, o1 - t0);
    float* yt = y + t0;
    start(yt, scale, bias ? bias + t0 : nullptr, n);
    int64_t k = 0;
    for (; k + 4 <= nnz; k += 4) {
      axpy4(yt, wt + idx[k] * out + t0, wt + idx[k + 1] * out + t0, wt + idx[k + 2] * out + t0,
            wt + idx[k + 3] * out + t0, val[k], val[k + 1], val[k + 2], val[k + 3], n);
    }
    for (; k < nnz; ++k) axpy1(yt, wt + idx[k] * out + t0, val[k], n);
    if (scale) scale_add(yt, scale + t0, bias ? bias + t0 : nullptr, n);
  }
}

// Calls body(bias) with the bias as const float* or const bf16* (`is_bf16`).
template <typename Body>
inline void with_bias(bool is_bf16, const void* bias, Body&& body) {
  if (is_bf16) body(static_cast<const bf16*>(bias)); else body(static_cast<const float*>(bias));
}

}  // namespace sparsekit::SPARSEKIT_ISA::act

namespace sparsekit::SPARSEKIT_ISA {

void act_gemv(const ActGemvArgs& a) {
  with_values(a.value, a.wt, [&](auto wt) {
    act::with_bias(a.bias_bf16, a.bias, [&](auto bias) {
#pragma omp parallel num_threads(a.threads) if (a.threads > 1)
      {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int64_t lines = (a.out + act::kAlign - 1) / act::kAlign;
        const int64_t o0 = std::min(a.out, lines * t / nt * act::kAlign);
        const int64_t o1 = std::min(a.out, lines * (t + 1) / nt * act::kAlign);
        act::slice(wt, a.out, a.idx, a.val, a.nnz, a.scale, bias, a.y, o0, o1);
      }
    });
  });
}

}  // namespace sparsekit::SPARSEKIT_ISA
