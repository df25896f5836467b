// The activation-sparse GEMV core (see act_gemv.cpp for the op), compiled once per
// instruction set (cores_impl.h): y = bias + sum over the kept inputs j of x_j * wt[j, :].

namespace sparsekit::SPARSEKIT_ISA::act {

constexpr int64_t kAlign = 16;  // floats per 64-byte cache line: slices start on a line
constexpr int64_t kTile = 2048;  // outputs per tile: 8 KiB of y stays in L1 while rows stream

inline float widen(float v) { return v; }
inline float widen(bf16 v) { return to_float(v); }

// y[0:n] += sum over k < 4 of a[k] * w[k][0:n] (four rows at once: fewer passes over y).
template <typename W>
inline void axpy4(float* __restrict y, const W* __restrict w0, const W* __restrict w1,
                  const W* __restrict w2, const W* __restrict w3, float a0, float a1, float a2,
                  float a3, int64_t n) {
#pragma omp simd
  for (int64_t o = 0; o < n; ++o) {
    y[o] += a0 * widen(w0[o]) + a1 * widen(w1[o]) + a2 * widen(w2[o]) + a3 * widen(w3[o]);
  }
}

template <typename W>
inline void axpy1(float* __restrict y, const W* __restrict w, float a, int64_t n) {
#pragma omp simd
  for (int64_t o = 0; o < n; ++o) y[o] += a * widen(w[o]);
}

// y[o0:o1] = bias + sum over kept j of x_j * wt[j, o0:o1], tile by tile.
template <typename W>
void slice(const W* wt, int64_t out, const int64_t* idx, const float* val, int64_t nnz,
           const W* bias, float* y, int64_t o0, int64_t o1) {
  for (int64_t t0 = o0; t0 < o1; t0 += kTile) {
    const int64_t n = std::min(kTile, o1 - t0);
    float* yt = y + t0;
    for (int64_t o = 0; o < n; ++o) yt[o] = bias ? widen(bias[t0 + o]) : 0.f;
    int64_t k = 0;
    for (; k + 4 <= nnz; k += 4) {
      axpy4(yt, wt + idx[k] * out + t0, wt + idx[k + 1] * out + t0, wt + idx[k + 2] * out + t0,
            wt + idx[k + 3] * out + t0, val[k], val[k + 1], val[k + 2], val[k + 3], n);
    }
    for (; k < nnz; ++k) axpy1(yt, wt + idx[k] * out + t0, val[k], n);
  }
}

}  // namespace sparsekit::SPARSEKIT_ISA::act

namespace sparsekit::SPARSEKIT_ISA {

void act_gemv(const ActGemvArgs& a) {
  auto run = [&](auto zero) {
    using W = decltype(zero);
    const W* wt = static_cast<const W*>(a.wt);
    const W* bias = static_cast<const W*>(a.bias);
#pragma omp parallel num_threads(a.threads) if (a.threads > 1)
    {
      const int t = omp_get_thread_num(), nt = omp_get_num_threads();
      const int64_t lines = (a.out + act::kAlign - 1) / act::kAlign;
      const int64_t o0 = std::min(a.out, lines * t / nt * act::kAlign);
      const int64_t o1 = std::min(a.out, lines * (t + 1) / nt * act::kAlign);
      act::slice(wt, a.out, a.idx, a.val, a.nnz, bias, a.y, o0, o1);
    }
  };
  if (a.is_bf16) run(bf16{}); else run(float{});
}

}  // namespace sparsekit::SPARSEKIT_ISA
