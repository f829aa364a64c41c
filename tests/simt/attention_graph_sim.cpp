// Runs the row kernels of csrc/cuda/attention_graph_kernels.cuh in the host SIMT simulator, launched
// as attention_graph_cuda.cu launches them. Driven by tests/test_cuda_simulated.py:
//   attention_graph_sim {f32|f64} {forward|backward} ROWS COLS SCALE SQUASH S_FILE [DP_FILE] OUT_FILE
// Files hold raw row-major arrays of the chosen dtype; S holds the raw logits q k^T.
#include "simt_runtime.h"
#include "sim_io.h"

#include <attention_graph_kernels.cuh>

#include <fstream>
#include <string>

namespace {

template <typename T>
int run(int argc, char** argv) {
  namespace k = mhgd_fast::cuda_kernels;
  const bool forward = std::string(argv[2]) == "forward";
  if (argc != (forward ? 9 : 10)) simt::fail("wrong number of arguments");
  const long rows = std::stol(argv[3]), cols = std::stol(argv[4]);
  const T scale = static_cast<T>(std::stod(argv[5]));
  const bool squash_tanh = std::string(argv[6]) == "1";
  std::vector<T> s = simt::read_array<T>(argv[7], rows * cols);
  const auto geometry = k::attention_row_launch(rows, cols);
  const dim3 grid(static_cast<unsigned>(geometry.grid)), block(geometry.block);
  if (forward) {
    simt::launch(k::attention_softmax_forward<T>, grid, block, static_cast<size_t>(geometry.shared_bytes), s.data(),
                 int64_t{cols}, scale, squash_tanh);
  } else {
    const std::vector<T> dp = simt::read_array<T>(argv[8], rows * cols);
    simt::launch(k::attention_softmax_backward<T>, grid, block, static_cast<size_t>(geometry.shared_bytes), s.data(),
                 dp.data(), int64_t{cols}, scale, squash_tanh);
  }
  std::ofstream out(argv[argc - 1], std::ios::binary);
  out.write(reinterpret_cast<const char*>(s.data()), static_cast<std::streamsize>(s.size() * sizeof(T)));
  return out ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 9) simt::fail("usage: attention_graph_sim {f32|f64} {forward|backward} ROWS COLS SCALE SQUASH S [DP] OUT");
  return std::string(argv[1]) == "f64" ? run<double>(argc, argv) : run<float>(argc, argv);
}
