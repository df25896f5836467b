// The W8A8 kernel cores: int8 weights times int8 activations (quantized per input row inside
// the op), with exact int32 sums. Types and declarations only (see cores.h for why): the
// argument structs are the float cores' (DenseArgs, BitmapArgs, NMArgs with int8 values);
// qlinear_core.h defines the arithmetic once per instruction set, qlinear.cpp the ops.
#pragma once

#include "cores.h"

namespace sparsekit {

// act_bitmap_qgemv (act_bitmap_gemv.cpp): act_bitmap_gemv's arguments with int8 values, the
// kept inputs' int8 codes (codes[k] for idx[k]; a.val is unused), their scale sx and the sum
// of the codes.
struct ActBitmapQGemvArgs {
  ActBitmapGemvArgs a;
  const int8_t* codes;
  float sx;
  int32_t code_sum;
};

// The W8A8 entry points of one instruction set.
struct QCores {
  const char* isa;  // "scalar", "avx2" or "avx512" (with VNNI, VBMI, VBMI2, BITALG)
  void (*dense_qlinear)(const DenseArgs&);
  void (*bitmap_qlinear)(const BitmapArgs&);
  void (*nm_qlinear)(const NMArgs&);
  // bitmap_linear with int8 values (float inputs): the byte permutes of this instruction set
  // expand the codes (the float cores' own bitmap_linear where it has none)
  void (*bitmap_int8_linear)(const BitmapArgs&);
  void (*act_bitmap_qgemv)(const ActBitmapQGemvArgs&);
};

// The W8A8 cores of the active instruction set (cores(); see set_isa): an AVX-512 CPU without
// VNNI, VBMI, VBMI2 and BITALG gets the AVX2 ones.
const QCores& qcores();

namespace scalar {
extern const QCores kQCores;
}
namespace avx2 {
extern const QCores kQCores;
}
namespace avx512 {
extern const QCores kQCores;
}

}  // namespace sparsekit
