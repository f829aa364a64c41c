// The kernels' size limits, defined once. Torch-free: the CUDA kernels, their host glue and the
// SIMT simulator include it, and the extension hands the values to Python (mhgd_fast._C.limits(),
// read by mhgd_fast/ops.py), so no limit is written twice.
#pragma once

#include <cstdint>

namespace mhgd_fast {
namespace limits {

// CUDA topk_singular_vectors: the largest k (the solve keeps two flags per column in shared
// memory) and the largest Gram size n = min(C, HW) (one block per sample). The Python op sends
// larger cases to the reference; the CPU kernels have no such limits.
constexpr int64_t kCudaTopkMaxK = 8;
constexpr int64_t kCudaTopkMaxN = 2048;

}  // namespace limits
}  // namespace mhgd_fast
