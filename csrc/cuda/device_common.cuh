// Device helpers shared by the kernel headers: math overloads, warp and block reductions, and
// dynamic shared memory. No torch includes (docs/design.md §4); the host SIMT simulator
// (tests/simt) compiles this file too. Kernel headers include it with angle brackets so that the
// simulator's planted-bug tests can shadow it.
#pragma once

#include <cstdint>

#ifndef MHGD_DYNAMIC_SHARED  // tests/simt/simt_runtime.h defines its own
#define MHGD_DYNAMIC_SHARED(T, name) \
  extern __shared__ __align__(16) unsigned char name##_bytes[];  \
  T* name = reinterpret_cast<T*>(name##_bytes)
#endif

namespace mhgd_fast {
namespace cuda_kernels {

constexpr unsigned kFullMask = 0xffffffffu;

// How a kernel is launched: blocks, threads per block, dynamic shared memory. Each kernel header
// computes its kernels' geometry in one function that the CUDA glue (csrc/cuda/*.cu) and the
// simulator's drivers (tests/simt/*_sim.cpp) both call.
struct LaunchGeometry {
  int64_t grid;
  int block;
  int64_t shared_bytes;
};

__device__ __forceinline__ float dev_exp(float x) { return expf(x); }
__device__ __forceinline__ double dev_exp(double x) { return exp(x); }
__device__ __forceinline__ float dev_tanh(float x) { return tanhf(x); }
__device__ __forceinline__ double dev_tanh(double x) { return tanh(x); }
__device__ __forceinline__ float dev_log(float x) { return logf(x); }
__device__ __forceinline__ double dev_log(double x) { return log(x); }

template <typename T>
__device__ __forceinline__ T neg_infinity() {
  return -static_cast<T>(INFINITY);
}

struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a > b ? a : b; }
};
struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};

template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
  for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

// Reduces v over the block; every thread gets the result. `scratch` holds 32 values and is free
// again on return.
template <typename T, typename Op>
__device__ T block_reduce(T v, Op op, T identity, T* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warps = (blockDim.x + 31) >> 5;
  v = warp_reduce(v, op);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    T w = lane < warps ? scratch[lane] : identity;
    w = warp_reduce(w, op);
    if (lane == 0) scratch[0] = w;
  }
  __syncthreads();
  const T result = scratch[0];
  __syncthreads();
  return result;
}

}  // namespace cuda_kernels
}  // namespace mhgd_fast
