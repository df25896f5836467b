// The dense low-precision core (see dense.cpp for the op): y = x @ W.T for a dense W stored
// as bf16 (2 bytes per weight) or int8 codes scaled per row (1 byte), fp32 sums. Compiled
// once per instruction set (cores_impl.h).
//
// One register-blocked micro-kernel (dot_block) serves every batch size: kRows rows of W
// against up to kCols rows of x at a time, each stored weight widened to fp32 once per
// block and used kCols times, each input vector loaded once and used kRows times, with
// kRows * kCols fp32 accumulators (an int8 row's sums are scaled once, by the output
// stage). W is streamed from memory exactly once: its kRows rows (4-32 KiB) stay in L1
// while every chunk of x passes them. At batch 1-3 that is a GEMV at the bandwidth floor; at
// larger batches x is re-read from cache. Rows are split evenly across OpenMP threads, in
// whole blocks.

namespace sparsekit::SPARSEKIT_ISA::dense {

constexpr int kRows = 4;  // rows of W per block
constexpr int kCols = 3;  // rows of x per block: 12 accumulators (AVX2 has 16 registers)

// Each of NR rows' line kPrefetchBytes past input k, once per line (where k starts one).
template <int NR, typename Value>
__attribute__((always_inline)) inline void prefetch_rows(const Value* w, int64_t ldw, int64_t k) {
  if ((k * sizeof(Value)) % 64 == 0) {
    for (int r = 0; r < NR; ++r) prefetch_ahead(w + r * ldw + k);
  }
}

// out[r * NB + b] = sum_k w[r * ldw + k] * x[b * ldx + k] for r < NR, b < NB: NR rows of W
// (Value: int8, bf16 or fp32) against NB rows of fp32 inputs, n inputs each.
template <int NR, int NB, typename Value>
inline void dot_block(const Value* w, int64_t ldw, const float* x, int64_t ldx, int64_t n,
                      float* out) {
  int64_t k = 0;
  float acc[NR][NB] = {};
#if SPARSEKIT_AVX512
  __m512 a[NR][NB];
  for (int r = 0; r < NR; ++r)
    for (int b = 0; b < NB; ++b) a[r][b] = _mm512_setzero_ps();
  for (; k + 16 <= n; k += 16) {
    prefetch_rows<NR>(w, ldw, k);
    __m512 xv[NB];
    for (int b = 0; b < NB; ++b) xv[b] = _mm512_loadu_ps(x + b * ldx + k);
    for (int r = 0; r < NR; ++r) {
      const __m512 wv = load16(w + r * ldw + k);
      for (int b = 0; b < NB; ++b) a[r][b] = _mm512_fmadd_ps(wv, xv[b], a[r][b]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_reduce_add_ps(a[r][b]);
#elif SPARSEKIT_AVX2
  __m256 a[NR][NB];
  for (int r = 0; r < NR; ++r)
    for (int b = 0; b < NB; ++b) a[r][b] = _mm256_setzero_ps();
  for (; k + 8 <= n; k += 8) {
    prefetch_rows<NR>(w, ldw, k);
    __m256 xv[NB];
    for (int b = 0; b < NB; ++b) xv[b] = _mm256_loadu_ps(x + b * ldx + k);
    for (int r = 0; r < NR; ++r) {
      const __m256 wv = load8(w + r * ldw + k);
      for (int b = 0; b < NB; ++b) a[r][b] = _mm256_fmadd_ps(wv, xv[b], a[r][b]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int b = 0; b < NB; ++b) acc[r][b] = hsum8(a[r][b]);
#endif
  for (; k < n; ++k) {
    for (int r = 0; r < NR; ++r) {
      const float wk = to_float(w[r * ldw + k]);
      for (int b = 0; b < NB; ++b) acc[r][b] += wk * x[b * ldx + k];
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int b = 0; b < NB; ++b) out[r * NB + b] = acc[r][b];
}

// dot_block for NR rows and a run-time nb <= kCols rows of x.
template <int NR, typename Value>
inline void dot_block_nb(int nb, const Value* w, int64_t ldw, const float* x, int64_t ldx,
                         int64_t n, float* out) {
  switch (nb) {
    case 3: dot_block<NR, 3>(w, ldw, x, ldx, n, out); break;
    case 2: dot_block<NR, 2>(w, ldw, x, ldx, n, out); break;
    default: dot_block<NR, 1>(w, ldw, x, ldx, n, out); break;
  }
}

// out[r * nb + b] = sum_g scales[r * groups + g] * (the dot of row r's group g with row b of
// x): dot_block per group of `size` inputs, its sums scaled and added up (int8 codes with
// per-group scales; the per-row scale of io.out is then null). A horizontal sum per group
// and row (every 128 inputs at the usual size) costs a few instructions per 512 bytes of
// int8 weights, which stream from memory at batch 1.
template <int NR, typename Value>
inline void grouped_dot_block_nb(int nb, const Value* w, int64_t ldw, const float* x,
                                 int64_t ldx, const float* scales, int64_t size, float* out) {
  const int64_t groups = size ? ldw / size : 0;
  float part[NR * kCols];
  for (int i = 0; i < NR * nb; ++i) out[i] = 0.f;
  for (int64_t g = 0; g < groups; ++g) {
    dot_block_nb<NR>(nb, w + g * size, ldw, x + g * size, ldx, size, part);
    for (int r = 0; r < NR; ++r) {
      const float s = scales[r * groups + g];
      for (int b = 0; b < nb; ++b) out[r * nb + b] += s * part[r * nb + b];
    }
  }
}

// y = Output(x @ W.T) for a dense W of Value (rows, cols), int8 codes scaled per group where
// `group_scales` is given. Each thread streams its rows of W once, kRows at a time.
template <typename Value>
void run(const Value* w, const Linear& io, const float* group_scales, int64_t group_size) {
  const int64_t rows = io.rows, cols = io.cols, batch = io.batch;
  const float* x = io.x;
  float* y = io.y;
#pragma omp parallel num_threads(io.threads)
  {
    const int t = omp_get_thread_num(), threads = omp_get_num_threads();
    const int64_t blocks = (rows + kRows - 1) / kRows;  // whole blocks per thread
    const int64_t r0 = std::min(rows, blocks * t / threads * kRows);
    const int64_t r1 = std::min(rows, blocks * (t + 1) / threads * kRows);
    float out[kRows * kCols];
    for (int64_t q0 = r0; q0 < r1; q0 += kRows) {
      const int nr = static_cast<int>(std::min<int64_t>(kRows, r1 - q0));
      const Value* wq = w + q0 * cols;
      for (int64_t b0 = 0; b0 < batch; b0 += kCols) {
        const int nb = static_cast<int>(std::min<int64_t>(kCols, batch - b0));
        const float* xb = x + b0 * cols;
        if (group_scales) {
          const int64_t groups = group_size ? cols / group_size : 0;
          const float* sq = group_scales + q0 * groups;
          if (nr == kRows) {
            grouped_dot_block_nb<kRows>(nb, wq, cols, xb, cols, sq, group_size, out);
          } else {
            for (int r = 0; r < nr; ++r) {
              grouped_dot_block_nb<1>(nb, wq + r * cols, cols, xb, cols, sq + r * groups,
                                      group_size, out + r * nb);
            }
          }
        } else if (nr == kRows) {
          dot_block_nb<kRows>(nb, wq, cols, xb, cols, cols, out);
        } else {
          for (int r = 0; r < nr; ++r) {
            dot_block_nb<1>(nb, wq + r * cols, cols, xb, cols, cols, out + r * nb);
          }
        }
        for (int r = 0; r < nr; ++r) {
          for (int b = 0; b < nb; ++b) {
            y[(b0 + b) * rows + q0 + r] = finish(io.out, out[r * nb + b], q0 + r);
          }
        }
      }
    }
  }
}

}  // namespace sparsekit::SPARSEKIT_ISA::dense

namespace sparsekit::SPARSEKIT_ISA {

// y = x @ W.T for a dense W of bf16 or int8 (scaled per row or per group) values.
inline void dense_linear(const DenseArgs& a) {
  with_values(a.value, a.weight,
              [&](auto w) { dense::run(w, a.io, a.group_scales, a.group_size); });
}

}  // namespace sparsekit::SPARSEKIT_ISA
