// Device code of mhgd_fast::attention_graph (docs/method.md §4). No torch includes: this header
// is compiled by nvcc through attention_graph_cuda.cu and stands alone (docs/design.md §4).
// One block per graph row; blockDim.x is a multiple of 32, at most 1024.
#pragma once

#include <cstdint>

#include <device_common.cuh>

namespace mhgd_fast {
namespace cuda_kernels {

// In place: row <- squash(scale * row) for this thread's columns; returns the block's row max.
template <typename T>
__device__ T squash_row(T* row, int64_t cols, T scale, bool squash_tanh, T* scratch) {
  T mx = neg_infinity<T>();
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    T v = scale * row[j];
    if (squash_tanh) v = dev_tanh(v);
    row[j] = v;
    mx = mx > v ? mx : v;
  }
  return block_reduce(mx, MaxOp(), neg_infinity<T>(), scratch);
}

// s: [rows, cols] raw q k^T products; on return softmax_j(squash(scale * s)).
template <typename T>
__global__ void attention_softmax_forward(T* __restrict__ s, int64_t cols, T scale, bool squash_tanh) {
  __shared__ T scratch[32];
  T* row = s + static_cast<int64_t>(blockIdx.x) * cols;
  const T mx = squash_row(row, cols, scale, squash_tanh, scratch);
  T sum = 0;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    const T e = dev_exp(row[j] - mx);
    row[j] = e;
    sum += e;
  }
  const T inv = T(1) / block_reduce(sum, SumOp(), T(0), scratch);
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) row[j] *= inv;
}

// s: raw q k^T products; dp: dL/dP. On return s holds dL/d(q k^T):
// scale * P_j (dP_j - sum_l dP_l P_l) * (1 - t_j^2 if tanh), t = squash(scale * s).
template <typename T>
__global__ void attention_softmax_backward(T* __restrict__ s, const T* __restrict__ dp, int64_t cols, T scale,
                                           bool squash_tanh) {
  __shared__ T scratch[32];
  const int64_t offset = static_cast<int64_t>(blockIdx.x) * cols;
  T* row = s + offset;
  const T* drow = dp + offset;
  const T mx = squash_row(row, cols, scale, squash_tanh, scratch);
  T sum = 0;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) sum += dev_exp(row[j] - mx);
  const T inv = T(1) / block_reduce(sum, SumOp(), T(0), scratch);
  T dot = 0;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) dot += dev_exp(row[j] - mx) * inv * drow[j];
  dot = block_reduce(dot, SumOp(), T(0), scratch);
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    const T t = row[j];
    const T chain = squash_tanh ? T(1) - t * t : T(1);
    row[j] = scale * dev_exp(t - mx) * inv * (drow[j] - dot) * chain;
  }
}

// Threads per row block: one warp per 32 columns, 32 to 256.
inline int row_block_threads(int64_t cols) {
  const int64_t warps = (cols + 31) / 32;
  return static_cast<int>(32 * (warps < 1 ? 1 : (warps > 8 ? 8 : warps)));
}

// Both row kernels: one block per graph row (`rows` = H*N), row_block_threads(cols) threads, no
// dynamic shared memory.
inline LaunchGeometry attention_row_launch(int64_t rows, int64_t cols) { return {rows, row_block_threads(cols), 0}; }

}  // namespace cuda_kernels
}  // namespace mhgd_fast
