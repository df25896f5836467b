// The kernel cores of one instruction set: included once by each isa_*.cpp after its target
// pragma, with SPARSEKIT_ISA naming the namespace (scalar, avx2, avx512) and SPARSEKIT_AVX2 /
// SPARSEKIT_AVX512 saying which intrinsics the cores may use. Everything here lives in
// namespace sparsekit::SPARSEKIT_ISA, so no two instruction sets share an inline function.

#ifndef SPARSEKIT_AVX2
#define SPARSEKIT_AVX2 0
#endif
#ifndef SPARSEKIT_AVX512
#define SPARSEKIT_AVX512 0
#endif
#define SPARSEKIT_NAME_(isa) #isa
#define SPARSEKIT_NAME(isa) SPARSEKIT_NAME_(isa)

#include "vec.h"

#include "csr16_core.h"
#include "decoded_rows.h"
#include "bitmap_core.h"
#include "nm_core.h"
#include "bsr_core.h"
#include "fanin_core.h"
#include "dense_core.h"
#include "spmm_train_core.h"
#include "act_gemv_core.h"
#include "act_sparse_gemv_core.h"
#include "act_bitmap_gemv_core.h"

namespace sparsekit::SPARSEKIT_ISA {

extern const Cores kCores;
const Cores kCores = {SPARSEKIT_NAME(SPARSEKIT_ISA), &csr_linear, &bitmap_linear, &nm_linear,
                      &bsr_linear, &fanin_linear, &dense_linear, &spmm_rows, &sddmm,
                      &act_gemv, &act_sparse_gemv, &act_bitmap_gemv};

}  // namespace sparsekit::SPARSEKIT_ISA

#include "qlinear_core.h"  // the W8A8 cores (their own table, kQCores)
#include "act_bitmap_qgemv_core.h"

namespace sparsekit::SPARSEKIT_ISA {

extern const QCores kQCores;
const QCores kQCores = {SPARSEKIT_NAME(SPARSEKIT_ISA), &dense_qlinear, &bitmap_qlinear,
                        &nm_qlinear, &bitmap_int8_linear, &act_bitmap_qgemv};

}  // namespace sparsekit::SPARSEKIT_ISA

#include "attention_core.h"  // block-sparse attention (its own table, kAttentionCores)
