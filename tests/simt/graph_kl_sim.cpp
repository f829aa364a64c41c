// Runs the kernels of csrc/cuda/graph_kl_kernels.cuh in the host SIMT simulator, launched as
// graph_kl_cuda.cu launches them: the forward, then both gradient kernels with dL/dKL_i = row_grad.
// Driven by tests/test_cuda_simulated.py:
//   graph_kl_sim {f32|f64} H N M D SCALE SQUASH TEACHER_STUDENT IN_DIR OUT_DIR
// IN_DIR holds q_s k_s q_t k_t row_grad (.bin, raw arrays of the dtype); OUT_DIR receives
// kl stats_s stats_t (per row: max, log-sum) dq_s dk_s dq_t dk_t.
#include "simt_runtime.h"
#include "sim_io.h"

#include <graph_kl_kernels.cuh>

#include <fstream>
#include <string>
#include <vector>

namespace {

// In graph_kl_kernels.cuh's launch geometry, as graph_kl_cuda.cu launches.
template <typename T, typename Kernel, typename... Args>
void launch_per_warp(Kernel kernel, int64_t items, int64_t dim, int vectors, Args... args) {
  const auto geometry = mhgd_fast::cuda_kernels::graph_kl_launch(items, dim, sizeof(T), vectors);
  simt::launch(kernel, dim3(static_cast<unsigned>(geometry.grid)), dim3(geometry.block),
               static_cast<size_t>(geometry.shared_bytes), args...);
}

template <typename T>
int run(char** argv) {
  namespace k = mhgd_fast::cuda_kernels;
  const int64_t H = std::stol(argv[2]), N = std::stol(argv[3]), M = std::stol(argv[4]), D = std::stol(argv[5]);
  const std::string in = argv[9], out = argv[10];
  const auto q_s = simt::read_array<T>(in + "/q_s.bin", H * N * D), k_s = simt::read_array<T>(in + "/k_s.bin", H * M * D);
  const auto q_t = simt::read_array<T>(in + "/q_t.bin", H * N * D), k_t = simt::read_array<T>(in + "/k_t.bin", H * M * D);
  const auto row_grad = simt::read_array<T>(in + "/row_grad.bin", H * N);
  std::vector<T> kl(H * N), stats_s(2 * H * N), stats_t(2 * H * N), dq_s(H * N * D), dq_t(H * N * D),
      dk_s(H * M * D), dk_t(H * M * D);
  const k::GraphKLArgs<T> args{q_s.data(), k_s.data(), q_t.data(), k_t.data(), H, N, M, D,
                               static_cast<T>(std::stod(argv[6])), std::string(argv[7]) == "1",
                               std::string(argv[8]) == "1", kl.data(), stats_s.data(), stats_t.data(), row_grad.data(),
                               T(0)};
  launch_per_warp<T>(k::graph_kl_forward<T>, H * N, D, k::kForwardVectors, args);
  launch_per_warp<T>(k::graph_kl_backward_rows<T>, H * N, D, k::kBackwardVectors, args, dq_s.data(), dq_t.data());
  launch_per_warp<T>(k::graph_kl_backward_cols<T>, H * M, D, k::kBackwardVectors, args, dk_s.data(), dk_t.data());
  for (const auto& [name, array] : {std::pair{"kl", &kl}, {"stats_s", &stats_s}, {"stats_t", &stats_t}, {"dq_s", &dq_s},
                                    {"dk_s", &dk_s}, {"dq_t", &dq_t}, {"dk_t", &dk_t}})
    simt::write_array(out + "/" + name + ".bin", *array);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 11) simt::fail("usage: graph_kl_sim {f32|f64} H N M D SCALE SQUASH TEACHER_STUDENT IN_DIR OUT_DIR");
  return std::string(argv[1]) == "f64" ? run<double>(argv) : run<float>(argv);
}
