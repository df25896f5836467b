// The kernel cores for AVX-512 F/BW/VL/DQ (x86 since Skylake-X and Zen 4), with the AVX2 code
// for 8-lane work. The target pragma enables the intrinsics for the code below it only; the
// headers above it stay baseline code.
#include "cores_prelude.h"

#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,popcnt,bmi,bmi2")
#define SPARSEKIT_ISA avx512
#define SPARSEKIT_AVX2 1
#define SPARSEKIT_AVX512 1
#include "cores_impl.h"
#endif
