// The BSR kernel core (see bsr.cpp for the op), compiled once per instruction set
// (cores_impl.h): dense R x C blocks of float32, bf16 or int8 values (int8: each output row's
// sum times its scale, or each group's sum times the row's scale of that group), each block a
// small dense product.

namespace sparsekit::SPARSEKIT_ISA::bsr {

constexpr int64_t kGemvMaxBatch = 3;
constexpr int kMaxR = kBsrMaxBlockRows;  // block rows of the GEMV accumulators
typedef float vec16 __attribute__((vector_size(64)));
typedef float vec8 __attribute__((vector_size(32)));
typedef float vec4 __attribute__((vector_size(16)));
// The batched kernel's vectors: one register of this instruction set (wider generic vectors
// are split into several, and its 4 x kSpmmVectors tile of accumulators spills: see
// kVectorBytes), kSpmmVectors of them per block row: 16 + 4 zmm, 8 + 2 ymm or xmm.
typedef float vecr __attribute__((vector_size(kVectorBytes)));
constexpr int kSpmmVectors = kVectorBytes >= 64 ? 4 : 2;
constexpr int64_t kSpmmLanes = kVectorBytes / sizeof(float);
constexpr int64_t kSpmmChunk = kSpmmVectors * kSpmmLanes;  // batch columns per pass

// Block rows [*r0, *r1) of this OpenMP thread (work = blocks + block rows).
inline void thread_block_rows(const int32_t* rowptr, int64_t rows, int64_t* r0, int64_t* r1) {
  thread_rows(rowptr, rows, omp_get_thread_num(), omp_get_num_threads(), r0, r1);
}

// The sizeof(V) / 4 values at p as a vector of floats (bf16: shifted into the upper half of
// each lane; int8 codes: converted). Register widths take the vec.h intrinsics: GCC 12
// turns a generic int8 -> int32 vector conversion into scalar code (the int8 BSR GEMV ran
// 5-7x slower than the bf16 one, AMD Zen 4).
template <typename V, typename Value>
inline V loadv(const Value* p) {
  constexpr int L = sizeof(V) / sizeof(float);
  V v;
  if constexpr (std::is_same_v<Value, float>) {
    __builtin_memcpy(&v, p, sizeof(V));
    return v;
  }
#if SPARSEKIT_AVX512
  if constexpr (L == 16) {
    const __m512 w = load16(p);
    __builtin_memcpy(&v, &w, sizeof(V));
    return v;
  }
#endif
#if SPARSEKIT_AVX2
  if constexpr (L == 8) {
    const __m256 w = load8(p);
    __builtin_memcpy(&v, &w, sizeof(V));
    return v;
  }
  if constexpr (L == 4) {  // 4 x 4 blocks: the int8 GEMV ran 2.2x slower than fp32 without
    const __m128 w = load4(p);
    __builtin_memcpy(&v, &w, sizeof(V));
    return v;
  }
#endif
  for (int i = 0; i < L; ++i) v[i] = to_float(p[i]);
  return v;
}

template <typename V>
inline float hsum(V v) {
  float s = 0.f;
  for (size_t i = 0; i < sizeof(V) / sizeof(float); ++i) s += v[i];
  return s;
}

template <typename Value>
struct Bsr {
  const Value* v;
  const int32_t* rowptr;
  int64_t R, C, out_rows;
  // int8 codes scaled per row and group of `group_blocks` block columns: gscale (out_rows,
  // groups); none (nullptr) with per-row scales, which the output stage applies
  const float* gscale = nullptr;
  int64_t groups = 0, group_blocks = 0;

  // Row r's scale of group g; the padding rows of an edge block row (never written) read
  // the last row's.
  float scale(int64_t r, int64_t g) const {
    return gscale[std::min(r, out_rows - 1) * groups + g];
  }
};

// With group scales, the blocks of a block row are summed group by group: the sums hold the
// current group's (`group`, block columns [begin, end)), and where a block lies outside it
// (block columns rise within a block row, so each group's blocks are one run) flush(group)
// adds them times their scales into the row's totals and clears them. The division finding
// a block's group runs once per group, not per block.
struct GroupRun {
  int64_t group = -1, begin = 0, end = 0;

