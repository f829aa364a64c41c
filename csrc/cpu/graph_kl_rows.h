// Row math of the fused graph-KL loss (MHGD_SPEC.md §7) on a block of graph rows held in
// cache: `s` and `t` are [rows, cols] row-major strips of the student's and the teacher's
// logits. Compiled twice (graph_kl_rows_avx2.cpp, graph_kl_rows_generic.cpp) into namespaces
// named after the CPU capability; graph_kl_cpu.cpp picks one at run time.
#pragma once

#include <cstdint>

#define MHGD_DECLARE_GRAPH_KL_ROWS(CAP)                                                              \
  namespace mhgd_fast::cpu::CAP {                                                                    \
  /* In place: x <- squash(scale * x) for both strips. */                                            \
  template <typename T>                                                                              \
  void squash_rows(T* s, T* t, int64_t rows, int64_t cols, T scale, bool squash_tanh);               \
  /* Per row of the squashed strips: the KL divergence of the direction and each side's row          \
     statistics stats_x[2 i] = max_j x_ij, stats_x[2 i + 1] = log sum_j exp(x_ij - max); with        \
     p_s/p_t (else null), also the rows' probabilities, for kl_grad_rows. */                         \
  template <typename T>                                                                              \
  void kl_rows(const T* s, const T* t, int64_t rows, int64_t cols, bool teacher_student, T* kl,      \
               T* stats_s, T* stats_t, T* p_s, T* p_t);                                              \
  /* In place: the squashed strips become dL/d(q k^T) of student (s) and teacher (t), given the      \
     row statistics and row_scale[i] = dL/dKL_i * scale. A strip not wanted is left as it is.        \
     p_s/p_t: kl_rows' probabilities, or null to recompute them from the statistics. */              \
  template <typename T>                                                                              \
  void kl_grad_rows(T* s, T* t, int64_t rows, int64_t cols, bool squash_tanh, bool teacher_student,  \
                    const T* kl, const T* stats_s, const T* stats_t, const T* row_scale,             \
                    bool want_s, bool want_t, const T* p_s, const T* p_t);                           \
  }

// The AVX2 variant needs x86-64 and g++'s target pragma; elsewhere only the generic one exists.
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__clang__)
#define MHGD_HAVE_AVX2_ROWS 1
MHGD_DECLARE_GRAPH_KL_ROWS(avx2)
#endif
MHGD_DECLARE_GRAPH_KL_ROWS(generic)
