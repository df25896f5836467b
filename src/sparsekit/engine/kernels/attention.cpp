// Block-sparse attention on CPU: softmax(scale * q k^T) v over the (query block, key block)
// tiles a boolean block mask keeps, flash-style (online softmax; no score matrix), OpenMP over
// batch x heads x query blocks. q, k and v float32 or bf16 (read as float32, sums in float32,
// the output in q's dtype); grouped-query attention; causal with the last query aligned to the
// last key. The arithmetic is attention_core.h, compiled per instruction set; this file checks
// the tensors, calls it and refuses a call whose scores overflowed float32 (the kernel notes
// them as it computes them, so a call reads nothing extra to find out). sparsekit.attention.block_sparse_attention is its Python entry
// (and reference).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cfloat>
#include <cmath>
#include <cstdio>
#include <cstdint>
#include <cstring>

#include "attention.h"
#include "common.h"

namespace sparsekit {
namespace {

// The attention cores of the active instruction set (cores(); see set_isa).
const AttentionCores& attention_cores() {
  const char* isa = cores().isa;
  if (std::strcmp(isa, "avx512") == 0) return avx512::kAttentionCores;
  return std::strcmp(isa, "avx2") == 0 ? avx2::kAttentionCores : scalar::kAttentionCores;
}

at::Tensor block_sparse_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& block_mask, bool causal, int64_t block_size,
                                  double scale, int64_t threads) {
  check_tensor(q, "q", 4);
  check_float_or_bf16(q, "q");
  check_tensor(k, "k", 4, q.scalar_type());
  check_tensor(v, "v", 4, q.scalar_type());
  const int64_t batch = q.size(0), heads = q.size(1), q_len = q.size(2), dim = q.size(3);
  TORCH_CHECK(heads >= 1 && dim >= 1, "q must have heads >= 1 and head_dim >= 1, got shape ",
              q.sizes());
  check_size(k, "k", 0, batch);
  check_size(k, "k", 3, dim);
  TORCH_CHECK(v.sizes() == k.sizes(), "v must have the shape of k ", k.sizes(), ", got ",
              v.sizes());
  const int64_t kv_heads = k.size(1), kv_len = k.size(2);
  TORCH_CHECK(kv_heads >= 1 && heads % kv_heads == 0, "k must have a number of heads (",
              kv_heads, ") that divides the query heads (", heads, ")");
  TORCH_CHECK(block_size >= 1, "block_size must be at least 1, got ", block_size);
  const int64_t q_blocks = (q_len + block_size - 1) / block_size;
  const int64_t k_blocks = (kv_len + block_size - 1) / block_size;
  check_tensor(block_mask, "block_mask", 4, at::kBool);
  const int64_t mask_batch = block_mask.size(0), mask_heads = block_mask.size(1);
  TORCH_CHECK((mask_batch == 1 || mask_batch == batch) && (mask_heads == 1 || mask_heads == heads) &&
                  block_mask.size(2) == q_blocks && block_mask.size(3) == k_blocks,
              "block_mask must have shape (1 or ", batch, ", 1 or ", heads, ", ", q_blocks, ", ",
              k_blocks, ") for block_size=", block_size, ", got ", block_mask.sizes());
  TORCH_CHECK(std::isfinite(scale) && scale > 0, "scale must be a positive finite float, got ",
              scale);
  const int T = num_threads(threads);

  auto out = at::empty(q.sizes(), q.options().dtype(at::kFloat));
  if (out.numel() == 0) return like_input(out, q);
  if (kv_len == 0) return like_input(out.zero_(), q);
  AttentionOverflow overflow{};
  attention_cores().block_sparse_attention(AttentionArgs{
      q.scalar_type() == at::kBFloat16, q.data_ptr(), k.data_ptr(), v.data_ptr(),
      block_mask.data_ptr<bool>(), out.data_ptr<float>(), batch, heads, kv_heads, q_len, kv_len,
      dim, mask_batch, mask_heads, q_blocks, k_blocks, block_size, causal,
      static_cast<float>(scale), T, &overflow});
  if (overflow.found) {
    // the kernel's scores are scale * kLog2e * q k^T
    char bound[32];
    std::snprintf(bound, sizeof bound, "%.3g",
                  FLT_MAX / (kLog2e * overflow.q_norm * overflow.k_norm));
    TORCH_CHECK_VALUE(false, "scale=", scale, " overflows the kernel's float32 scores ",
                      "q · kᵀ · scale · log2(e) (it exponentiates in base 2) of ",
                      "query ", overflow.query, " of head ", overflow.head, " (batch ",
                      overflow.batch, ") against key ", overflow.key,
                      ", which turns rows NaN or zero; accepted: scale ≤ ", bound,
                      " for that pair (or rescale q and k)");
  }
  return like_input(out, q);
}

}  // namespace
}  // namespace sparsekit

TORCH_LIBRARY_IMPL(sparsekit, CPU, m) {
  m.impl("block_sparse_attention", &sparsekit::block_sparse_attention);
}