  template <typename Value, typename Flush>
  inline void enter(const Bsr<Value>& w, int64_t col, Flush&& flush) {
    if (!w.gscale || (col >= begin && col < end)) return;
    if (group >= 0) flush(group);
    group = col / w.group_blocks;
    begin = group * w.group_blocks;
    end = begin + w.group_blocks;
  }
};

// y[r*R + i] for one block row: R accumulators of L lanes over the C columns of a block; with
// `Grouped` scales, each group's sums scaled into the totals (a run-time switch slowed the
// per-row int8 GEMV by 20 %, AMD Zen 4).
template <typename V, bool Grouped, typename Value, typename I>
void gemv(const Bsr<Value>& w, const I* c, const float* x, const Output& out, float* y, int T) {
  constexpr int64_t L = sizeof(V) / sizeof(float);
  const int64_t brows = (w.out_rows + w.R - 1) / w.R, RC = w.R * w.C;
#pragma omp parallel num_threads(T)
  {
    int64_t r0, r1;
    thread_block_rows(w.rowptr, brows, &r0, &r1);
    V acc[kMaxR], total[kMaxR];  // total: the groups' scaled sums (Grouped only)
    for (int64_t br = r0; br < r1; ++br) {
      for (int64_t i = 0; i < w.R; ++i) acc[i] = V{};
      if constexpr (Grouped) {
        for (int64_t i = 0; i < w.R; ++i) total[i] = V{};
      }
      const auto flush = [&](int64_t g) {
        for (int64_t i = 0; i < w.R; ++i) {
          total[i] += acc[i] * w.scale(br * w.R + i, g);
          acc[i] = V{};
        }
      };
      GroupRun run;
      for (int64_t k = w.rowptr[br]; k < w.rowptr[br + 1]; ++k) {
        if constexpr (Grouped) run.enter(w, c[k], flush);
        const Value* vb = w.v + k * RC;
        // The block's lines kPrefetchBytes ahead (the blocks lie one after another): without,
        // a cold 5632x2048 layer at 50 % in 4x4 blocks took 1.5 ms in fp32 and 1.4 in bf16
        // instead of 0.9 and 0.8, in 16x16 int8 blocks 0.50 instead of 0.29 (Intel Xeon,
        // two threads, interleaved in one process).
        for (size_t b = 0; b < RC * sizeof(Value); b += 64) {
          prefetch_ahead(reinterpret_cast<const char*>(vb) + b);
        }
        const float* xb = x + static_cast<int64_t>(c[k]) * w.C;
        for (int64_t j = 0; j < w.C; j += L) {
          const V xv = loadv<V>(xb + j);
          for (int64_t i = 0; i < w.R; ++i) acc[i] += loadv<V>(vb + i * w.C + j) * xv;
        }
      }
      if (Grouped && run.group >= 0) flush(run.group);
      const V* sums = Grouped ? total : acc;
      const int64_t n = std::min(w.R, w.out_rows - br * w.R);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t r = br * w.R + i;
        y[r] = finish(out, hsum(sums[i]), r);
      }
    }
  }
}

// gemv with the widest vector of this instruction set that divides C (a multiple of 4): no
// vector wider than a register (see kVectorBytes).
template <typename Value, typename I>
void gemv_widest(const Bsr<Value>& w, const I* c, const float* x, const Output& out, float* y,
                 int T) {
  const auto widest = [&](auto grouped) {
    constexpr bool G = decltype(grouped)::value;
    if constexpr (kVectorBytes >= 64) {
      if (w.C % 16 == 0) return gemv<vec16, G>(w, c, x, out, y, T);
    }
    if constexpr (kVectorBytes >= 32) {
      if (w.C % 8 == 0) return gemv<vec8, G>(w, c, x, out, y, T);
    }
    gemv<vec4, G>(w, c, x, out, y, T);
  };
  if (w.gscale) {
    widest(std::true_type{});
  } else {
    widest(std::false_type{});
  }
}

// RB rows (i0 .. i0+RB of block row br) times NV vectors of transposed inputs at xt.
template <int RB, int NV, typename Value, typename I>
inline void rows_chunk(const Bsr<Value>& w, const I* c, int64_t br, int64_t i0, const float* xt,
                       int64_t ld, float (*out)[kSpmmChunk]) {
  constexpr int64_t L = kSpmmLanes;
  const int64_t RC = w.R * w.C;
  vecr acc[RB][NV];
#pragma GCC unroll 4
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 4
    for (int n = 0; n < NV; ++n) acc[r][n] = vecr{};
  // group scales: each group's sums times their row's scale, added into out (zeroed here)
  const auto flush = [&](int64_t g) {
    for (int r = 0; r < RB; ++r) {
      const float s = w.scale(br * w.R + i0 + r, g);
      for (int n = 0; n < NV; ++n) {
        vecr o;
        __builtin_memcpy(&o, out[r] + n * kSpmmLanes, sizeof(o));
        o += acc[r][n] * s;
        __builtin_memcpy(out[r] + n * kSpmmLanes, &o, sizeof(o));
        acc[r][n] = vecr{};
      }
    }
  };
  if (w.gscale) {
    for (int r = 0; r < RB; ++r) std::fill(out[r], out[r] + NV * kSpmmLanes, 0.f);
  }
  GroupRun run;
  for (int64_t k = w.rowptr[br]; k < w.rowptr[br + 1]; ++k) {
    run.enter(w, c[k], flush);
    const Value* vb = w.v + k * RC + i0 * w.C;
    const float* xb = xt + static_cast<int64_t>(c[k]) * w.C * ld;
    for (int64_t j = 0; j < w.C; ++j) {
      vecr xv[NV];
#pragma GCC unroll 4
      for (int n = 0; n < NV; ++n) xv[n] = loadv<vecr>(xb + j * ld + n * L);
#pragma GCC unroll 4
      for (int r = 0; r < RB; ++r) {
        const float s = to_float(vb[r * w.C + j]);
#pragma GCC unroll 4
        for (int n = 0; n < NV; ++n) acc[r][n] += s * xv[n];
      }
    }
  }
  if (w.gscale) {
    if (run.group >= 0) flush(run.group);
    return;
  }
  for (int r = 0; r < RB; ++r) __builtin_memcpy(out[r], acc[r], sizeof(acc[r]));
}

