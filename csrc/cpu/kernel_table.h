// The CPU kernels that are compiled once per CPU capability, behind one table of function
// pointers (the model is ATen's DispatchStub): both kernel families, the graph-KL row math and
// the per-sample maths of topk_singular_vectors (Householder reduction, bisection, power steps,
// the gradient's low-rank product).
//
// Each capability is one translation unit that includes capability_kernels.h, which fills that
// capability's `table`: kernels_generic.cpp (the portable baseline, always) and kernels_avx2.cpp
// (x86-64 with g++: AVX2 + FMA through a target pragma). kernels() picks one table at first use
// (kernel_table.cpp); the ops call through it. MHGD_FAST_CPU_CAPABILITY=generic forces the
// portable table (tests/test_extension.py runs that path).
#pragma once

#include <cstdint>

#include "../tridiagonal.h"

// The one compile-time predicate: where the AVX2 table is built at all.
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__clang__)
#define MHGD_HAVE_AVX2 1
#endif

namespace mhgd_fast {
namespace cpu {

// The graph-KL row math (graph_kl_rows.h) and the low-rank product for one floating type.
template <typename T>
struct TypedKernels {
  void (*squash_rows)(T* s, T* t, int64_t rows, int64_t cols, T scale, bool squash_tanh);
  void (*kl_rows)(const T* s, const T* t, int64_t rows, int64_t cols, bool teacher_student, T* kl, T* stats_s,
                  T* stats_t, T* p_s, T* p_t);
  void (*kl_grad_rows)(T* s, T* t, int64_t rows, int64_t cols, bool squash_tanh, bool teacher_student, const T* kl,
                       const T* stats_s, const T* stats_t, const T* row_scale, bool want_s, bool want_t,
                       const T* p_s, const T* p_t);
  void (*low_rank_product)(const T* left, const T* right, int64_t c, int64_t r, int64_t hw, T* out);
};

struct KernelTable {
  const char* capability;  // "generic" or "avx2"
  TypedKernels<float> f32;
  TypedKernels<double> f64;
  // householder.h
  void (*tridiagonalize)(double* a, int64_t n, double* d, double* e, double* beta, double* p, double* w);
  void (*apply_q)(const double* a, const double* beta, int64_t n, double* x, int64_t count, bool from_q);
  // bisection_lanes.h: m ≤ 8 eigenvalues at once
  void (*bisect_lanes)(const double* d, const double* e2, int64_t n, const tridiagonal::Bounds& b, int64_t first,
                       int m, double* out);
  // power_iteration.h
  bool (*power_iteration)(const double* gram, int64_t n, double tol, int max_steps, double* v, double* w,
                          double* theta);

  template <typename T>
  const TypedKernels<T>& typed() const;
};

template <>
inline const TypedKernels<float>& KernelTable::typed<float>() const {
  return f32;
}
template <>
inline const TypedKernels<double>& KernelTable::typed<double>() const {
  return f64;
}

// One table per capability, each defined by its translation unit.
namespace generic {
extern const KernelTable table;
}
#ifdef MHGD_HAVE_AVX2
namespace avx2 {
extern const KernelTable table;
}
#endif

// True when the AVX2 table is built, the CPU has AVX2 and FMA, and MHGD_FAST_CPU_CAPABILITY=generic
// does not force the portable table. Evaluated once.
bool avx2_enabled();

// The table for this CPU, chosen once at first use.
const KernelTable& kernels();

}  // namespace cpu
}  // namespace mhgd_fast
