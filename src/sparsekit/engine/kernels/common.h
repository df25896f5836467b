// Helpers shared by the CPU kernels: splitting rows across OpenMP threads by work.
#pragma once

#include <cstdint>

namespace sparsekit {

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

}  // namespace sparsekit
