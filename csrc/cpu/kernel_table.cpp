// The run-time choice of the CPU kernel table (kernel_table.h). Compiled for the baseline target.
#include "kernel_table.h"

#include <cstdlib>
#include <cstring>

namespace mhgd_fast {
namespace cpu {

bool avx2_enabled() {
#ifdef MHGD_HAVE_AVX2
  static const bool avx2 = [] {
    const char* forced = std::getenv("MHGD_FAST_CPU_CAPABILITY");
    if (forced != nullptr && std::strcmp(forced, "generic") == 0) return false;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return avx2;
#else
  return false;
#endif
}

const KernelTable& kernels() {
#ifdef MHGD_HAVE_AVX2
  static const KernelTable* const chosen = avx2_enabled() ? &avx2::table : &generic::table;
#else
  static const KernelTable* const chosen = &generic::table;
#endif
  return *chosen;
}

}  // namespace cpu
}  // namespace mhgd_fast
