// The graph-KL row math for CPUs with AVX2 and FMA (chosen at run time by graph_kl_cpu.cpp).
// The pragma must come before every include so that at::vec and Sleef take their AVX2 paths.
// Compiled only where graph_kl_rows.h declares the variant (x86 with g++).
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx2,fma")
// g++ does not define the feature macros for a target pragma; sleef.h and at::vec test them.
#ifndef __AVX2__
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#endif
#define CPU_CAPABILITY_AVX2
// at::vec names its inline namespace after CPU_CAPABILITY: a name of our own keeps these
// instantiations apart from the generic ones (and from libtorch's).
#define CPU_CAPABILITY mhgd_avx2
#define MHGD_CPU_CAPABILITY avx2
#include "graph_kl_rows_impl.h"
#endif
