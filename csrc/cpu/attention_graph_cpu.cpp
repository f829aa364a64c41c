// CPU kernels of mhgd_fast::attention_graph (docs/method.md §4). The q k^T products go through
// ATen's batched GEMM; the row pass (scale, tanh, softmax and its derivative) is parallel over
// the H*N rows.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "../mhgd_fast.h"

namespace mhgd_fast {
namespace {

// Rows per parallel task: enough work per task to amortise the scheduling.
int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1)); }

// In place: row <- squash(scale * row); returns the row maximum.
template <typename T>
T squash_row(T* row, int64_t cols, T scale, bool squash_tanh) {
  T mx = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < cols; ++j) {
    T v = scale * row[j];
    if (squash_tanh) v = std::tanh(v);
    row[j] = v;
    mx = std::max(mx, v);
  }
  return mx;
}

template <typename T>
void softmax_rows_forward(T* s, int64_t rows, int64_t cols, T scale, bool squash_tanh) {
  at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* row = s + r * cols;
      const T mx = squash_row(row, cols, scale, squash_tanh);
      T sum = 0;
      for (int64_t j = 0; j < cols; ++j) {
        row[j] = std::exp(row[j] - mx);
        sum += row[j];
      }
      const T inv = T(1) / sum;
      for (int64_t j = 0; j < cols; ++j) row[j] *= inv;
    }
  });
}

// s holds the raw q k^T products; on return it holds dL/d(q k^T):
// dZ_j = scale * P_j (dP_j - sum_l dP_l P_l) * (1 - t_j^2 if tanh), t = squash(scale * s).
template <typename T>
void softmax_rows_backward(T* s, const T* dp, int64_t rows, int64_t cols, T scale, bool squash_tanh) {
  at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
    std::vector<T> probs(cols);
    for (int64_t r = begin; r < end; ++r) {
      T* row = s + r * cols;
      const T* drow = dp + r * cols;
      const T mx = squash_row(row, cols, scale, squash_tanh);
      T sum = 0;
      for (int64_t j = 0; j < cols; ++j) {
        probs[j] = std::exp(row[j] - mx);
        sum += probs[j];
      }
      const T inv = T(1) / sum;
      T dot = 0;
      for (int64_t j = 0; j < cols; ++j) {
        probs[j] *= inv;
        dot += probs[j] * drow[j];
      }
      for (int64_t j = 0; j < cols; ++j) {
        const T chain = squash_tanh ? T(1) - row[j] * row[j] : T(1);
        row[j] = scale * probs[j] * (drow[j] - dot) * chain;
      }
    }
  });
}

at::Tensor attention_graph_cpu(const at::Tensor& q, const at::Tensor& k, bool squash_tanh, double scale) {
  return attention_forward_with(q, k, [&](at::Tensor& s) {
    AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "attention_graph_cpu", [&] {
      softmax_rows_forward<scalar_t>(s.data_ptr<scalar_t>(), s.size(0) * s.size(1), s.size(2),
                                     static_cast<scalar_t>(scale), squash_tanh);
    });
  });
}

std::tuple<at::Tensor, at::Tensor> attention_graph_backward_cpu(const at::Tensor& grad, const at::Tensor& q,
                                                                const at::Tensor& k, bool squash_tanh,
                                                                double scale) {
  return attention_backward_with(grad, q, k, [&](at::Tensor& s, const at::Tensor& dp) {
    AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "attention_graph_backward_cpu", [&] {
      softmax_rows_backward<scalar_t>(s.data_ptr<scalar_t>(), dp.data_ptr<scalar_t>(), s.size(0) * s.size(1),
                                      s.size(2), static_cast<scalar_t>(scale), squash_tanh);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(mhgd_fast, CPU, m) {
  m.impl("attention_graph", &attention_graph_cpu);
  m.impl("attention_graph_backward", &attention_graph_backward_cpu);
}

}  // namespace mhgd_fast
