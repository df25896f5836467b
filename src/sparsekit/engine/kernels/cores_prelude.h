// Every header the kernel cores use, included by each isa_*.cpp before its target pragma: code
// from these headers (the standard library, OpenMP, parallel.h) is compiled for the baseline
// in every translation unit, so the linker may keep any copy of it.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "cores.h"
#include "parallel.h"
