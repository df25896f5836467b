// The sparsekit operator library: the schema of every kernel, called from Python as
// torch.ops.sparsekit.<name>. Each kernel family registers its CPU implementation in its
// own file (TORCH_LIBRARY_IMPL); the shape-only fake implementations that let
// torch.compile and torch.export trace the ops are registered from Python
// (sparsekit/engine/kernels/fake.py). The arithmetic of each kernel is its family's
// *_core.h, compiled once per instruction set (cores.h); isa.cpp chooses the one that runs
// and defines, with their implementations, the ops isa() / isas() / set_isa(name).

#include <torch/library.h>

TORCH_LIBRARY(sparsekit, m) {
  // Every op checks the sizes, dtypes and devices of its arguments (common.h) and raises
  // before it writes anything; index contents are trusted, as checked where a format or
  // structure is built from untrusted tensors.
  // Inference: y = x @ W.T (+ bias) for x (..., in_features) and W in one compressed format
  // (the rows of x: all its dimensions but the last; y (..., out_features)).
  // Each takes fp32, bf16 or int8 values and fp32 or bf16 x (sums in fp32, y in x's dtype);
  // int8 values need float32 `scales` (rows,): y[r] = scales[r] * sum + bias[r], or
  // (rows, groups) per group of in_features / groups inputs (every op but the W8A8 ones; a
  // multiple of 16 inputs for bitmap, of 16 values for nm, of the block width for bsr); other
  // values no scales.
  m.def("csr_linear(Tensor values, Tensor col_indices, Tensor rowptr, Tensor x, Tensor? bias, "
        "int in_features, SymInt threads, Tensor? scales=None) -> Tensor");
  m.def("bitmap_linear(Tensor values, Tensor bitmap, Tensor rowptr, Tensor x, Tensor? bias, "
        "int in_features, SymInt threads, Tensor? scales=None) -> Tensor");
  m.def("nm_linear(Tensor values, Tensor indices, Tensor x, Tensor? bias, int n, int m, "
        "int in_features, SymInt threads, Tensor? scales=None) -> Tensor");
  m.def("bsr_linear(Tensor values, Tensor col_indices, Tensor rowptr, Tensor x, Tensor? bias, "
        "int out_features, int in_features, SymInt threads, Tensor? scales=None) -> Tensor");
  // Dense low precision: W (rows, in_features) bf16, or int8 with float32 scales (rows,).
  m.def("dense_linear(Tensor weight, Tensor x, Tensor? bias, int in_features, SymInt threads, "
        "Tensor? scales=None) -> Tensor");
  // W8A8: the dense/bitmap/nm ops with int8 codes and required scales that also quantize each
  // row of x to int8 (its own scale, max |x| / 127) and sum exact int32 products (qlinear.cpp).
  m.def("dense_qlinear(Tensor weight, Tensor x, Tensor? bias, int in_features, SymInt threads, "
        "Tensor? scales=None) -> Tensor");
  m.def("bitmap_qlinear(Tensor values, Tensor bitmap, Tensor rowptr, Tensor x, Tensor? bias, "
        "int in_features, SymInt threads, Tensor? scales=None) -> Tensor");
  m.def("nm_qlinear(Tensor values, Tensor indices, Tensor x, Tensor? bias, int n, int m, "
        "int in_features, SymInt threads, Tensor? scales=None) -> Tensor");
  m.def("fanin_linear(Tensor values, Tensor col_indices, Tensor rows, Tensor x, Tensor? bias, "
        "int out_features, int in_features, SymInt threads, Tensor? scales=None) -> Tensor");
  // Activation sparsity: one input row, skipping the weight rows of small inputs. Weights
  // fp32 or bf16 (x, threshold and bias of the same dtype) or int8 codes with float32 `scales`
  // (out,) (x fp32 or bf16; threshold and bias of x's dtype); sums fp32, y in x's dtype.
  // All but act_bitmap_qgemv also take `scales` (groups, out): per group of in / groups
  // inputs and output (the transposed grid).
  m.def("act_gemv(Tensor wt, Tensor x, Tensor threshold, Tensor? bias, SymInt threads, "
        "Tensor? scales=None) -> Tensor");
  // The same on a pruned weight stored by input column in blocks of `block` outputs (only the
  // kept weights; int16 rows within the block, read as uint16).
  m.def("act_sparse_gemv(Tensor values, Tensor rows, Tensor colptr, Tensor x, Tensor threshold, "
        "Tensor? bias, int out_features, int block, SymInt threads, Tensor? scales=None) -> Tensor");
  // The same with the pruned weight as bitmap columns: per input column and block of `block`
  // outputs (a multiple of 64), block / 16 int16 words of bits (in, blocks, block / 16) and
  // the packed values at int32 offsets (in, blocks + 1).
  m.def("act_bitmap_gemv(Tensor values, Tensor bitmap, Tensor offsets, Tensor x, "
        "Tensor threshold, Tensor? bias, int out_features, int block, SymInt threads, "
        "Tensor? scales=None) -> Tensor");
  // The same as W8A8: int8 values and float32 `scales`, the kept inputs quantized to int8
  // codes with one scale (their largest magnitude / 127), exact integer sums.
  m.def("act_bitmap_qgemv(Tensor values, Tensor bitmap, Tensor offsets, Tensor x, "
        "Tensor threshold, Tensor? bias, int out_features, int block, SymInt threads, "
        "Tensor scales) -> Tensor");
  // x (..., in) fp32 or bf16 with the entries |x_j| < threshold_j (threshold (in,), x's
  // dtype) zeroed: the thresholding of the multi-row activation-sparse path.
  m.def("act_threshold(Tensor x, Tensor threshold) -> Tensor");
  m.def("act_threshold.out(Tensor x, Tensor threshold, *, Tensor(a!) out) -> Tensor(a!)");
  // Training (SparseLinear): row-sparse times dense, and dense-dense sampled at the nonzeros;
  // in_features counts the columns of the sparse matrix (the rows of xt, resp. b).
  m.def("spmm_rows(Tensor rowptr, Tensor col, Tensor values, Tensor? perm, Tensor xt, "
        "Tensor? bias, int in_features, SymInt threads) -> Tensor");
  m.def("sddmm(Tensor rowptr, Tensor col, Tensor a, Tensor b, int in_features, SymInt threads) "
        "-> Tensor");
  // Attention: softmax(scale * q k^T) v over the (query block, key block) tiles block_mask
  // keeps; q (batch, heads, q_len, dim), k and v (batch, kv_heads, kv_len, dim) float32 or
  // bf16, kv_heads dividing heads; block_mask bool (1 or batch, 1 or heads, q blocks, k
  // blocks); causal aligns the last query with the last key; rows with no kept key are zero.
  m.def("block_sparse_attention(Tensor q, Tensor k, Tensor v, Tensor block_mask, bool causal, "
        "int block_size, float scale, SymInt threads) -> Tensor");
}
