// Raw-array file I/O of the simulator drivers (tests/simt/*_sim.cpp): inputs and outputs are
// row-major arrays of the tested dtype, written and read by tests/test_cuda_simulated.py.
#pragma once

#include <fstream>
#include <string>
#include <vector>

#include "simt_runtime.h"

namespace simt {

template <typename T>
std::vector<T> read_array(const std::string& path, std::size_t n) {
  std::vector<T> a(n);
  std::ifstream f(path, std::ios::binary);
  if (!f.read(reinterpret_cast<char*>(a.data()), static_cast<std::streamsize>(n * sizeof(T))))
    fail("short input file");
  return a;
}

template <typename T>
void write_array(const std::string& path, const std::vector<T>& a) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(a.data()), static_cast<std::streamsize>(a.size() * sizeof(T)));
  if (!out) fail("cannot write output");
}

}  // namespace simt
