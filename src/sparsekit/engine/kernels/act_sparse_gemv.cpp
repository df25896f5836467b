// Weight-sparse × activation-sparse GEMV on CPU: y = threshold(x) @ W.T + bias for one input
// row, where W holds only its kept (pruned-away weights are not stored) values.
//
// W is stored by input column, in blocks of `block` consecutive outputs: for output block b
// and input j, entries colptr[b, j] .. colptr[b, j + 1] are the kept weights of column j in
// that block, `values` their values and `rows` their output index within the block (uint16,
// stored as int16; a block has at most 65536 outputs). Inputs with |x_j| < threshold_j are
// treated as zero and their columns are never read, and within a kept column only stored
// weights are: at 50 % activation sparsity on a 50 %-pruned weight a quarter of the weights
// are touched. Values are float32, bfloat16 or int8 codes with float32 `scales` per output,
// or per group of inputs and output (act_inputs.h has the dtypes of the other arguments); every sum is float32
// (act_sparse_gemv_core.h, one copy per instruction set) and the result has x's dtype.
// Registered as torch.ops.sparsekit.act_sparse_gemv (schema in library.cpp).

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

at::Tensor act_sparse_gemv(const at::Tensor& values, const at::Tensor& rows,
                           const at::Tensor& colptr, const at::Tensor& x,
                           const at::Tensor& threshold, const std::optional<at::Tensor>& bias,
                           int64_t out_features, int64_t block, int64_t threads,
                           const std::optional<at::Tensor>& scales) {
  sparsekit::check_tensor(values, "values", 1);
  const int64_t nnz = values.size(0);
  sparsekit::check_tensor(rows, "rows", 1, at::kShort);
  sparsekit::check_size(rows, "rows", 0, nnz);
  sparsekit::check_tensor(x, "x", 1);
  const int64_t in = x.size(0);
  sparsekit::check_act_inputs(values, "values", x, threshold, in);
  TORCH_CHECK(out_features >= 0, "out_features must be non-negative, got ", out_features);
  TORCH_CHECK(block >= 1 && block <= 65536, "block must be in [1, 65536], got ", block);
  const int64_t nblocks = (out_features + block - 1) / block;
  sparsekit::check_tensor(colptr, "colptr", 2, at::kInt);
  sparsekit::check_size(colptr, "colptr", 0, nblocks);
  sparsekit::check_size(colptr, "colptr", 1, in + 1);
  TORCH_CHECK(nnz < (int64_t{1} << 31), "values must have fewer than 2^31 entries, got ", nnz);
  const int32_t* ptr = colptr.data_ptr<int32_t>();
  sparsekit::check_offsets(colptr, "colptr", nnz);
  const auto a = sparsekit::check_act_outputs(values, x, bias, scales, out_features, threads,
                                              in);
  std::vector<int32_t> idx;
  std::vector<float> val;
  sparsekit::kept_inputs(x, threshold, &idx, &val);
  auto y = at::empty({out_features}, x.options().dtype(at::kFloat));
  // Stored weights in the kept columns, estimated from the density: small products stay on
  // one thread (a fork costs microseconds), larger ones get one per kWorkPerThread.
  const double density = static_cast<double>(nnz) / std::max<int64_t>(1, in);
  const auto work = static_cast<int64_t>(density * static_cast<double>(idx.size()));
  const int T = static_cast<int>(std::clamp<int64_t>(
      std::min<int64_t>(a.threads, work / kWorkPerThread), 1, std::max<int64_t>(1, nblocks)));
  sparsekit::cores().act_sparse_gemv(sparsekit::ActSparseGemvArgs{
      sparsekit::value_type(values), values.data_ptr(),
      reinterpret_cast<const uint16_t*>(rows.data_ptr<int16_t>()), ptr, in, out_features, block,
      nblocks, nnz, a.scale, a.bias, a.bf16, idx.data(), val.data(),
      static_cast<int64_t>(idx.size()), y.data_ptr<float>(), T, a.group_scales,
      a.group_size});
  return sparsekit::like_input(y, x);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekit, CPU, m) { m.impl("act_sparse_gemv", &act_sparse_gemv); }
