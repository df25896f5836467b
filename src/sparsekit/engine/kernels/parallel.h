// Splitting rows across OpenMP threads by work, and the transposed input workspace of the
// batched (SpMM) paths: plain code shared by the ops and by the kernel cores of every
// instruction set (included before any target pragma, so it is compiled for the baseline).
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace sparsekit {

// -- work split -----------------------------------------------------------------------------

// Rows [*r0, *r1) of thread t out of T, each thread getting a 1/T share of the work, where
// work(i) is the (non-decreasing) work of rows [0, i).
template <typename Work>
inline void thread_rows_by(const Work& work, int64_t rows, int t, int T, int64_t* r0,
                           int64_t* r1) {
  auto bound = [&](int64_t target) {  // first row i with work(i) >= target
    int64_t lo = 0, hi = rows;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (work(mid) < target) lo = mid + 1; else hi = mid;
    }
    return lo;
  };
  const int64_t total = work(rows);
  *r0 = t == 0 ? 0 : bound(total * t / T);
  *r1 = t == T - 1 ? rows : bound(total * (t + 1) / T);
}

// The same for CSR-like rows: work = stored entries + rows.
inline void thread_rows(const int32_t* rowptr, int64_t rows, int t, int T, int64_t* r0,
                        int64_t* r1) {
  thread_rows_by([rowptr](int64_t i) { return static_cast<int64_t>(rowptr[i]) + i; }, rows, t,
                 T, r0, r1);
}

// -- transposed inputs ----------------------------------------------------------------------

// This thread's workspace of at least n floats; it grows only, so there is no large
// allocation per call.
inline float* workspace(int64_t n) {
  thread_local std::vector<float> buffer;
  if (buffer.size() < static_cast<size_t>(n)) buffer.resize(n);
  return buffer.data();
}

// xt (padded_cols, ld) = x (batch, cols) transposed, zero beyond `batch` and `cols`: each
// input column becomes one contiguous row, so a nonzero is one broadcast-FMA over it. A
// blocked transpose shared by the threads of the enclosing parallel region (it ends with
// the implicit barrier of `omp for`: xt is then complete).
inline void transpose_into(const float* x, int64_t batch, int64_t cols, int64_t padded_cols,
                           int64_t ld, float* xt) {
  constexpr int64_t kBlock = 16;
#pragma omp for schedule(static)
  for (int64_t i0 = 0; i0 < padded_cols; i0 += kBlock) {
    const int64_t i1 = std::min(padded_cols, i0 + kBlock);
    for (int64_t b = 0; b < ld; ++b) {
      const float* src = x + b * cols;
      for (int64_t i = i0; i < i1; ++i) xt[i * ld + b] = b < batch && i < cols ? src[i] : 0.f;
    }
  }
}

}  // namespace sparsekit
