// The AVX2+FMA build of the CPU kernels: seq_logratio.cpp compiled again with that code generation, so that
// the vectorized token loops run 4 float64 lanes with fused multiply-adds. seq_logratio.cpp picks it at run
// time when the CPU supports both. The inline namespace `avx2` (LUSPO_ISA) keeps every symbol of this build
// apart from the baseline one. GCC on x86-64 only; elsewhere this file is empty and the baseline runs.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// System headers first, with the baseline target: `#pragma GCC target` must not reach into them.
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <vector>

#pragma GCC target("avx2,fma")
#define LUSPO_ISA avx2
#define LUSPO_CPU_VARIANT_AVX2 1
#include "seq_logratio.cpp"
#endif
