// The constant fan-in kernel core (see fanin.cpp for the op), compiled once per instruction
// set (cores_impl.h): k stored inputs in every stored row, float32, bf16 or int8 values (int8:
// each row's sum times its output row's scale, or each group's sum times the output row's
// scale of that group).

namespace sparsekit::SPARSEKIT_ISA::fanin {

constexpr int64_t kGemvMaxBatch = 3;
constexpr int64_t kRowTile = 16;  // rows per batched tile
// The batched kernel's vectors: one register of this instruction set (wider generic vectors
// are split into several, and the 2 x kSpmmVectors accumulators spill: see kVectorBytes).
typedef float vecr __attribute__((vector_size(kVectorBytes)));
constexpr int kSpmmVectors = 4;  // per row and chunk: 8 accumulators
constexpr int64_t kSpmmLanes = kVectorBytes / sizeof(float);

template <typename Value>
struct FanIn {
  const Value* v;
  const int32_t* rows;  // output row of each stored row
  const float* scale;   // per output row (int8 values), or nullptr
  int64_t n, k, out_rows;
  csr::Groups groups;  // int8 scales per output row and group of inputs (scale: nullptr)

  // What stored row r adds to its output: its sum times the output row's scale (per-group
  // scales are applied inside the sum).
  float scaled(int64_t r, float sum) const { return scale ? scale[rows[r]] * sum : sum; }
};

// y += W x for one input row x of `cols` inputs. Every row has k inputs, so the CSR GEMV's
// rule (csr::row_dot) picks x from windows or from scalar loads for all rows at once: on
// AMD Zen 4 (AVX-512, 11008 x 4096 at 2:4) the windows ran the rows 1.2-1.5x faster.
template <typename Value, typename I>
void gemv(const FanIn<Value>& w, const I* c, int64_t cols, const float* x_in, float* y, int T) {
  constexpr int64_t kLine = 64 / sizeof(Value);  // values per cache line
  const bool windowed = csr::windows_pay(cols, w.k);
  const float* x = windowed ? csr::padded(x_in, cols) : x_in;
#pragma omp parallel for num_threads(T) schedule(static)
  for (int64_t r = 0; r < w.n; ++r) {
    const Value* vr = w.v + r * w.k;
    const I* cr = c + r * w.k;
    if (r + 2 < w.n) {  // the row after next: the gathers fill the out-of-order window
      for (int64_t j = 0; j < w.k; j += kLine) __builtin_prefetch(vr + 2 * w.k + j, 0, 3);
      for (int64_t j = 0; j < w.k; j += 32) __builtin_prefetch(cr + 2 * w.k + j, 0, 3);
    }
    const float sum = windowed  // a CSR row of k
        ? csr::row_sum<true>(vr, cr, w.k, x, w.groups, w.rows[r])
        : csr::row_sum<false>(vr, cr, w.k, x, w.groups, w.rows[r]);
    y[w.rows[r]] += w.scaled(r, sum);
  }
}

// One row times NV vectors of transposed inputs at xt (leading dimension ld), each value times
// its group's scale when Grouped (`gs`: the output row's scales).
template <int NV, bool Grouped, typename Value, typename I>
inline void row_chunk(const Value* v, const I* c, int64_t k, const float* xt, int64_t ld,
                      vecr* out, csr::GroupCursor gs) {
  vecr acc[2][NV];
  for (int u = 0; u < 2; ++u)
#pragma GCC unroll 4
    for (int n = 0; n < NV; ++n) acc[u][n] = vecr{};
  int64_t j = 0;
  for (; j + 2 <= k; j += 2) {
#pragma GCC unroll 2
    for (int u = 0; u < 2; ++u) {
      const float s = Grouped ? to_float(v[j + u]) * gs.at(c[j + u]) : to_float(v[j + u]);
      const float* xr = xt + static_cast<int64_t>(c[j + u]) * ld;
#pragma GCC unroll 4
      for (int n = 0; n < NV; ++n) {
        vecr xv;
        __builtin_memcpy(&xv, xr + n * kSpmmLanes, sizeof(xv));
        acc[u][n] += s * xv;
      }
    }
  }
  for (; j < k; ++j) {
    const float s = Grouped ? to_float(v[j]) * gs.at(c[j]) : to_float(v[j]);
    const float* xr = xt + static_cast<int64_t>(c[j]) * ld;
#pragma GCC unroll 4
    for (int n = 0; n < NV; ++n) {
      vecr xv;
      __builtin_memcpy(&xv, xr + n * kSpmmLanes, sizeof(xv));
      acc[0][n] += s * xv;
    }
  }
  for (int n = 0; n < NV; ++n) out[n] = acc[0][n] + acc[1][n];
}

template <bool Grouped, typename Value, typename I>
void spmm(const FanIn<Value>& w, const I* c, int64_t cols, const float* x, int64_t batch,
          float* y, int T) {
  constexpr int64_t L = kSpmmLanes, kChunk = kSpmmVectors * L;
  const int64_t ld = (batch + L - 1) / L * L;
  float* xt = workspace(cols * ld);
#pragma omp parallel num_threads(T)
  {
    transpose_into(x, batch, cols, cols, ld, xt);
    alignas(64) vecr tile[kRowTile][kSpmmVectors];
#pragma omp for schedule(static)
    for (int64_t t0 = 0; t0 < w.n; t0 += kRowTile) {  // tiles: contiguous runs of y
      const int64_t t1 = std::min(w.n, t0 + kRowTile);
      for (int64_t b0 = 0; b0 < ld; b0 += kChunk) {
        const int nv = static_cast<int>(std::min<int64_t>(kSpmmVectors, (ld - b0) / L));
        for (int64_t r = t0; r < t1; ++r) {
          const Value* vr = w.v + r * w.k;
          const I* cr = c + r * w.k;
          const csr::GroupCursor gs{Grouped ? w.groups.row(w.rows[r]) : nullptr, w.groups.size};
          switch (nv) {
            case 4: row_chunk<4, Grouped>(vr, cr, w.k, xt + b0, ld, tile[r - t0], gs); break;
            case 3: row_chunk<3, Grouped>(vr, cr, w.k, xt + b0, ld, tile[r - t0], gs); break;
            case 2: row_chunk<2, Grouped>(vr, cr, w.k, xt + b0, ld, tile[r - t0], gs); break;
            default: row_chunk<1, Grouped>(vr, cr, w.k, xt + b0, ld, tile[r - t0], gs); break;
          }
        }
        for (int64_t b = b0; b < std::min<int64_t>(batch, b0 + nv * L); ++b) {
          float* yb = y + b * w.out_rows;
          for (int64_t r = t0; r < t1; ++r) {
            yb[w.rows[r]] += w.scaled(r, reinterpret_cast<const float*>(tile[r - t0])[b - b0]);
          }
        }
      }
    }
  }
}

// y (holding the bias) += x @ W.T.
template <typename Value, typename I>
void run(const FanIn<Value>& w, const I* c, const Linear& io) {
  if (io.batch > kGemvMaxBatch) {
    if (w.groups.scale) {
      spmm<true>(w, c, io.cols, io.x, io.batch, io.y, io.threads);
    } else {
      spmm<false>(w, c, io.cols, io.x, io.batch, io.y, io.threads);
    }
    return;
  }
  for (int64_t b = 0; b < io.batch; ++b) {
    gemv(w, c, io.cols, io.x + b * io.cols, io.y + b * w.out_rows, io.threads);
  }
}

}  // namespace sparsekit::SPARSEKIT_ISA::fanin

namespace sparsekit::SPARSEKIT_ISA {

void fanin_linear(const FanInArgs& a) {
  with_values(a.value, a.values, [&](auto v) {
    const fanin::FanIn<std::remove_const_t<std::remove_pointer_t<decltype(v)>>> w{
        v, a.rows, a.io.out.scale, a.n, a.k, a.io.rows,
        csr::Groups::of(a.group_scales, a.group_size, a.io.cols)};
    if (a.narrow) {
      fanin::run(w, static_cast<const uint16_t*>(a.col), a.io);
    } else {
      fanin::run(w, static_cast<const int32_t*>(a.col), a.io);
    }
  });
}

}  // namespace sparsekit::SPARSEKIT_ISA
