// The kernel bodies of one CPU capability and its kernel table (kernel_table.h). Included once, by
// that capability's translation unit (kernels_generic.cpp, kernels_avx2.cpp), which first names the
// capability (MHGD_CPU_CAPABILITY, and at::vec's CPU_CAPABILITY) and sets its target.
#pragma once

#ifndef MHGD_CPU_CAPABILITY
#error "capability_kernels.h needs MHGD_CPU_CAPABILITY (include it from kernels_<capability>.cpp)"
#endif

#include "kernel_table.h"

#include "bisection_lanes.h"
#include "graph_kl_rows.h"
#include "householder.h"
#include "low_rank_product.h"
#include "power_iteration.h"

#define MHGD_STRINGIFY_(x) #x
#define MHGD_STRINGIFY(x) MHGD_STRINGIFY_(x)

namespace mhgd_fast::cpu::MHGD_CPU_CAPABILITY {

template <typename T>
constexpr TypedKernels<T> typed_kernels() {
  return {&squash_rows<T>, &kl_rows<T>, &kl_grad_rows<T>, &low_rank_product<T>};
}

extern const KernelTable table;
const KernelTable table = {MHGD_STRINGIFY(MHGD_CPU_CAPABILITY), typed_kernels<float>(), typed_kernels<double>(),
                           &tridiagonalize, &apply_q, &bisect_lanes, &power_iteration};

}  // namespace mhgd_fast::cpu::MHGD_CPU_CAPABILITY
