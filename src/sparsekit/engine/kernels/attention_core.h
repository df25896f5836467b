// The block-sparse attention core (see attention.cpp for the op), compiled once per
// instruction set (cores_impl.h) with generic vectors of the widest register (kVectorBytes:
// wider ones would spill the tiles of accumulators, see vec.h).
//
// Flash-style: each work item is up to kTileRows query rows of one (batch, head, query
// block). It keeps its queries (pre-scaled by scale * log2(e), so the softmax is a power of
// two), its running row maxima m, sums l and unnormalised outputs o in a thread workspace,
// and streams the kept key blocks kTileKeys keys at a time: s = q k^T as a small GEMM, the
// online-softmax update (o and l rescaled by 2^(m_old - m_new)), then o += 2^(s - m) v. No
// score matrix larger than one tile exists. Prefill items run heaviest first (dynamic schedule), so
// the long causal rows do not finish last.
//
// Prefill first packs k transposed (dim, keys) and v with rows padded to whole vectors, both
// float32, once per call: every tile then runs register-blocked broadcast-FMA kernels. That
// pass over all of k and v pays when each key is used by kPackRows (query, head) rows on
// average; decode and sparse short chunks read k and v where they are instead (float32 or
// widened bf16, one dot product per key and row), so only the kept blocks are ever loaded.

#include "attention.h"

