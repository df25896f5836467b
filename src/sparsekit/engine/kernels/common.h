// Helpers shared by the CPU kernels: splitting CSR-like rows across OpenMP threads.
#pragma once

#include <cstdint>

namespace sparsekit {

// First row index i with rowptr[i] + i >= target (work = stored entries + rows).
inline int64_t row_bound(const int32_t* rowptr, int64_t rows, int64_t target) {
  int64_t lo = 0, hi = rows;
  while (lo < hi) {
    int64_t mid = (lo + hi) / 2;
    if (static_cast<int64_t>(rowptr[mid]) + mid < target) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// Rows [*r0, *r1) of thread t out of T, so that every thread gets a similar share of work.
inline void thread_rows(const int32_t* rowptr, int64_t rows, int t, int T, int64_t* r0,
                        int64_t* r1) {
  int64_t work = static_cast<int64_t>(rowptr[rows]) + rows;
  *r0 = t == 0 ? 0 : row_bound(rowptr, rows, work * t / T);
  *r1 = t == T - 1 ? rows : row_bound(rowptr, rows, work * (t + 1) / T);
}

}  // namespace sparsekit
