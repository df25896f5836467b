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
// bfloat16 or int8 codes with float32 `scales` applied once per output, or once per group of
// inputs and output (act_inputs.h has the dtypes of the other arguments); the result has x's
// dtype.
// act_bitmap_qgemv is the same product as W8A8 (int8 values; the kept inputs quantized to
// int8 codes; exact integer sums, act_bitmap_qgemv_core.h).
// Registered as torch.ops.sparsekit.act_bitmap_gemv and act_bitmap_qgemv (schemas in
// library.cpp).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "act_inputs.h"
#include "common.h"
#include "qlinear.h"

namespace sparsekit {

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
bool offsets_fall(const int32_t* p, int64_t n) {
  int32_t falls = 0;  // an int, not a bool, for the vectorized reduction
#pragma omp simd reduction(| : falls)
  for (int64_t i = 1; i < n; ++i) falls |= static_cast<int32_t>(p[i] < p[i - 1]);
  return falls != 0;
}

}  // namespace sparsekit

namespace {

constexpr int64_t kWorkPerThread = 16384;  // stored weights read that pay for one more thread
constexpr int64_t kMaxQInFeatures = 65536;  // act_bitmap_qgemv: exact int32 sums (qlinear.cpp)

// The checked arguments of either op for the kept inputs idx (values val) of x, y and the
// thread count, before anything is written (`groups`: int8 scales per group of inputs are
// taken).
sparsekit::ActBitmapGemvArgs checked_args(
    const at::Tensor& values, const at::Tensor& bitmap, const at::Tensor& offsets,
    const at::Tensor& x, const at::Tensor& threshold, const std::optional<at::Tensor>& bias,
    int64_t out_features, int64_t block, int64_t threads,
    const std::optional<at::Tensor>& scales, bool groups) {
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
  const auto a = sparsekit::check_act_outputs(values, x, bias, scales, out_features, threads,
                                              groups ? in : -1);
  return sparsekit::ActBitmapGemvArgs{
      sparsekit::value_type(values), values.data_ptr(),
      reinterpret_cast<const uint16_t*>(bitmap.data_ptr<int16_t>()),
      offsets.data_ptr<int32_t>(), in, out_features, block, nblocks, stored, a.scale, a.bias,
      a.bf16, nullptr, nullptr, 0, nullptr, a.threads,
      sparsekit::bitmap_vpexpand(sparsekit::value_type(values), /*columns=*/true),
      a.group_scales, a.group_size};
}

// args with the kept inputs idx (kept of them) and a fresh float32 y; the thread count from
// the stored weights in the kept columns, estimated from the density: small products stay on
// one thread (a fork costs microseconds), larger ones get one per kWorkPerThread.
at::Tensor with_kept(sparsekit::ActBitmapGemvArgs* a, const std::vector<int32_t>& idx,
                     const at::Tensor& x) {
  auto y = at::empty({a->out}, x.options().dtype(at::kFloat));
  const double density = static_cast<double>(a->stored) / std::max<int64_t>(1, a->in);
  const auto work = static_cast<int64_t>(density * static_cast<double>(idx.size()));
  a->threads = static_cast<int>(std::clamp<int64_t>(
      std::min<int64_t>(a->threads, work / kWorkPerThread), 1,
      std::max<int64_t>(1, a->nblocks)));
  a->idx = idx.data();
  a->kept = static_cast<int64_t>(idx.size());
  a->y = y.data_ptr<float>();
  return y;
}

at::Tensor act_bitmap_gemv(const at::Tensor& values, const at::Tensor& bitmap,
                           const at::Tensor& offsets, const at::Tensor& x,
                           const at::Tensor& threshold, const std::optional<at::Tensor>& bias,
                           int64_t out_features, int64_t block, int64_t threads,
                           const std::optional<at::Tensor>& scales) {
  auto a = checked_args(values, bitmap, offsets, x, threshold, bias, out_features, block,
                        threads, scales, true);
  std::vector<int32_t> idx;
  std::vector<float> val;
  sparsekit::kept_inputs(x, threshold, &idx, &val);
  auto y = with_kept(&a, idx, x);
  a.val = val.data();
  sparsekit::cores().act_bitmap_gemv(a);
  return sparsekit::like_input(y, x);
}

// The W8A8 op: the kept inputs quantized to int8 codes on the grid of sparsekit.quantize
// (their largest magnitude / 127, rounded half to even: the grid of the thresholded row, as
// the W8A8 formats quantize a row), exact integer sums, y = sum * sx * scales (+ bias). A row
// with a NaN or infinite input has no grid: every output is NaN, as in the W8A8 formats.
at::Tensor act_bitmap_qgemv(const at::Tensor& values, const at::Tensor& bitmap,
                            const at::Tensor& offsets, const at::Tensor& x,
                            const at::Tensor& threshold, const std::optional<at::Tensor>& bias,
                            int64_t out_features, int64_t block, int64_t threads,
                            const at::Tensor& scales) {
  TORCH_CHECK(values.scalar_type() == at::kChar, "values must be int8 codes, got ",
              values.scalar_type());
  TORCH_CHECK(x.dim() != 1 || x.size(0) <= kMaxQInFeatures, "in_features must be at most ",
              kMaxQInFeatures, " (int32 sums of int8 products), got ", x.size(0));
  auto a = checked_args(values, bitmap, offsets, x, threshold, bias, out_features, block,
                        threads, scales, false);
  std::vector<int32_t> idx;
  std::vector<float> val;
  sparsekit::kept_inputs(x, threshold, &idx, &val);
  auto y = with_kept(&a, idx, x);
  if (!sparsekit::all_finite(x)) {  // no int8 grid for a NaN or infinite input: all NaN
    y.fill_(std::numeric_limits<float>::quiet_NaN());
    return sparsekit::like_input(y, x);
  }
  float amax = 0.f;
  for (const float v : val) amax = std::max(amax, std::fabs(v));
  const float sx = amax > 0.f ? amax / 127.f : 1.f;
  std::vector<int8_t> codes(val.size());
  int32_t code_sum = 0;
  for (size_t k = 0; k < val.size(); ++k) {
    const float t = std::clamp(std::nearbyint(val[k] / sx), -127.f, 127.f);
    codes[k] = static_cast<int8_t>(t);
    code_sum += codes[k];
  }
  sparsekit::qcores().act_bitmap_qgemv(sparsekit::ActBitmapQGemvArgs{a, codes.data(), sx,
                                                                      code_sum});
  return sparsekit::like_input(y, x);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekit, CPU, m) {
  m.impl("act_bitmap_gemv", &act_bitmap_gemv);
  m.impl("act_bitmap_qgemv", &act_bitmap_qgemv);
}