namespace sparsekit::SPARSEKIT_ISA::attn {

typedef float vf __attribute__((vector_size(kVectorBytes)));
typedef int32_t vi __attribute__((vector_size(kVectorBytes)));
typedef uint32_t vu __attribute__((vector_size(kVectorBytes)));
typedef uint16_t vh __attribute__((vector_size(kVectorBytes / 2)));
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

constexpr int64_t L = kVectorBytes / 4;  // floats per vector
constexpr int kRows = kVectorBytes == 64 ? 6 : 4;  // query rows of a register tile (AVX-512:
                                                   // 24 accumulators of 32 registers)
constexpr int kCols = kVectorBytes == 64 ? 4 : 2;  // vectors of keys (q k^T) or dims (p v)
constexpr int64_t kTileRows = 64;   // query rows of a work item
constexpr int64_t kTileKeys = 128;  // keys of one softmax step (whole vectors)
constexpr int64_t kPad = 64;        // packed keys: rows rounded up to it, plus one more
constexpr int64_t kPackRows = 16;   // uses per key from which packing k and v pays

// x - 0 is x for every x (-0 included), so x is broadcast straight from memory, a load;
// 0 + x is not (-0 + 0 = +0): an add and a register shuffle per call, and the shuffle
// competes with the FMAs of the tiles for their port on Intel (1.4x slower tiles).
inline vf splat(float x) { return x - vf{}; }
inline vf load(const float* p) {
  vf v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
inline vf load(const bf16* p) {  // bf16 is the upper half of a float32
  vh h;
  __builtin_memcpy(&h, p, sizeof h);
  return (vf)(__builtin_convertvector(h, vu) << 16);
}
inline void store(float* p, vf v) { __builtin_memcpy(p, &v, sizeof v); }

// The lanes of v combined by op (x + y, max), halving the vector in registers (a copy
// through memory would keep the loops' accumulators on the stack).
// (V is vf; a template parameter, so that only the branch of N is compiled)
template <int64_t N = L, typename V, typename Op>
inline float reduce(V v, Op op) {
  v4 x;
  if constexpr (N == 16) {
    const v8 c = op(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7),
                    __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
    x = op(__builtin_shufflevector(c, c, 0, 1, 2, 3), __builtin_shufflevector(c, c, 4, 5, 6, 7));
  } else if constexpr (N == 8) {
    x = op(__builtin_shufflevector(v, v, 0, 1, 2, 3), __builtin_shufflevector(v, v, 4, 5, 6, 7));
  } else {
    static_assert(N == 4, "vectors of 4, 8 or 16 floats");
    x = v;
  }
  return op(op(x[0], x[2]), op(x[1], x[3]));
}
inline float sum(vf v) {
  return reduce(v, [](auto a, auto b) { return a + b; });
}
inline float max_lanes(vf v) {
  return reduce(v, [](auto a, auto b) { return a > b ? a : b; });
}

// 2^x lane by lane for x <= 0 (or -inf): exactly 0 below -126, else within 2 ulp. 2^x =
// 2^n 2^r with n = round(x) and |r| <= 1/2; 2^r = e^(r ln 2) by its degree-6 Taylor
// polynomial (remainder below 1.2e-7 for |r ln 2| <= 0.35).
inline vf exp2(vf x) {
  const vi dead = x < splat(-126.f);
  x = dead ? splat(-126.f) : x;
  const vf n = (x + 12582912.f) - 12582912.f;  // round to nearest (1.5 * 2^23)
  const vf t = (x - n) * 0.6931471805599453f;
  vf p = splat(1.f / 720.f);
  p = p * t + 1.f / 120.f;
  p = p * t + 1.f / 24.f;
  p = p * t + 1.f / 6.f;
  p = p * t + 0.5f;
  p = p * t + 1.f;
  p = p * t + 1.f;
  const vi e = (__builtin_convertvector(n, vi) + 127) << 23;
  return dead ? vf{} : p * (vf)e;
}
inline float exp2(float x) { return exp2(splat(x))[0]; }

// s (R, NV * L) = q (R, dim) k^T for NV * L packed keys kt (dim, ldk): one broadcast-FMA per
// query and key vector, R * NV accumulators in registers.
template <int R, int NV>
inline void qk_tile(const float* q, int64_t dim, const float* kt, int64_t ldk, float* s,
                    int64_t lds) {
  vf acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int n = 0; n < NV; ++n) acc[r][n] = vf{};
  for (int64_t d = 0; d < dim; ++d) {
    vf kv[NV];
    for (int n = 0; n < NV; ++n) kv[n] = load(kt + d * ldk + n * L);
    for (int r = 0; r < R; ++r) {
      const vf qv = splat(q[r * dim + d]);
      for (int n = 0; n < NV; ++n) acc[r][n] += qv * kv[n];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int n = 0; n < NV; ++n) store(s + r * lds + n * L, acc[r][n]);
}

// o (R, NV * L) += p (R, n) v (n, NV * L), v's rows ldv apart (float32 or bf16).
template <int R, int NV, typename T>
inline void pv_tile(const float* p, int64_t ldp, int64_t n, const T* v, int64_t ldv, float* o,
                    int64_t ldo) {
  vf acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = load(o + r * ldo + c * L);
  for (int64_t j = 0; j < n; ++j) {
    vf vv[NV];
    for (int c = 0; c < NV; ++c) vv[c] = load(v + j * ldv + c * L);
    for (int r = 0; r < R; ++r) {
      const vf pr = splat(p[r * ldp + j]);
      for (int c = 0; c < NV; ++c) acc[r][c] += pr * vv[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NV; ++c) store(o + r * ldo + c * L, acc[r][c]);
}

// tile(R, r) over nr rows: R = kRows rows at a time, then the rest.
template <typename Tile>
inline void by_rows(int64_t nr, Tile&& tile) {
  int64_t r = 0;
  for (; r + kRows <= nr; r += kRows) tile(std::integral_constant<int, kRows>{}, r);
  switch (nr - r) {
    case 5: tile(std::integral_constant<int, 5>{}, r); break;
    case 4: tile(std::integral_constant<int, 4>{}, r); break;
    case 3: tile(std::integral_constant<int, 3>{}, r); break;
    case 2: tile(std::integral_constant<int, 2>{}, r); break;
    case 1: tile(std::integral_constant<int, 1>{}, r); break;
    default: break;
  }
}

// s (nr, vecs * L) = q (nr, dim) k^T for vecs * L packed keys: kCols vectors of keys at a
// time, then 2 and 1 (a 32-key block must not pay for 64).
inline void qk(const float* q, int64_t dim, int64_t nr, const float* kt, int64_t ldk,
               int64_t vecs, float* s, int64_t lds) {
  int64_t c = 0;
  auto cols = [&](auto nv) {
    constexpr int NV = decltype(nv)::value;
    by_rows(nr, [&](auto R, int64_t r) {
      qk_tile<decltype(R)::value, NV>(q + r * dim, dim, kt + c * L, ldk, s + r * lds + c * L, lds);
    });
    c += NV;
  };
  while (c + kCols <= vecs) cols(std::integral_constant<int, kCols>{});
  if (c + 2 <= vecs) cols(std::integral_constant<int, 2>{});
  if (c < vecs) cols(std::integral_constant<int, 1>{});
}

// o (nr, vecs * L) += p (nr, n) v (n, vecs * L): kCols vectors of dims at a time, then 2, 1.
template <typename T>
inline void pv(const float* p, int64_t ldp, int64_t nr, int64_t n, const T* v, int64_t ldv,
               int64_t vecs, float* o, int64_t ldo) {
  int64_t c = 0;
  auto cols = [&](auto nv) {
    constexpr int NV = decltype(nv)::value;
    by_rows(nr, [&](auto R, int64_t r) {
      pv_tile<decltype(R)::value, NV>(p + r * ldp, ldp, n, v + c * L, ldv, o + r * ldo + c * L, ldo);
    });
    c += NV;
  };
  while (c + kCols <= vecs) cols(std::integral_constant<int, kCols>{});
  if (c + 2 <= vecs) cols(std::integral_constant<int, 2>{});
  if (c < vecs) cols(std::integral_constant<int, 1>{});
}

// n floats, uninitialised (what the cores own must not be a std::vector<float>, whose
// out-of-line code would be shared with the baseline translation units; see cores_prelude.h).
struct Buffer {
  float* data;
  explicit Buffer(int64_t n) : data(n > 0 ? new float[n] : nullptr) {}
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() { delete[] data; }
};

// One call's shapes and buffers.
template <typename T>
struct Problem {
  const AttentionArgs& a;
  const T* q;
  const T* k;
  const T* v;
  int64_t groups, offset;  // query heads per key/value head; kv_len - q_len (causal)
  bool packed;
  int64_t ldk, dpad;       // packed keys: row length; packed values: row length
  const float* kt;         // packed k (batch * kv_heads, dim, ldk)
  const float* vp;         // packed v (batch * kv_heads, kv_len, dpad)
};

// kt and vp for keys [j0, j1) of head bh (their padding with the last keys).
template <typename T>
void pack(const Problem<T>& pb, int64_t bh, int64_t j0, int64_t j1, float* kt, float* vp) {
  const AttentionArgs& a = pb.a;
  const T* ks = pb.k + bh * a.kv_len * a.dim;
  const T* vs = pb.v + bh * a.kv_len * a.dim;
  float* kd = kt + bh * a.dim * pb.ldk;
  float* vd = vp + bh * a.kv_len * pb.dpad;
  for (int64_t j = j0; j < j1; ++j) {
    for (int64_t d = 0; d < a.dim; ++d) {
      kd[d * pb.ldk + j] = to_float(ks[j * a.dim + d]);
      vd[j * pb.dpad + d] = to_float(vs[j * a.dim + d]);
    }
    for (int64_t d = a.dim; d < pb.dpad; ++d) vd[j * pb.dpad + d] = 0.f;
  }
  if (j1 == a.kv_len) {
    for (int64_t d = 0; d < a.dim; ++d) std::fill(kd + d * pb.ldk + j1, kd + (d + 1) * pb.ldk, 0.f);
  }
}

// <q, k> over dim values (q float32, k float32 or bf16).
template <typename T>
inline float dot(const float* q, const T* k, int64_t dim) {
  vf acc{};
  int64_t d = 0;
  for (; d + L <= dim; d += L) acc += load(q + d) * load(k + d);
  float s = sum(acc);
  for (; d < dim; ++d) s += q[d] * to_float(k[d]);
  return s;
}

// A work item: rows [i0, i1) of query block qb of head h in batch b; `work` orders them.
struct Item {
  int64_t b, h, qb, i0, i1, work;
};

// The workspace of one item, in floats.
inline int64_t workspace_floats(const AttentionArgs& a, int64_t dpad) {
  return kTileRows * (a.dim + kTileKeys + dpad + 2);
}

// The online-softmax step of one item over keys [c0, c0 + n) whose scores s (nr, kTileKeys)
// are computed for ncols >= n columns: masks the columns past n (and, causal, past each row's
// last key), updates m, l and o (nr, dpad), and leaves in s the weights 2^(s - m).
// The keys of [c0, c0 + n) that query row i sees: all n, or causal, those up to its last.
inline int64_t visible(const AttentionArgs& a, int64_t offset, int64_t i, int64_t c0, int64_t n) {
  return a.causal ? std::max<int64_t>(0, std::min(n, i + offset - c0 + 1)) : n;
}

inline void softmax_step(const AttentionArgs& a, int64_t offset, int64_t i0, int64_t nr,
                         int64_t c0, int64_t n, int64_t ncols, float* s, float* m, float* l,
                         float* o, int64_t dpad) {
  const float minus_inf = -__builtin_inff();
  for (int64_t r = 0; r < nr; ++r) {
    float* sr = s + r * kTileKeys;
    const int64_t valid = visible(a, offset, i0 + r, c0, n);
    std::fill(sr + valid, sr + ncols, minus_inf);
    vf mv = splat(minus_inf);
    for (int64_t c = 0; c < ncols; c += L) {
      const vf x = load(sr + c);
      mv = x > mv ? x : mv;
    }
    const float top = std::max(m[r], max_lanes(mv));
    if (top == minus_inf) {  // nothing visible yet: weights zero, o and l stay zero
      // ... unless a visible score is NaN (the max skips NaN): then l becomes NaN, which
      // every later step keeps and the output turns into NaN (NaN in, NaN out), where a
      // row that sees no key at all keeps l = 0 and outputs zeros
      for (int64_t c = 0; c < valid; ++c) {
        if (sr[c] != sr[c]) l[r] = __builtin_nanf("");
      }
      std::fill(sr, sr + ncols, 0.f);
      continue;
    }
    const float alpha = exp2(m[r] - top);
    if (alpha != 1.f) {
      l[r] *= alpha;
      for (int64_t d = 0; d < dpad; d += L) store(o + r * dpad + d, load(o + r * dpad + d) * alpha);
    }
    vf total{};
    for (int64_t c = 0; c < ncols; c += L) {
      const vf p = exp2(load(sr + c) - top);
      store(sr + c, p);
      total += p;
    }
    l[r] += sum(total);
    m[r] = top;
  }
}

// Whether the n values x (scores, or float32 or bf16 values) are all finite (x * 0 is NaN
// for an infinity or NaN, else ±0).
template <typename T>
inline bool all_finite(const T* x, int64_t n) {
  vf acc{};
  int64_t c = 0;
  for (; c + L <= n; c += L) acc += load(x + c) * 0.f;
  float t = sum(acc);
  for (; c < n; ++c) t += to_float(x[c]) * 0.f;
  return t == 0.f;
}

// The Euclidean norm of the n values x, in double (finite float32 values cannot overflow it;
// a non-finite one makes it non-finite).
template <typename T>
inline double norm(const T* x, int64_t n) {
  double total = 0;
  for (int64_t d = 0; d < n; ++d) total += double(to_float(x[d])) * to_float(x[d]);
  return __builtin_sqrt(total);
}

// Row r of item `it` has a score among the n it sees of keys [c0, c0 + n), s, that is not
// finite: records it in a.overflow where its query and key rows are finite (scale * q k^T
// overflowed float32); a NaN or infinity read from q or k is the caller's (NaN in, NaN out).
template <typename T>
void note_overflow(const Problem<T>& pb, const Item& it, int64_t r, int64_t c0, int64_t n,
                   const float* s) {
  const AttentionArgs& a = pb.a;
  const double qn = norm(pb.q + ((it.b * a.heads + it.h) * a.q_len + it.i0 + r) * a.dim, a.dim);
  if (!__builtin_isfinite(qn)) return;
  const T* keys = pb.k + ((it.b * a.kv_heads + it.h / pb.groups) * a.kv_len + c0) * a.dim;
  for (int64_t j = 0; j < n; ++j) {
    if (__builtin_isfinite(s[j])) continue;
    const double kn = norm(keys + j * a.dim, a.dim);
    if (!__builtin_isfinite(kn)) continue;
#pragma omp critical(sparsekit_attention_overflow)
    if (!a.overflow->found) *a.overflow = AttentionOverflow{true, it.b, it.h, it.i0 + r, c0 + j, qn, kn};
    return;
  }
}

// Decode reads k and v in place, and the hardware prefetcher loses the stream at every
// dropped block: ask for the next kept block's keys and values (up to kTileKeys of them)
// while this one is computed.
template <typename T>
inline void prefetch_next(const Problem<T>& pb, const bool* keep, int64_t kb, int64_t bh,
                          int64_t last) {
  const AttentionArgs& a = pb.a;
  int64_t next = kb + 1;
  while (next < a.k_blocks && !keep[next]) ++next;
  const int64_t j0 = next * a.block;
  if (next == a.k_blocks || (a.causal && j0 > last) || next == kb + 1) return;  // contiguous
  const int64_t bytes = std::min({a.block, kTileKeys, a.kv_len - j0}) * a.dim * int64_t(sizeof(T));
  const char* k = reinterpret_cast<const char*>(pb.k + (bh * a.kv_len + j0) * a.dim);
  const char* v = reinterpret_cast<const char*>(pb.v + (bh * a.kv_len + j0) * a.dim);
  for (int64_t b = 0; b < bytes; b += 64) {
    __builtin_prefetch(k + b);
    __builtin_prefetch(v + b);
  }
}

// Runs one item: streams its kept key blocks, writes its rows of out.
template <typename T>
void run_item(const Problem<T>& pb, const Item& it, float* ws) {
  const AttentionArgs& a = pb.a;
  const int64_t dim = a.dim, dpad = pb.dpad, nr = it.i1 - it.i0;
  float* qs = ws;
  float* s = qs + kTileRows * dim;
  float* o = s + kTileRows * kTileKeys;
  float* m = o + kTileRows * dpad;
  float* l = m + kTileRows;
  const float qscale = a.scale * static_cast<float>(kLog2e);
  const T* qsrc = pb.q + ((it.b * a.heads + it.h) * a.q_len + it.i0) * dim;
  for (int64_t i = 0; i < nr * dim; ++i) qs[i] = to_float(qsrc[i]) * qscale;
  std::fill(o, o + nr * dpad, 0.f);
  std::fill(m, m + nr, -__builtin_inff());
  std::fill(l, l + nr, 0.f);

  const int64_t bh = it.b * a.kv_heads + it.h / pb.groups;
  const bool* keep =
      a.mask + (((a.mask_batch == 1 ? 0 : it.b) * a.mask_heads + (a.mask_heads == 1 ? 0 : it.h)) *
                    a.q_blocks + it.qb) * a.k_blocks;
  const int64_t last = it.i1 - 1 + pb.offset;  // the last key any row sees (causal)
  for (int64_t kb = 0; kb < a.k_blocks; ++kb) {
    if (!keep[kb]) continue;
    // a run of kept blocks is one span of keys, streamed kTileKeys at a time: small blocks
    // do not pay the per-row work of a softmax step each
    int64_t end = kb + 1;
    while (end < a.k_blocks && keep[end]) ++end;
    const int64_t j0 = kb * a.block, j1 = std::min(a.kv_len, end * a.block);
    if (a.causal && j0 > last) break;
    kb = end - 1;
    if (!pb.packed) prefetch_next(pb, keep, kb, bh, last);
    for (int64_t c0 = j0; c0 < j1 && !(a.causal && c0 > last); c0 += kTileKeys) {
      const int64_t n = std::min(kTileKeys, j1 - c0);
      const int64_t ncols = (n + L - 1) / L * L;
      if (pb.packed) {
        qk(qs, dim, nr, pb.kt + bh * dim * pb.ldk + c0, pb.ldk, ncols / L, s, kTileKeys);
      } else {
        const T* kj = pb.k + (bh * a.kv_len + c0) * dim;
        for (int64_t j = 0; j < n; ++j)
          for (int64_t r = 0; r < nr; ++r) s[r * kTileKeys + j] = dot(qs + r * dim, kj + j * dim, dim);
      }
      for (int64_t r = 0; r < nr; ++r) {
        const float* sr = s + r * kTileKeys;
        const int64_t seen = visible(a, pb.offset, it.i0 + r, c0, n);
        if (!all_finite(sr, seen)) note_overflow(pb, it, r, c0, seen, sr);
      }
      softmax_step(a, pb.offset, it.i0, nr, c0, n, ncols, s, m, l, o, dpad);
      // o (rows [r0, r0 + rows)) += s v over the first `keys` keys of the tile
      const float* vp = pb.packed ? pb.vp + (bh * a.kv_len + c0) * dpad : nullptr;
      const T* vj = pb.v + (bh * a.kv_len + c0) * dim;
      auto accumulate = [&](int64_t r0, int64_t rows, int64_t keys) {
        const float* p = s + r0 * kTileKeys;
        float* acc = o + r0 * dpad;
        if (pb.packed) {
          pv(p, kTileKeys, rows, keys, vp, dpad, dpad / L, acc, dpad);
          return;
        }
        pv(p, kTileKeys, rows, keys, vj, dim, dim / L, acc, dpad);
        for (int64_t d = dim / L * L; d < dim; ++d)  // the dims past whole vectors
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t j = 0; j < keys; ++j) acc[r * dpad + d] += p[r * kTileKeys + j] * to_float(vj[j * dim + d]);
      };
      // A row's weights of the keys after its last (causal) are zeros, and a zero times a
      // NaN or infinite value is NaN: where the tile holds one, each row reads only the
      // values it sees, so only the rows that see it are NaN (as on the reference).
      const bool hidden = visible(a, pb.offset, it.i0, c0, n) < n;
      if (hidden && !(pb.packed ? all_finite(vp, n * dpad) : all_finite(vj, n * dim))) {
        for (int64_t r = 0; r < nr; ++r) accumulate(r, 1, visible(a, pb.offset, it.i0 + r, c0, n));
      } else {
        accumulate(0, nr, n);
      }
    }
  }
  float* out = a.out + ((it.b * a.heads + it.h) * a.q_len + it.i0) * dim;
  for (int64_t r = 0; r < nr; ++r) {
    // l is 0 for a row with no visible key (zeros out), NaN for one with a NaN score
    const float inv = l[r] == 0.f ? 0.f : 1.f / l[r];
    for (int64_t d = 0; d < dim; ++d) out[r * dim + d] = o[r * dpad + d] * inv;
  }
}

// The items of a call in (batch, head, rows) order; work = kept visible keys times rows.
inline std::vector<Item> items(const AttentionArgs& a, int64_t offset) {
  std::vector<Item> all;
  for (int64_t b = 0; b < a.batch; ++b) {
    for (int64_t h = 0; h < a.heads; ++h) {
      const bool* rows = a.mask + ((a.mask_batch == 1 ? 0 : b) * a.mask_heads +
                                   (a.mask_heads == 1 ? 0 : h)) * a.q_blocks * a.k_blocks;
      for (int64_t qb = 0; qb < a.q_blocks; ++qb) {
        const int64_t end = std::min(a.q_len, (qb + 1) * a.block);
        for (int64_t i0 = qb * a.block; i0 < end; i0 += kTileRows) {
          const int64_t i1 = std::min(end, i0 + kTileRows);
          const int64_t last = a.causal ? std::min(a.kv_len, i1 + offset) : a.kv_len;
          int64_t keys = 0;
          for (int64_t kb = 0; kb < a.k_blocks && kb * a.block < last; ++kb)
            if (rows[qb * a.k_blocks + kb]) keys += std::min(a.block, last - kb * a.block);
          all.push_back(Item{b, h, qb, i0, i1, keys * (i1 - i0)});
        }
      }
    }
  }
  return all;
}

template <typename T>
void run(const AttentionArgs& a) {
  Problem<T> pb{a, static_cast<const T*>(a.q), static_cast<const T*>(a.k),
                static_cast<const T*>(a.v), a.heads / a.kv_heads, a.kv_len - a.q_len, false,
                0, 0, nullptr, nullptr};
  pb.dpad = (a.dim + L - 1) / L * L;
  const int64_t heads = a.batch * a.kv_heads, chunks = (a.kv_len + kPad - 1) / kPad;
  std::vector<Item> work = items(a, pb.offset);
  int64_t total = 0;
  for (const Item& it : work) total += it.work;
  pb.packed = total >= kPackRows * heads * a.kv_len;
  if (pb.packed) {  // heaviest first: long causal rows must not start last
    std::stable_sort(work.begin(), work.end(),
                     [](const Item& x, const Item& y) { return x.work > y.work; });
    pb.ldk = chunks * kPad + kPad;
  }  // else (decode) the query heads of one key/value head run side by side, sharing cache
  Buffer kt(pb.packed ? heads * a.dim * pb.ldk : 0);
  Buffer vp(pb.packed ? heads * a.kv_len * pb.dpad : 0);
  pb.kt = kt.data;
  pb.vp = vp.data;
  const int64_t n = static_cast<int64_t>(work.size());
#pragma omp parallel num_threads(a.threads) if (a.threads > 1)
  {
    if (pb.packed) {
#pragma omp for schedule(static)
      for (int64_t i = 0; i < heads * chunks; ++i) {
        const int64_t c = i % chunks;
        pack(pb, i / chunks, c * kPad, std::min(a.kv_len, (c + 1) * kPad), kt.data, vp.data);
      }
    }
    float* ws = workspace(workspace_floats(a, pb.dpad));
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < n; ++i) run_item(pb, work[i], ws);
  }
}

}  // namespace sparsekit::SPARSEKIT_ISA::attn

namespace sparsekit::SPARSEKIT_ISA {

inline void block_sparse_attention(const AttentionArgs& a) {
  if (a.bf16) attn::run<bf16>(a); else attn::run<float>(a);
}

extern const AttentionCores kAttentionCores;
const AttentionCores kAttentionCores = {SPARSEKIT_NAME(SPARSEKIT_ISA), &block_sparse_attention};

}  // namespace sparsekit::SPARSEKIT_ISA
