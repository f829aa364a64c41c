// Runs the kernels of csrc/cuda/topk_singular_vectors_kernels.cuh in the host SIMT simulator,
// launched as topk_singular_vectors_cuda.cu launches them. Driven by tests/test_cuda_simulated.py:
//   topk_singular_vectors_sim decompose {f32|f64} B N KK IN_DIR OUT_DIR
//     IN_DIR/gram.bin [B, N, N] of the dtype -> OUT_DIR householder tridiagonal basis eigenvalues
//     (float64) and nonfinite (one int32)
//   topk_singular_vectors_sim solve B N KK PUSH_THROUGH IN_DIR OUT_DIR
//     IN_DIR: householder tridiagonal e eigenvalues rhs thresh null_floor [floor2] (float64)
//     -> OUT_DIR y (float64), exact (one byte per sample)
#include "simt_runtime.h"
#include "sim_io.h"

#include <topk_singular_vectors_kernels.cuh>

#include <algorithm>
#include <fstream>
#include <string>
#include <vector>

namespace {

namespace k = mhgd_fast::cuda_kernels;

template <typename T>
int decompose(int64_t batch, int64_t n, int64_t kk, const std::string& in, const std::string& out) {
  const int64_t nl = std::min(n, kk + 1);
  const auto gram = simt::read_array<T>(in + "/gram.bin", batch * n * n);
  std::vector<double> householder(batch * n * n), tridiagonal(batch * 3 * n), basis(batch * n * kk),
      eigenvalues(batch * nl), work(batch * k::topk_work_doubles(n, kk));
  std::vector<int> nonfinite(1, 0);
  const k::TopkDecomposeArgs<T> args{gram.data(),        n,           kk,          nl,
                                     householder.data(), tridiagonal.data(), basis.data(), eigenvalues.data(),
                                     work.data(),        nonfinite.data()};
  const k::LaunchGeometry geometry = k::topk_launch(batch, n);
  simt::launch(k::topk_decompose<T>, dim3(static_cast<unsigned>(geometry.grid)), dim3(geometry.block),
               static_cast<size_t>(geometry.shared_bytes), args);
  simt::write_array(out + "/householder.bin", householder);
  simt::write_array(out + "/tridiagonal.bin", tridiagonal);
  simt::write_array(out + "/basis.bin", basis);
  simt::write_array(out + "/eigenvalues.bin", eigenvalues);
  simt::write_array(out + "/nonfinite.bin", nonfinite);
  return 0;
}

int solve(int64_t batch, int64_t n, int64_t kk, bool push_through, const std::string& in, const std::string& out) {
  const int64_t nl = std::min(n, kk + 1);
  const auto householder = simt::read_array<double>(in + "/householder.bin", batch * n * n);
  const auto tridiagonal = simt::read_array<double>(in + "/tridiagonal.bin", batch * 3 * n);
  const auto e = simt::read_array<double>(in + "/e.bin", batch * n * kk);
  const auto eigenvalues = simt::read_array<double>(in + "/eigenvalues.bin", batch * nl);
  const auto rhs = simt::read_array<double>(in + "/rhs.bin", batch * n * kk);
  const auto thresh = simt::read_array<double>(in + "/thresh.bin", batch);
  const auto null_floor = simt::read_array<double>(in + "/null_floor.bin", batch);
  const auto floor2 = push_through ? simt::read_array<double>(in + "/floor2.bin", batch) : std::vector<double>();
  std::vector<double> y(batch * n * kk, 0.0), work(batch * k::topk_work_doubles(n, kk));
  bool* exact = new bool[batch]();
  const k::TopkSolveArgs args{householder.data(), tridiagonal.data(), e.data(), eigenvalues.data(), rhs.data(),
                              thresh.data(), null_floor.data(), push_through ? floor2.data() : nullptr, n, kk, nl,
                              y.data(), exact, work.data()};
  const k::LaunchGeometry geometry = k::topk_launch(batch, n);
  simt::launch(k::topk_complement_solve, dim3(static_cast<unsigned>(geometry.grid)), dim3(geometry.block),
               static_cast<size_t>(geometry.shared_bytes), args);
  simt::write_array(out + "/y.bin", y);
  std::vector<unsigned char> flags(exact, exact + batch);
  delete[] exact;
  simt::write_array(out + "/exact.bin", flags);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 8) simt::fail("usage: topk_singular_vectors_sim {decompose f32|f64|solve} ... (see the header)");
  const std::string mode = argv[1];
  const int64_t batch = std::stol(argv[3]), n = std::stol(argv[4]), kk = std::stol(argv[5]);
  if (mode == "decompose") {
    return std::string(argv[2]) == "f64" ? decompose<double>(batch, n, kk, argv[6], argv[7])
                                         : decompose<float>(batch, n, kk, argv[6], argv[7]);
  }
  // solve: argv[2] is PUSH_THROUGH (0/1); B N KK follow as for decompose.
  return solve(batch, n, kk, std::string(argv[2]) == "1", argv[6], argv[7]);
}
