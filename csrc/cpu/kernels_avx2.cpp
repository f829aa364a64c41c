// The CPU kernel table for x86-64 CPUs with AVX2 and FMA (kernel_table.h), chosen at run time.
// Built where kernel_table.h defines MHGD_HAVE_AVX2 (x86 with g++).
//
// The headers shared with the baseline code (the table's declaration and tridiagonal.h, which it
// includes; scalar functions only) come before the target pragma, so that their inline functions
// stay baseline code in this unit too. graph_kl_math.h comes after it, through graph_kl_rows.h:
// its templates are instantiated with AVX2 vectors, and a template keeps the target in force where
// it is defined, so a baseline definition would receive and return AVX2 registers across calls
// the compiler does not inline (an -O1 sanitizer build returned garbage gradients that way); it
// sits in a namespace of its own per capability (MHGD_GRAPH_KL_MATH_ABI). The pragma must come
// before at::vec and Sleef so that they take their AVX2 paths.
#include "kernel_table.h"

#ifdef MHGD_HAVE_AVX2
#pragma GCC target("avx2,fma")
// g++ does not define the feature macros for a target pragma; sleef.h and at::vec test them.
#ifndef __AVX2__
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#endif
#define CPU_CAPABILITY_AVX2
#define CPU_CAPABILITY mhgd_avx2  // at::vec's inline namespace: apart from the generic and libtorch's
#define MHGD_CPU_CAPABILITY avx2
#include "capability_kernels.h"
#endif
