// Run-time choice between the AVX2+FMA and the portable variants of the CPU kernels.
#pragma once

#include <cstdlib>
#include <cstring>

namespace mhgd_fast {
namespace cpu {

// True when the CPU has AVX2 and FMA and MHGD_FAST_CPU_CAPABILITY=generic does not force the
// portable path. Only x86 with g++ compiles the AVX2 variants (a target pragma).
inline bool avx2_enabled() {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__clang__)
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

}  // namespace cpu
}  // namespace mhgd_fast
