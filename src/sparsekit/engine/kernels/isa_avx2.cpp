// The kernel cores for AVX2 + FMA (x86 since Haswell and Zen 1). The target pragma enables the
// intrinsics for the code below it only; the headers above it stay baseline code.
#include "cores_prelude.h"

#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx2,fma,popcnt,bmi,bmi2")
#define SPARSEKIT_ISA avx2
#define SPARSEKIT_AVX2 1
#include "cores_impl.h"
#endif
