// Dense low-precision kernel for y = x @ W.T (+ bias) on CPU: W stored as bf16 (2 bytes per
// weight) or as int8 codes with one float32 scale per row (1 byte per weight), so that a
// layer below the sparse break-even still moves 2-4x fewer bytes than fp32.
//
// One register-blocked micro-kernel (dot_block) serves every batch size: kRows rows of W
// against up to kCols rows of x at a time, each stored weight widened to fp32 once per
// block and used kCols times, each input vector loaded once and used kRows times, with
// kRows * kCols fp32 accumulators (an int8 row's sums are scaled once at the end). W is
// streamed from memory exactly once: its kRows rows (4-32 KiB) stay in L1 while every
// chunk of x passes them. At batch 1-3 that is a GEMV at the bandwidth floor; at larger
// batches x is re-read from cache. Rows are split evenly across OpenMP threads.
//
// The arithmetic is a plain pointer function, one body per ISA under
// #if defined(__AVX512F__) / #elif defined(__AVX2__) / portable, ready for a per-ISA
// dispatch table.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "common.h"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int kRows = 4;  // rows of W per block
constexpr int kCols = 3;  // rows of x per block: 12 accumulators (AVX2 has 16 registers)

using sparsekit::bf16;

#if defined(__AVX2__) && !defined(__AVX512F__)
inline float hsum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}
#endif

// out[r * NB + b] = sum_k w[r * ldw + k] * x[b * ldx + k] for r < NR, b < NB: NR rows of W
// (Value: int8, bf16 or fp32) against NB rows of fp32 inputs, n inputs each.
template <int NR, int NB, typename Value>
inline void dot_block(const Value* w, int64_t ldw, const float* x, int64_t ldx, int64_t n,
                      float* out) {
  using namespace sparsekit;  // load16 / load8: int8, bf16 or fp32 widened to fp32
  int64_t k = 0;
  float acc[NR][NB] = {};
#if defined(__AVX512F__)
  __m512 a[NR][NB];
  for (int r = 0; r < NR; ++r)
    for (int b = 0; b < NB; ++b) a[r][b] = _mm512_setzero_ps();
  for (; k + 16 <= n; k += 16) {
    __m512 xv[NB];
    for (int b = 0; b < NB; ++b) xv[b] = _mm512_loadu_ps(x + b * ldx + k);
    for (int r = 0; r < NR; ++r) {
      const __m512 wv = load16(w + r * ldw + k);
      for (int b = 0; b < NB; ++b) a[r][b] = _mm512_fmadd_ps(wv, xv[b], a[r][b]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_reduce_add_ps(a[r][b]);
#elif defined(__AVX2__)
  __m256 a[NR][NB];
  for (int r = 0; r < NR; ++r)
    for (int b = 0; b < NB; ++b) a[r][b] = _mm256_setzero_ps();
  for (; k + 8 <= n; k += 8) {
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
      const float wk = static_cast<float>(w[r * ldw + k]);
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

// y (batch, rows) = x (batch, cols) @ W.T, each sum times scales[r] (if any) plus bias[r]
// (if any). Each thread streams its rows of W once, kRows at a time.
template <typename Value>
void run(const Value* w, int64_t rows, int64_t cols, const float* x, int64_t batch,
         const float* scales, const float* bias, float* y, int T) {
#pragma omp parallel num_threads(T)
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
        if (nr == kRows) {
          dot_block_nb<kRows>(nb, wq, cols, xb, cols, cols, out);
        } else {
          for (int r = 0; r < nr; ++r) {
            dot_block_nb<1>(nb, wq + r * cols, cols, xb, cols, cols, out + r * nb);
          }
        }
        for (int r = 0; r < nr; ++r) {
          const int64_t row = q0 + r;
          const float scale = scales ? scales[row] : 1.f, shift = bias ? bias[row] : 0.f;
          for (int b = 0; b < nb; ++b) y[(b0 + b) * rows + row] = out[r * nb + b] * scale + shift;
        }
      }
    }
  }
}

// y = x @ W.T (+ bias) for x (batch, in_features) fp32 or bf16 (y in its dtype) and a dense
// W (rows, in_features) of bf16 values, or of int8 codes with float32 scales (rows,):
// y[b, r] = scales[r] * sum_k W[r, k] * x[b, k]. Sums are fp32.
at::Tensor dense_linear(const at::Tensor& weight, const at::Tensor& x_in,
                        const std::optional<at::Tensor>& bias, int64_t in_features,
                        int64_t threads, const std::optional<at::Tensor>& scales) {
  sparsekit::check_input_or_bf16(x_in, in_features);
  sparsekit::check_tensor(weight, "weight", 2);
  const bool int8 = weight.scalar_type() == at::kChar;
  TORCH_CHECK(int8 || weight.scalar_type() == at::kBFloat16, "weight must be ", at::kChar,
              " or ", at::kBFloat16, ", got ", weight.scalar_type());
  sparsekit::check_size(weight, "weight", 1, in_features);
  const int64_t rows = weight.size(0);
  const bool scaled = scales.has_value() && scales->defined();
  TORCH_CHECK(scaled == int8, "scales must be given for int8 weight values and only for them "
              "(weight is ", weight.scalar_type(), ", scales ", scaled ? "given" : "missing", ")");
  const float* s = nullptr;
  if (scaled) {
    sparsekit::check_tensor(*scales, "scales", 1, at::kFloat);
    sparsekit::check_size(*scales, "scales", 0, rows);
    s = scales->data_ptr<float>();
  }
  const float* b = sparsekit::bias_data(bias, rows);
  const int T = sparsekit::num_threads(threads);
  const at::Tensor x = sparsekit::as_float32(x_in);
  auto y = at::empty({x.size(0), rows}, x.options());
  if (x.size(0) == 0 || rows == 0) return sparsekit::like_input(y, x_in);
  const int64_t cols = in_features, batch = x.size(0);
  if (int8) {
    run(weight.data_ptr<int8_t>(), rows, cols, x.data_ptr<float>(), batch, s, b,
        y.data_ptr<float>(), T);
  } else {
    run(reinterpret_cast<const bf16*>(weight.data_ptr()), rows, cols, x.data_ptr<float>(),
        batch, s, b, y.data_ptr<float>(), T);
  }
  return sparsekit::like_input(y, x_in);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekit, CPU, m) { m.impl("dense_linear", &dense_linear); }