template <int RB, typename Value, typename I>
inline void rows_chunk_n(int nv, const Bsr<Value>& w, const I* c, int64_t br, int64_t i0,
                         const float* xt, int64_t ld, float (*out)[kSpmmChunk]) {
  switch (nv) {
#if SPARSEKIT_AVX512
    case 4: rows_chunk<RB, 4>(w, c, br, i0, xt, ld, out); break;
    case 3: rows_chunk<RB, 3>(w, c, br, i0, xt, ld, out); break;
#endif
    case 2: rows_chunk<RB, 2>(w, c, br, i0, xt, ld, out); break;
    default: rows_chunk<RB, 1>(w, c, br, i0, xt, ld, out); break;
  }
}

// Y (batch, rows) = X (batch, cols) @ W.T with X transposed into xt (cols_pad, ld).
template <typename Value, typename I>
void spmm(const Bsr<Value>& w, const I* c, int64_t cols, const float* x, int64_t batch,
          const Output& out, float* y, int T) {
  constexpr int64_t L = kSpmmLanes, kChunk = kSpmmChunk;
  const int64_t brows = (w.out_rows + w.R - 1) / w.R;
  const int64_t cols_pad = (cols + w.C - 1) / w.C * w.C, ld = (batch + L - 1) / L * L;
  float* xt = workspace(cols_pad * ld);
  const int RB = w.R % 4 == 0 ? 4 : 1;
#pragma omp parallel num_threads(T)
  {
    transpose_into(x, batch, cols, cols_pad, ld, xt);
    int64_t r0, r1;
    thread_block_rows(w.rowptr, brows, &r0, &r1);
    alignas(64) float tile[4][kChunk];
    for (int64_t br = r0; br < r1; ++br) {
      const int64_t n_rows = std::min(w.R, w.out_rows - br * w.R);
      for (int64_t b0 = 0; b0 < ld; b0 += kChunk) {
        const int nv = static_cast<int>(std::min<int64_t>(kSpmmVectors, (ld - b0) / L));
        const int64_t b1 = std::min<int64_t>(batch, b0 + nv * L);
        for (int64_t i0 = 0; i0 < n_rows; i0 += RB) {
          if (RB == 4) {
            rows_chunk_n<4>(nv, w, c, br, i0, xt + b0, ld, tile);
          } else {
            rows_chunk_n<1>(nv, w, c, br, i0, xt + b0, ld, tile);
          }
          for (int64_t i = i0; i < std::min<int64_t>(n_rows, i0 + RB); ++i) {
            const int64_t r = br * w.R + i;
            for (int64_t b = b0; b < b1; ++b) {
              y[b * w.out_rows + r] = finish(out, tile[i - i0][b - b0], r);
            }
          }
        }
      }
    }
  }
}

template <typename Value, typename I>
void run(const Bsr<Value>& w, const I* c, const Linear& io) {
  const int64_t batch = io.batch, cols = io.cols;
  const int T = io.threads;
  if (batch > kGemvMaxBatch) {
    spmm(w, c, cols, io.x, batch, io.out, io.y, T);
    return;
  }
  const int64_t cols_pad = (cols + w.C - 1) / w.C * w.C;
  thread_local std::vector<float> padded;
  for (int64_t b = 0; b < batch; ++b) {
    const float* xb = io.x + b * cols;
    if (cols_pad != cols) {  // the last block column reads past in_features
      padded.assign(cols_pad, 0.f);
      std::copy(xb, xb + cols, padded.begin());
      xb = padded.data();
    }
    float* yb = io.y + b * w.out_rows;
    gemv_widest(w, c, xb, io.out, yb, T);
  }
}

}  // namespace sparsekit::SPARSEKIT_ISA::bsr

namespace sparsekit::SPARSEKIT_ISA {

void bsr_linear(const BsrArgs& a) {
  with_values(a.value, a.values, [&](auto v) {
    const int64_t groups = a.group_scales ? a.io.cols / a.group_size : 0;
    const bsr::Bsr<std::remove_const_t<std::remove_pointer_t<decltype(v)>>> w{
        v, a.rowptr, a.R, a.C, a.io.rows, a.group_scales, groups,
        a.group_scales ? a.group_size / a.C : 0};
    if (a.narrow) {
      bsr::run(w, static_cast<const uint16_t*>(a.col), a.io);
    } else {
      bsr::run(w, static_cast<const int32_t*>(a.col), a.io);
    }
  });
}

}  // namespace sparsekit::SPARSEKIT_ISA
