// The block-sparse attention cores: types and declarations only (see cores.h for why). The
// arguments of one call, and the entry point of each instruction set; attention_core.h defines
// the arithmetic once per instruction set, attention.cpp the op.
#pragma once

#include <cstdint>

#include "cores.h"

namespace sparsekit {

// out (batch, heads, q_len, dim) float32 = softmax(scale * q k^T) v over the (query block, key
// block) tiles `mask` keeps, for q (batch, heads, q_len, dim) and k, v (batch, kv_heads,
// kv_len, dim), all contiguous float32 or bf16 (`bf16`). Query head h reads key/value head
// h / (heads / kv_heads); mask is bool (mask_batch, mask_heads, q_blocks, k_blocks), its
// batch and head sizes 1 (shared) or batch and heads. Causal attention aligns the last query
// with the last key; a row with no visible kept key is zero.
//
// A visible score that is not finite although its query and key rows are (scale * q k^T
// overflowed float32) is reported in `overflow` (the first one found; which one is first
// depends on the threads): the op refuses the call, as the score would have turned its row
// NaN or, all of a row's scores at -inf, silently zero.
// log2(e): the cores scale the queries by scale * kLog2e, so that the softmax is a power
// of two; an overflow's scale bound (attention.cpp) divides by it too.
constexpr double kLog2e = 1.4426950408889634;

struct AttentionOverflow {
  bool found;
  int64_t batch, head, query, key;
  double q_norm, k_norm;  // the Euclidean norms of that query and key row
};

struct AttentionArgs {
  bool bf16;
  const void* q;
  const void* k;
  const void* v;
  const bool* mask;
  float* out;
  int64_t batch, heads, kv_heads, q_len, kv_len, dim;
  int64_t mask_batch, mask_heads, q_blocks, k_blocks, block;
  bool causal;
  float scale;
  int threads;
  AttentionOverflow* overflow;
};

// The attention entry point of one instruction set.
struct AttentionCores {
  const char* isa;  // "scalar", "avx2" or "avx512"
  void (*block_sparse_attention)(const AttentionArgs&);
};

namespace scalar {
extern const AttentionCores kAttentionCores;
}
namespace avx2 {
extern const AttentionCores kAttentionCores;
}
namespace avx512 {
extern const AttentionCores kAttentionCores;
}

}  // namespace sparsekit
