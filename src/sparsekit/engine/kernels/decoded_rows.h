// GEMV and SpMM drivers for the formats decoded one row at a time (bitmap rows, packed N:M).
//
// A format is a struct W with `rows`, `cols`, `work(r)` (non-decreasing work of rows [0, r)),
// `dot(r, x)` (row r times an input zero-padded by at least 128 floats) and `decode(r, c,
// &count)` (row r's columns into c, room for cols + 32, returning its packed values, of
// the format's value type: float, bf16 or int8). Sums are fp32 (int8: times the row's
// scale).
// Batch 1 (up to 3) runs one GEMV per input; larger batches transpose x once into a
// per-thread workspace and decode each weight row once into (column, value) pairs that are
// applied to chunks of 64/128 inputs. Rows are split across OpenMP threads by work.
// Compiled once per instruction set (cores_impl.h).

namespace sparsekit::SPARSEKIT_ISA::rows {

constexpr int64_t kGemvMaxBatch = 3;  // batches up to this size run one GEMV per row of x
constexpr int64_t kRowTile = 16;      // rows whose outputs are written back together
typedef float vec16 __attribute__((vector_size(64)));
typedef float vec8 __attribute__((vector_size(32)));

#if SPARSEKIT_AVX512
// 0, 1, ..., 15: the lane numbers.
inline __m512i lanes() {
  return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}
#endif

// Rows [r0, r1) of thread t: a 1/T share of the work.
template <typename W>
void thread_rows_of(const W& w, int t, int T, int64_t* r0, int64_t* r1) {
  thread_rows_by([&w](int64_t i) { return w.work(i); }, w.rows, t, T, r0, r1);
}

template <typename W>
void gemv(const W& w, const float* x, Output out, float* y, int T) {
  thread_local std::vector<float> xpad;  // x zero-padded: whole vectors never read past it
  const int64_t padded = (w.cols + 63) / 64 * 64 + 128;
  xpad.assign(padded, 0.f);
  std::memcpy(xpad.data(), x, w.cols * sizeof(float));
  const float* xp = xpad.data();
#pragma omp parallel num_threads(T)
  {
    int64_t r0, r1;
    thread_rows_of(w, omp_get_thread_num(), omp_get_num_threads(), &r0, &r1);
    for (int64_t r = r0; r < r1; ++r) y[r] = finish(out, w.dot(r, xp), r);
  }
}

// out[0:NV*L] = sum_k w[k] * xt[c[k], 0:NV*L] for one decoded row (xt leading dimension ld).
template <typename V, int NV, typename T>
inline void row_chunk(const int32_t* c, const T* w, int64_t count, const float* xt,
                      int64_t ld, float* out) {
  constexpr int64_t L = sizeof(V) / sizeof(float);
  constexpr int U = NV >= 6 ? 1 : NV >= 3 ? 2 : 4;  // independent sums hide FMA latency
  V acc[U][NV];
  for (int u = 0; u < U; ++u)
    for (int j = 0; j < NV; ++j) acc[u][j] = V{};
  int64_t k = 0;
  for (; k + U <= count; k += U) {
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
      const float* xr = xt + static_cast<int64_t>(c[k + u]) * ld;
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) {
        V xv;
        __builtin_memcpy(&xv, xr + j * L, sizeof(V));
        acc[u][j] += to_float(w[k + u]) * xv;
      }
    }
  }
  for (; k < count; ++k) {
    const float* xr = xt + static_cast<int64_t>(c[k]) * ld;
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) {
      V xv;
      __builtin_memcpy(&xv, xr + j * L, sizeof(V));
      acc[0][j] += to_float(w[k]) * xv;
    }
  }
  for (int u = 1; u < U; ++u)
    for (int j = 0; j < NV; ++j) acc[0][j] += acc[u][j];
  __builtin_memcpy(out, acc[0], sizeof(acc[0]));
}

template <typename V, typename T>
inline void row_chunk_n(int nv, const int32_t* c, const T* w, int64_t count,
                        const float* xt, int64_t ld, float* out) {
  switch (nv) {
    case 8: row_chunk<V, 8>(c, w, count, xt, ld, out); break;
    case 7: row_chunk<V, 7>(c, w, count, xt, ld, out); break;
    case 6: row_chunk<V, 6>(c, w, count, xt, ld, out); break;
    case 5: row_chunk<V, 5>(c, w, count, xt, ld, out); break;
    case 4: row_chunk<V, 4>(c, w, count, xt, ld, out); break;
    case 3: row_chunk<V, 3>(c, w, count, xt, ld, out); break;
    case 2: row_chunk<V, 2>(c, w, count, xt, ld, out); break;
    default: row_chunk<V, 1>(c, w, count, xt, ld, out); break;
  }
}

