// Checks the simulator's own primitives (tests/test_cuda_simulated.py runs it):
//   simt_selftest                 -> prints "ok" or the first failed check, exit 1
//   simt_selftest partial_mask | divergent_shuffle | divergent_syncthreads
//                                 -> must abort with a message (misuse the simulator refuses)
#include "simt_runtime.h"

#include <string>

namespace {

int g_failures = 0;

void check(bool ok, const char* what) {
  if (!ok) {
    std::printf("FAILED: %s\n", what);
    ++g_failures;
  }
}

// out[block][thread] for 2-D blocks in a 2-D grid: every thread reports its own coordinates.
__global__ void indices_kernel(int* out) {
  const int t = threadIdx.x + blockDim.x * threadIdx.y;
  const int b = blockIdx.x + gridDim.x * blockIdx.y;
  out[b * blockDim.x * blockDim.y + t] = 1000 * b + t;
}

// One warp: each shuffle flavour, the width argument, and the votes.
__global__ void __launch_bounds__(32) shuffle_kernel(int* out) {
  const int lane = threadIdx.x;
  out[0 * 32 + lane] = __shfl_sync(0xffffffffu, lane * 10, 3);
  out[1 * 32 + lane] = __shfl_xor_sync(0xffffffffu, lane, 5);
  out[2 * 32 + lane] = __shfl_down_sync(0xffffffffu, lane, 4, 8);
  out[3 * 32 + lane] = __shfl_up_sync(0xffffffffu, lane, 2);
  out[4 * 32 + lane] = static_cast<int>(__ballot_sync(0xffffffffu, lane % 3 == 0));
  out[5 * 32 + lane] = __all_sync(0xffffffffu, lane < 32) + 2 * __any_sync(0xffffffffu, lane == 7);
  __syncwarp();
}

// Block-wide sum through dynamic shared memory and a barrier, plus atomics across blocks.
template <typename T>
__global__ void smem_atomic_kernel(T* total, T* per_block) {
  MHGD_DYNAMIC_SHARED(T, buf);
  buf[threadIdx.x] = static_cast<T>(threadIdx.x + 1);
  __syncthreads();
  if (threadIdx.x == 0) {
    T sum = 0;
    for (unsigned i = 0; i < blockDim.x; ++i) sum += buf[i];
    per_block[blockIdx.x] = sum;
  }
  atomicAdd(total, static_cast<T>(0.5));
}

__global__ void partial_mask_kernel() { __shfl_xor_sync(0x0000ffffu, 1, 1); }
__global__ void divergent_shuffle_kernel() {
  if (threadIdx.x != 5) __shfl_xor_sync(0xffffffffu, 1, 1);
}
__global__ void divergent_syncthreads_kernel() {
  if (threadIdx.x < 32) __syncthreads();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 2) {
    const std::string misuse = argv[1];
    if (misuse == "partial_mask") simt::launch(partial_mask_kernel, 1, 32, 0);
    if (misuse == "divergent_shuffle") simt::launch(divergent_shuffle_kernel, 1, 64, 0);
    if (misuse == "divergent_syncthreads") simt::launch(divergent_syncthreads_kernel, 1, 64, 0);
    return 0;  // not reached when the simulator refuses the misuse
  }

  std::vector<int> idx(6 * 24, -1);
  simt::launch(indices_kernel, dim3(3, 2), dim3(8, 3), 0, idx.data());
  bool ok = true;
  for (int b = 0; b < 6; ++b)
    for (int t = 0; t < 24; ++t) ok &= idx[b * 24 + t] == 1000 * b + t;
  check(ok, "threadIdx/blockIdx of 2-D blocks and grids");

  std::vector<int> sh(6 * 32);
  simt::launch(shuffle_kernel, 1, 32, 0, sh.data());
  unsigned ballot = 0;
  for (int l = 0; l < 32; l += 3) ballot |= 1u << l;
  ok = true;
  for (int l = 0; l < 32; ++l) {
    ok &= sh[l] == 30 && sh[32 + l] == (l ^ 5) && sh[96 + l] == (l >= 2 ? l - 2 : l);
    ok &= sh[64 + l] == ((l % 8) + 4 < 8 ? l + 4 : l);
    ok &= static_cast<unsigned>(sh[128 + l]) == ballot && sh[160 + l] == 3;
  }
  check(ok, "__shfl_sync/_xor/_down(width 8)/_up, __ballot_sync, __all_sync, __any_sync");

  double total = 0;
  std::vector<double> per_block(4);
  simt::launch(smem_atomic_kernel<double>, 4, 96, 96 * sizeof(double), &total, per_block.data());
  ok = total == 4 * 96 * 0.5;
  for (double s : per_block) ok &= s == 96.0 * 97 / 2;
  check(ok, "dynamic shared memory, __syncthreads, atomicAdd(double)");

  float total_f = 0;
  std::vector<float> per_block_f(2);
  simt::launch(smem_atomic_kernel<float>, 2, 64, 64 * sizeof(float), &total_f, per_block_f.data());
  check(total_f == 64.0f && per_block_f[1] == 64.0f * 65 / 2, "atomicAdd(float)");

  if (g_failures == 0) std::printf("ok\n");
  return g_failures == 0 ? 0 : 1;
}
