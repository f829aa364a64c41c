// MHGD_HD marks the torch-free maths shared by the CPU kernels, the CUDA kernels and the host SIMT
// simulator (tests/simt): `__host__ __device__` under nvcc, a plain inline function elsewhere.
#pragma once

#if defined(__CUDACC__)
#define MHGD_HD __host__ __device__ __forceinline__
#else
#define MHGD_HD inline
#endif