// Y (batch, rows) = X (batch, cols) @ W.T via xt = X.T (cols, ld): each decoded nonzero is
// one broadcast-FMA over a contiguous row of xt. Outputs of kRowTile rows are buffered so
// that Y is written in contiguous runs.
template <typename V, typename W>
void spmm(const W& w, const Linear& io) {
  constexpr int64_t L = sizeof(V) / sizeof(float);
  constexpr int kMaxVec = 8;
  constexpr int64_t kChunk = kMaxVec * L;  // batch columns per pass over a decoded row
  const int64_t cols = w.cols, batch = io.batch, ld = (batch + L - 1) / L * L;
  float* xt = workspace(cols * ld);
#pragma omp parallel num_threads(io.threads)
  {
    transpose_into(io.x, batch, cols, cols, ld, xt);
    int64_t r0, r1;
    thread_rows_of(w, omp_get_thread_num(), omp_get_num_threads(), &r0, &r1);
    std::vector<int32_t> c(cols + 32);  // N:M rows may name a few padded inputs
    std::vector<float> tile(kRowTile * ld);
    for (int64_t t0 = r0; t0 < r1; t0 += kRowTile) {
      const int64_t t1 = std::min(r1, t0 + kRowTile);
      for (int64_t r = t0; r < t1; ++r) {
        int64_t count;
        const auto* v = w.decode(r, c.data(), &count);
        for (int64_t b0 = 0; b0 < ld; b0 += kChunk) {
          const int nv = static_cast<int>(std::min<int64_t>(kMaxVec, (ld - b0) / L));
          row_chunk_n<V>(nv, c.data(), v, count, xt + b0, ld, &tile[(r - t0) * ld + b0]);
        }
      }
      for (int64_t b = 0; b < batch; ++b) {
        float* yb = io.y + b * w.rows;
        for (int64_t r = t0; r < t1; ++r) yb[r] = finish(io.out, tile[(r - t0) * ld + b], r);
      }
    }
  }
}

// Rows W of int8 codes (Bitmap<int8_t> or the W8A8 cores' BitmapFloat, groups of whole
// bitmap words; PackedNM<int8_t>, groups of whole words of fields) with one scale per row
// and group of `size` inputs, scales (rows, cols / size): a row's dot is W::dot_groups (its
// groups' spans times their scales), and decode() gives the codes times their group's scale
// as floats (in a buffer of this thread, valid until its next call), so the drivers' output
// stage has no per-row scale to apply (Output::scale is null).
template <typename W>
struct Grouped {
  W w;
  const float* scales;
  int64_t size;
  int64_t rows = w.rows, cols = w.cols;

  int64_t work(int64_t r) const { return w.work(r); }

  float dot(int64_t r, const float* x) const {
    return w.dot_groups(r, x, scales + r * (cols / size), size);
  }

  const float* decode(int64_t r, int32_t* c, int64_t* count) const {
    thread_local std::vector<float> scaled;
    const int8_t* codes = w.decode(r, c, count);
    scaled.resize(*count);
    const float* s = scales + r * (cols / size);
    // the group of column c[k], and where it ends: columns rise from group to group (N:M
    // padding names its group of M's first input, in the same group of scales)
    int64_t g = 0, next = size;
    for (int64_t k = 0; k < *count; ++k) {
      while (c[k] >= next) ++g, next += size;
      scaled[k] = codes[k] * s[g];
    }
    return scaled.data();
  }
};

// The product for a weight w (rows and cols as in io).
template <typename W>
void run(const W& w, const Linear& io) {
  if (io.batch <= kGemvMaxBatch) {
    for (int64_t i = 0; i < io.batch; ++i) {
      gemv(w, io.x + i * w.cols, io.out, io.y + i * w.rows, io.threads);
    }
  } else if (io.batch <= 8 || kVectorBytes < 64) {  // 16-lane vectors: AVX-512 only
    spmm<vec8>(w, io);  // 8 lanes: no idle half
  } else {
    spmm<vec16>(w, io);
  }
}

}  // namespace sparsekit::SPARSEKIT_ISA::rows
