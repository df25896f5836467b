// Weight-sparse × activation-sparse GEMV on CPU with bitmap columns: y = threshold(x) @ W.T +
// bias for one input row, where W holds only its kept (pruned-away weights are not stored)
// values.
//
// W is stored by input column in blocks of `block` consecutive outputs (a multiple of 64).
// For input column j and output block b, bitmap[j, b] holds block / 16 words of bits (bit r of
// word w: output 16 w + r of the block is stored), and offsets[j, b] .. offsets[j, b + 1] are
// the packed stored values of that block of the column, in output order; a column's blocks
// follow each other, so a column is one run of values. Inputs with |x_j| < threshold_j are
// treated as zero and their columns are never read; a kept column expands its packed values
// into the lanes of their outputs by its bitmap (a table shuffle per 8 or 16 outputs,
// bitmap_core.h, or on Intel CPUs with VBMI2 expand instructions, act_bitmap_gemv_core.h)
// and adds x_j times them into fp32 sums held in cache. Against act_sparse_gemv's
// 2-byte row per value this reads 1 bit per weight and 4 bytes per (column, block), and
// needs no scattered store: at 50 % weight x 50 % input sparsity about half of the
// row-bitmap format's bytes. Values are float32,
// bfloat16 or int8 codes with float32 per-output `scales` applied once per output
// (act_inputs.h has the dtypes of the other arguments); the result has x's dtype.
// Registered as torch.ops.sparsekit.act_bitmap_gemv (schema in library.cpp).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "act_inputs.h"
#include "common.h"

namespace {

constexpr int64_t kWorkPerThread = 16384;  // stored weights read that pay for one more thread

at::Tensor act_bitmap_gemv(const at::Tensor& values, const at::Tensor& bitmap,
                           const at::Tensor& offsets, const at::Tensor& x,
                           const at::Tensor& threshold, const std::optional<at::Tensor>& bias,
                           int64_t out_features, int64_t block, int64_t threads,
                           const std::optional<at::Tensor>& scales) {
  sparsekit::check_tensor(values, "values", 1);
  const int64_t stored = values.size(0);
  sparsekit::check_tensor(x, "x", 1);
  const int64_t in = x.size(0);
  sparsekit::check_act_inputs(values, "values", x, threshold, in);
  TORCH_CHECK(out_features >= 0, "out_features must be non-negative, got ", out_features);
  TORCH_CHECK(block >= 64 && block <= 4096 && block % 64 == 0,
              "block must be a multiple of 64 in [64, 4096], got ", block);
  const int64_t nblocks = (out_features + block - 1) / block;
  sparsekit::check_tensor(bitmap, "bitmap", 3, at::kShort);
  sparsekit::check_size(bitmap, "bitmap", 0, in);
  sparsekit::check_size(bitmap, "bitmap", 1, nblocks);
  sparsekit::check_size(bitmap, "bitmap", 2, block / 16);
  sparsekit::check_tensor(offsets, "offsets", 2, at::kInt);
  sparsekit::check_size(offsets, "offsets", 0, in);
  sparsekit::check_size(offsets, "offsets", 1, nblocks + 1);
  TORCH_CHECK(stored < (int64_t{1} << 31), "values must have fewer than 2^31 entries, got ",
              stored);
  sparsekit::check_offsets(offsets, "offsets", stored);
  const auto a = sparsekit::check_act_outputs(values, x, bias, scales, out_features, threads);
  std::vector<int32_t> idx;
  std::vector<float> val;
  sparsekit::kept_inputs(x, threshold, &idx, &val);
  auto y = at::empty({out_features}, x.options().dtype(at::kFloat));
  // Stored weights in the kept columns, estimated from the density: small products stay on
  // one thread (a fork costs microseconds), larger ones get one per kWorkPerThread.
  const double density = static_cast<double>(stored) / std::max<int64_t>(1, in);
  const auto work = static_cast<int64_t>(density * static_cast<double>(idx.size()));
  const int T = static_cast<int>(std::clamp<int64_t>(
      std::min<int64_t>(a.threads, work / kWorkPerThread), 1, std::max<int64_t>(1, nblocks)));
  sparsekit::cores().act_bitmap_gemv(sparsekit::ActBitmapGemvArgs{
      sparsekit::value_type(values), values.data_ptr(),
      reinterpret_cast<const uint16_t*>(bitmap.data_ptr<int16_t>()),
      offsets.data_ptr<int32_t>(), in, out_features, block, nblocks, stored, a.scale, a.bias,
      a.bf16, idx.data(), val.data(), static_cast<int64_t>(idx.size()), y.data_ptr<float>(),
      T, sparsekit::bitmap_vpexpand()});
  return sparsekit::like_input(y, x);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekit, CPU, m) { m.impl("act_bitmap_gemv", &act_bitmap_gemv); }
