// Host SIMT simulator: runs CUDA kernel headers (csrc/cuda/*.cuh) unchanged on the CPU with g++
// -std=c++20 -pthread (docs/design.md §4). Include it before the kernel header.
//
// Model: every thread of a block is an OS thread; blocks run one after another, so `__shared__`
// is `static` storage (one copy per function or template instance, reused by each block in turn).
// `__syncthreads()` and each warp's shuffles are barriers. A barrier that can never complete
// (divergent `__syncthreads`, a shuffle that not all 32 lanes reach) aborts with a message
// instead of hanging. SIMT_JITTER_US=n makes each thread sleep up to n µs before every barrier,
// so that missing barriers show up as wrong results.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <random>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) alignas(n)
#define __launch_bounds__(...)
// Dynamic shared memory: `extern static` is not C++, so kernels declare it through this macro
// (nvcc spelling in tests/simt/README.md).
#define MHGD_DYNAMIC_SHARED(T, name) T* name = ::simt::dynamic_shared<T>()

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;
constexpr int warpSize = 32;

namespace simt {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "simt: %s\n", what);
  std::fflush(stderr);
  std::abort();
}

// One barrier: `expected` threads arrive, then all go on. Guarded by Block::mutex.
struct SyncPoint {
  int expected = 0;
  int arrived = 0;
  std::uint64_t generation = 0;
  std::condition_variable released;
};

// State of the block being run. Every barrier shares one mutex, so the block can tell when all
// live threads wait and none can release the others (a deadlock on a GPU).
struct Block {
  std::mutex mutex;
  int alive = 0;
  int blocked = 0;
  SyncPoint block_barrier;
  std::vector<SyncPoint> warp_barriers;
  std::vector<std::uint64_t> warp_slots;  // 32 exchange slots per warp
  std::vector<unsigned char> dynamic_smem;
  unsigned jitter_us = 0;
};

inline Block* g_block = nullptr;
inline thread_local std::minstd_rand t_rng;

inline int linear_thread_id() {
  return static_cast<int>(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z));
}

inline void jitter() {
  if (g_block->jitter_us) std::this_thread::sleep_for(std::chrono::microseconds(t_rng() % g_block->jitter_us));
}

inline void arrive_and_wait(SyncPoint& point, const char* what) {
  jitter();
  Block& b = *g_block;
  std::unique_lock lock(b.mutex);
  if (++point.arrived == point.expected) {
    point.arrived = 0;
    ++point.generation;
    b.blocked -= point.expected - 1;
    point.released.notify_all();
    return;
  }
  if (++b.blocked == b.alive) {
    std::fprintf(stderr, "simt: deadlock at %s (block %u, thread %d): the other threads never reach it\n", what,
                 blockIdx.x, linear_thread_id());
    fail("divergent barrier or warp operation");
  }
  const std::uint64_t generation = point.generation;
  point.released.wait(lock, [&] { return point.generation != generation; });
}

inline void thread_exit() {
  Block& b = *g_block;
  std::lock_guard lock(b.mutex);
  if (--b.alive > 0 && b.blocked == b.alive) fail("deadlock: threads wait at a barrier that exited threads skipped");
}

// Warp-wide exchange: each lane publishes `v`, then reads lane src(lane)'s value.
template <typename T, typename Src>
T warp_exchange(unsigned mask, T v, Src src, const char* what) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= sizeof(std::uint64_t));
  if (mask != 0xffffffffu) fail("warp operation with a partial mask: kernels must use full-mask warp operations");
  const int tid = linear_thread_id(), lane = tid & 31, warp = tid >> 5;
  Block& b = *g_block;
  if (b.warp_barriers[warp].expected != 32) fail("full-mask warp operation in an incomplete warp");
  std::uint64_t* slots = &b.warp_slots[32 * warp];
  std::memcpy(&slots[lane], &v, sizeof(T));
  arrive_and_wait(b.warp_barriers[warp], what);
  T out;
  std::memcpy(&out, &slots[src(lane)], sizeof(T));
  arrive_and_wait(b.warp_barriers[warp], what);
  return out;
}

template <typename T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(g_block->dynamic_smem.data());
}

// Runs kernel<<<grid, block, dynamic_smem_bytes>>>(args...) to completion.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t dynamic_smem_bytes, Args... args) {
  const int threads = static_cast<int>(block.x * block.y * block.z);
  if (threads < 1 || threads > 1024) fail("block size must be 1..1024 threads");
  const char* jitter_env = std::getenv("SIMT_JITTER_US");
  gridDim = grid;
  blockDim = block;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block b;
        b.alive = threads;
        b.block_barrier.expected = threads;
        b.warp_barriers = std::vector<SyncPoint>((threads + 31) / 32);
        for (int w = 0; w < static_cast<int>(b.warp_barriers.size()); ++w)
          b.warp_barriers[w].expected = std::min(32, threads - 32 * w);
        b.warp_slots.assign(32 * b.warp_barriers.size(), 0);
        b.dynamic_smem.assign(dynamic_smem_bytes, 0);  // operator new aligns it to 16 bytes, as on the GPU
        b.jitter_us = jitter_env ? static_cast<unsigned>(std::atoi(jitter_env)) : 0;
        g_block = &b;
        std::vector<std::jthread> pool;
        pool.reserve(threads);
        for (int t = 0; t < threads; ++t)
          pool.emplace_back([&, t] {
            threadIdx = uint3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
            blockIdx = uint3(bx, by, bz);
            t_rng.seed(1 + t + threads * (bx + grid.x * (by + grid.y * bz)));
            kernel(args...);
            thread_exit();
          });
        pool.clear();  // joins
        g_block = nullptr;
      }
}

}  // namespace simt

inline void __syncthreads() { simt::arrive_and_wait(simt::g_block->block_barrier, "__syncthreads"); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  simt::warp_exchange(mask, 0, [](int lane) { return lane; }, "__syncwarp");
}

template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  return simt::warp_exchange(mask, v, [=](int lane) { return (lane & ~(width - 1)) + (src_lane & (width - 1)); },
                             "__shfl_sync");
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  // Lanes reading beyond their width-group keep their own value.
  return simt::warp_exchange(mask, v, [=](int lane) {
    const int src = lane ^ lane_mask;
    return src < ((lane & ~(width - 1)) + width) ? src : lane;
  }, "__shfl_xor_sync");
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return simt::warp_exchange(mask, v, [=](int lane) {
    const int src = lane + static_cast<int>(delta);
    return src < ((lane & ~(width - 1)) + width) ? src : lane;
  }, "__shfl_down_sync");
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return simt::warp_exchange(mask, v, [=](int lane) {
    const int src = lane - static_cast<int>(delta);
    return src >= (lane & ~(width - 1)) ? src : lane;
  }, "__shfl_up_sync");
}

inline unsigned __ballot_sync(unsigned mask, int predicate) {
  unsigned ballot = 0;
  for (int src = 0; src < 32; ++src)
    ballot |= (simt::warp_exchange(mask, predicate ? 1u : 0u, [=](int) { return src; }, "__ballot_sync")) << src;
  return ballot;
}
inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }
inline int __all_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) == 0xffffffffu; }

template <typename T>
T atomicAdd(T* address, T v) {
  return std::atomic_ref<T>(*address).fetch_add(v);
}

inline float __fdividef(float a, float b) { return a / b; }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
