// The kernel cores: the arithmetic of the linear ops on raw pointers, compiled once per
// instruction set (isa_scalar.cpp, isa_avx2.cpp, isa_avx512.cpp) and chosen when the library
// loads (isa.cpp). An op (csr16.cpp, ...) checks its tensors, fills one of the argument
// structs below and calls cores().<op>(args).
//
// This header is shared by every translation unit, whatever its target: it holds only types
// and declarations, no inline code, so that no function compiled for one ISA can be picked by
// the linker for another.
#pragma once

#include <cstdint>

namespace sparsekit {


// The element type of stored weights: float32, bfloat16 or int8 codes (with per-row scales).
enum class Value : int32_t { f32, bf16, i8 };

// A bfloat16 value: the upper 16 bits of a float32 (the layout of c10::BFloat16, without
// its inline code).
struct bf16_bits {
  uint16_t x;
};

// The output stage of a linear kernel: y[r] = scale[r] * sum + bias[r], each factor
// optional (scale: int8 values; nullptr: none).
struct Output {
  const float* scale;
  const float* bias;
};

// y (batch, rows) = Output(x (batch, cols) @ W.T): the part every linear op shares.
struct Linear {
  const float* x;
  float* y;
  int64_t batch, rows, cols;
  Output out;
  int threads;
};

// W in CSR: values of type `value`, uint16 (`narrow`) or int32 column indices, int32 row
// pointers.
struct CsrArgs {
  Linear io;
  Value value;
  const void* values;
  const void* col;
  bool narrow;
  const int32_t* rowptr;
  // int8 codes scaled per row and group of group_size inputs (any size: a row's columns
  // rise, so each group's nonzeros are one run), as DenseArgs
  const float* group_scales = nullptr;
  int64_t group_size = 0;
};

// W as bitmap rows: `words` 16-bit words of bits per row, the values of the set bits packed
// row by row, int32 row pointers into them. `vpexpand`: the AVX-512 cores expand bf16 words
// with VBMI2 vpexpandw and int8 codes with vpexpandb (the bitmap expansion "vpexpand", which
// only a CPU with VBMI2 runs); `vpexpand_halves`: the W8A8 rows of 1-2 input rows do so by
// 256-bit halves (bitmap_vpexpand_halves).
struct BitmapArgs {
  Linear io;
  Value value;
  const void* values;
  const uint16_t* bits;
  const int32_t* rowptr;
  int64_t words;
  bool vpexpand;
  bool vpexpand_halves = false;
  // int8 codes scaled per row and group of group_size inputs (a multiple of 16), as DenseArgs
  const float* group_scales = nullptr;
  int64_t group_size = 0;
};

// W as packed N:M: `width` values per row, `fbits`-bit input fields in `words` int32 per row.
struct NMArgs {
  Linear io;
  Value value;
  const void* values;
  const uint32_t* idx;
  int64_t n, m, fbits, width, words;
  // int8 codes scaled per row and group of group_size inputs (whose values fill whole words
  // of fields: a multiple of 16 values), as DenseArgs
  const float* group_scales = nullptr;
  int64_t group_size = 0;
};

// The largest block height of BSR weights (the GEMV keeps one accumulator per block row).
constexpr int64_t kBsrMaxBlockRows = 64;

// W in BSR: blocks (nblocks, R, C) of `value` values (int8: times io.out.scale of each
// output row), one uint16 (`narrow`) or int32 block column per block, int32 block-row
// pointers.
struct BsrArgs {
  Linear io;
  Value value;
  const void* values;
  const void* col;
  bool narrow;
  const int32_t* rowptr;
  int64_t R, C;
  // int8 codes scaled per row and group of group_size inputs (a multiple of C: whole
  // blocks), as DenseArgs
  const float* group_scales = nullptr;
  int64_t group_size = 0;
};

// W with k stored inputs in each of n stored rows: `value` values (int8: times io.out.scale
// of the output row) and uint16 (`narrow`) or int32 columns (n, k), and each stored row's
// output row. y holds the bias and is added to.
struct FanInArgs {
  Linear io;
  Value value;
  const void* values;
  const void* col;
  bool narrow;
  const int32_t* rows;
  int64_t n, k;
  // int8 codes scaled per output row and group of group_size inputs (any size), as CsrArgs
  const float* group_scales = nullptr;
  int64_t group_size = 0;
};

// A dense W (rows, cols) of bf16 or int8 (scaled) values. int8 codes are scaled per row
// (io.out.scale) or, with group_scales, per row and group of group_size consecutive inputs
// (group_scales[r * (cols / group_size) + g]; io.out.scale is then null).
struct DenseArgs {
  Linear io;
  Value value;
  const void* weight;
  const float* group_scales = nullptr;
  int64_t group_size = 0;
};

// Training: y (rows, batch) = W (rows, in) @ xt (in, batch) + bias, W in CSR with values read
// through perm when given; every float operand float64 (`f64`) or float32.
struct SpmmRowsArgs {
  bool f64;
  const int32_t* rowptr;
  const int32_t* col;
  const void* values;
  const int64_t* perm;
  const void* xt;
  const void* bias;
  void* y;
  int64_t rows, batch;
  int threads;
};

// Training: out[k] = <a[i, :], b[col[k], :]> for the nonzeros k of each row i.
struct SddmmArgs {
  bool f64;
  const int32_t* rowptr;
  const int32_t* col;
  const void* a;
  const void* b;
  void* out;
  int64_t rows, batch;
  int threads;
};

// Activation sparsity, one input row: y (out) = Output(sum over the nnz kept inputs idx[k]
// (values val[k]) of val[k] * wt[idx[k], :]); wt (in, out) of float32, bf16 or int8 codes
// (int8: `scale` per output, else nullptr); the bias has the input's dtype (`bias_bf16`).
struct ActGemvArgs {
  Value value;
  const void* wt;
  const float* scale;
  const void* bias;
  bool bias_bf16;
  const int32_t* idx;
  const float* val;
  int64_t nnz, out;
  float* y;
  int threads;
  // int8 codes scaled per group of group_size inputs and output: group_scales[g * out + o]
  // (the transposed grid; `scale` is then null)
  const float* group_scales = nullptr;
  int64_t group_size = 0;
};

// The same on a pruned W stored by input column in `nblocks` blocks of `block` outputs:
// colptr (nblocks, in + 1) into `stored` values (float32, bf16 or int8 codes) and their uint16
// row within the block. The kept inputs idx[k] (values val[k]) are rising int32 indices.
struct ActSparseGemvArgs {
  Value value;
  const void* values;
  const uint16_t* rows;
  const int32_t* colptr;
  int64_t in, out, block, nblocks, stored;
  const float* scale;
  const void* bias;
  bool bias_bf16;
  const int32_t* idx;
  const float* val;
  int64_t kept;
  float* y;
  int threads;
  // int8 codes scaled per group of inputs and output, as ActGemvArgs
  const float* group_scales = nullptr;
  int64_t group_size = 0;
};

// The same on a pruned W stored as bitmap columns (act_bitmap_gemv.cpp): in `nblocks` blocks of
// `block` outputs (a multiple of 64), for each (input column, block) `block` / 16 words of
// bits (bit r: output r of the block stored), bits (in, nblocks, block / 16), and int32
// offsets (in, nblocks + 1) to its packed stored values (float32, bf16 or int8 codes),
// column after column, `stored` in all. `vpexpand`: the AVX-512 cores expand the words with
// VBMI2 vpexpandw / vpexpandb / vexpandps (the bitmap expansion "vpexpand",
// act_bitmap_gemv_core.h) instead of the tables.
struct ActBitmapGemvArgs {
  Value value;
  const void* values;
  const uint16_t* bits;
  const int32_t* offsets;
  int64_t in, out, block, nblocks, stored;
  const float* scale;
  const void* bias;
  bool bias_bf16;
  const int32_t* idx;
  const float* val;
  int64_t kept;
  float* y;
  int threads;
  bool vpexpand;
  // int8 codes scaled per group of inputs and output, as ActGemvArgs
  const float* group_scales = nullptr;
  int64_t group_size = 0;
};

// The entry points of one instruction set.
struct Cores {
  const char* isa;  // "scalar", "avx2" or "avx512"
  void (*csr_linear)(const CsrArgs&);
  void (*bitmap_linear)(const BitmapArgs&);
  void (*nm_linear)(const NMArgs&);
  void (*bsr_linear)(const BsrArgs&);
  void (*fanin_linear)(const FanInArgs&);
  void (*dense_linear)(const DenseArgs&);
  void (*spmm_rows)(const SpmmRowsArgs&);
  void (*sddmm)(const SddmmArgs&);
  void (*act_gemv)(const ActGemvArgs&);
  void (*act_sparse_gemv)(const ActSparseGemvArgs&);
  void (*act_bitmap_gemv)(const ActBitmapGemvArgs&);
};

namespace scalar {
extern const Cores kCores;
}
namespace avx2 {
extern const Cores kCores;
}
namespace avx512 {
extern const Cores kCores;
}

// The cores of the active instruction set (the best this CPU runs, unless set_isa chose
// another).
const Cores& cores();

// Whether the AVX-512 bitmap kernels expand `values` (int8 codes with vpexpandb, bf16 words
// with vpexpandw, fp32 with vexpandps: the bitmap expansion "vpexpand") instead of by the
// pshufb tables and vpermb by ranks ("tables"): the setting of set_bitmap_expansion, or
// under "auto" (the default) what this CPU runs faster for that dtype, in the bitmap rows or
// in the bitmap columns of act_bitmap_gemv (`columns`; isa.cpp).
bool bitmap_vpexpand(Value values, bool columns = false);

// Whether the W8A8 bitmap rows that expand int8 codes with vpexpandb (bitmap_vpexpand) take
// 32 codes per instruction instead of 64: on AMD Zen 4 (isa.cpp).
bool bitmap_vpexpand_halves();

}  // namespace sparsekit
