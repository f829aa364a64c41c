// Fused graph-KL loss on the CPU (docs/method.md §7): the [H, N, M] graphs are never stored
// (except small ones, up to kWholeGraphBytes, which are made whole to save GEMM calls).
// Work is split over (head, chunk of rows); each task streams blocks of rows whose logit strips
// ([rows, M], student and teacher) fit in cache: two GEMMs make the strips, the row math
// (graph_kl_rows.h through kernel_table.h, AVX2 or generic) reduces them, and two GEMMs per side turn the logit
// gradients into dq and dk. Extra memory: O(H*N) row statistics plus per-task strips, plus a
// dk accumulator per row chunk when there are more threads than heads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <tuple>
#include <vector>

#include "../mhgd_fast.h"
#include "../graph_kl_host.h"
#include "kernel_table.h"

namespace mhgd_fast {
namespace {

// The row math of this CPU's kernel table (kernel_table.h: AVX2 or generic).
template <typename T>
const cpu::TypedKernels<T>& rows_kernels() {
  return cpu::kernels().typed<T>();
}

// Rows per block: the two [rows, M] strips take about 2 MiB each (cache resident, large enough
// GEMMs), 8 to 256 rows (so more than 2 MiB once M exceeds 64 Ki floats).
int64_t rows_per_block(int64_t cols, int64_t elem_size) {
  return std::clamp<int64_t>((int64_t{2} << 20) / std::max<int64_t>(cols * elem_size, 1), 8, 256);
}

// What a pass computes. compute_stats: writes kl and the row statistics stats_s/stats_t ([H, N, 2]:
// max, log-sum per row) (forward), else reads them (backward). grads.any(): also the gradients,
// with dL/dKL_i = row_grad[i] (or grad_scalar for every row when row_grad is null).
template <typename T>
struct Pass {
  bool compute_stats;
  T* kl;
  T* stats_s;
  T* stats_t;
  const T* row_grad;
  T grad_scalar;
};

// Scratch of one task: row scales, and the rows' probabilities that a forward with gradients
// hands from the statistics to the gradient (two fewer exponentials per element).
template <typename T>
struct RowScratch {
  std::vector<T> row_scale, p_s, p_t;
  RowScratch(int64_t rows, int64_t cols, bool keep_probs)
      : row_scale(rows), p_s(keep_probs ? rows * cols : 0), p_t(keep_probs ? rows * cols : 0) {}
};

// The row math on `rows` raw logit rows starting at graph row `off` (= h*N + i): squash, the row
// statistics and, when gradients are wanted, dL/d(q k^T) in place.
template <typename T>
void process_rows(const GraphKL& p, const Pass<T>& pass, const Grads& g, T* sp, T* tp, int64_t rows, int64_t off,
                  RowScratch<T>& scratch) {
  const int64_t M = p.cols();
  const T scale = static_cast<T>(p.scale);
  T* p_s = scratch.p_s.empty() ? nullptr : scratch.p_s.data();
  T* p_t = scratch.p_t.empty() ? nullptr : scratch.p_t.data();
  const cpu::TypedKernels<T>& k = rows_kernels<T>();
  k.squash_rows(sp, tp, rows, M, scale, p.squash_tanh);
  if (pass.compute_stats)
    k.kl_rows(sp, tp, rows, M, p.teacher_student, pass.kl + off, pass.stats_s + 2 * off, pass.stats_t + 2 * off,
               p_s, p_t);
  if (!g.any()) return;
  T* row_scale = scratch.row_scale.data();
  for (int64_t i = 0; i < rows; ++i) row_scale[i] = (pass.row_grad ? pass.row_grad[off + i] : pass.grad_scalar) * scale;
  k.kl_grad_rows(sp, tp, rows, M, p.squash_tanh, p.teacher_student, pass.kl + off, pass.stats_s + 2 * off,
                  pass.stats_t + 2 * off, row_scale, g.student(), g.teacher(), p_s, p_t);
}

// Graphs whose two [H, N, M] logit tensors fit in this many bytes are made whole: one batched
// GEMM per product instead of one call per head and row block (small batches are call-bound).
constexpr int64_t kWholeGraphBytes = int64_t{4} << 20;

template <typename T>
void whole_graph_pass(const GraphKL& p, const Pass<T>& pass, Grads& g) {
  const int64_t M = p.cols();
  at::Tensor s = at::bmm(p.q_s, p.k_s.transpose(1, 2)), t = at::bmm(p.q_t, p.k_t.transpose(1, 2));
  T* sp = s.data_ptr<T>();
  T* tp = t.data_ptr<T>();
  at::parallel_for(0, p.heads() * p.rows(), std::max<int64_t>(1, 16384 / M), [&](int64_t begin, int64_t end) {
    RowScratch<T> scratch(end - begin, M, pass.compute_stats && g.any());
    process_rows(p, pass, g, sp + begin * M, tp + begin * M, end - begin, begin, scratch);
  });
  if (g.q_s) at::bmm_out(g.dq_s, s, p.k_s);
  if (g.k_s) at::bmm_out(g.dk_s, s.transpose(1, 2), p.q_s);
  if (g.q_t) at::bmm_out(g.dq_t, t, p.k_t);
  if (g.k_t) at::bmm_out(g.dk_t, t.transpose(1, 2), p.q_t);
}

// One streamed pass over every graph row: tasks of (head, chunk of row blocks); per block two
// GEMMs make the logit strips, the row math reduces them, two GEMMs per side give dq and dk.
template <typename T>
void streamed_pass(const GraphKL& p, const Pass<T>& pass, Grads& g) {
  const int64_t H = p.heads(), N = p.rows(), M = p.cols();
  const int64_t block = rows_per_block(M, sizeof(T));
  const int64_t blocks = (N + block - 1) / block;
  // Enough (head, row chunk) tasks for every thread; each chunk beyond the first per head
  // accumulates dk apart, summed at the end.
  const int64_t chunks =
      g.any() ? std::min(blocks, std::max<int64_t>(1, (at::get_num_threads() + H - 1) / H)) : blocks;
  const int64_t blocks_per_chunk = (blocks + chunks - 1) / chunks;
  at::Tensor dk_s_parts, dk_t_parts;
  if (chunks > 1 && g.k_s) dk_s_parts = at::zeros({chunks, H, M, p.k_s.size(2)}, p.k_s.options());
  if (chunks > 1 && g.k_t) dk_t_parts = at::zeros({chunks, H, M, p.k_t.size(2)}, p.k_t.options());

  at::parallel_for(0, H * chunks, 1, [&](int64_t begin, int64_t end) {
    at::Tensor strip_s = at::empty({block, M}, p.q_s.options());
    at::Tensor strip_t = at::empty({block, M}, p.q_s.options());
    RowScratch<T> scratch(block, M, pass.compute_stats && g.any());
    for (int64_t task = begin; task < end; ++task) {
      const int64_t h = task / chunks, chunk = task % chunks;
      const at::Tensor qs = p.q_s[h], ks = p.k_s[h], qt = p.q_t[h], kt = p.k_t[h];
      auto dk_target = [&](bool wanted, const at::Tensor& parts, const at::Tensor& dk) {
        return !wanted ? at::Tensor() : parts.defined() ? parts[chunk][h] : dk[h];
      };
      at::Tensor dk_s = dk_target(g.k_s, dk_s_parts, g.dk_s), dk_t = dk_target(g.k_t, dk_t_parts, g.dk_t);
      const int64_t first = chunk * blocks_per_chunk, last = std::min(blocks, first + blocks_per_chunk);
      for (int64_t b = first; b < last; ++b) {
        const int64_t r0 = b * block, rows = std::min(block, N - r0);
        at::Tensor s = strip_s.narrow(0, 0, rows), t = strip_t.narrow(0, 0, rows);
        at::mm_out(s, qs.narrow(0, r0, rows), ks.t());
        at::mm_out(t, qt.narrow(0, r0, rows), kt.t());
        process_rows(p, pass, g, s.data_ptr<T>(), t.data_ptr<T>(), rows, h * N + r0, scratch);
        // dq[rows] = dZ k ; dk += dZ^T q[rows]
        if (g.q_s) {
          at::Tensor dq = g.dq_s[h].narrow(0, r0, rows);
          at::mm_out(dq, s, ks);
        }
        if (g.k_s) dk_s.addmm_(s.t(), qs.narrow(0, r0, rows));
        if (g.q_t) {
          at::Tensor dq = g.dq_t[h].narrow(0, r0, rows);
          at::mm_out(dq, t, kt);
        }
        if (g.k_t) dk_t.addmm_(t.t(), qt.narrow(0, r0, rows));
      }
    }
  });
  if (dk_s_parts.defined()) g.dk_s.copy_(dk_s_parts.sum(0));
  if (dk_t_parts.defined()) g.dk_t.copy_(dk_t_parts.sum(0));
}

template <typename T>
void sweep(const GraphKL& p, bool compute_stats, T* kl, T* stats_s, T* stats_t, const T* row_grad, T grad_scalar,
           Grads& g) {
  if (p.heads() == 0 || p.rows() == 0) return;
  const Pass<T> pass{compute_stats, kl, stats_s, stats_t, row_grad, grad_scalar};
  if (2 * p.heads() * p.rows() * p.cols() * static_cast<int64_t>(sizeof(T)) <= kWholeGraphBytes)
    whole_graph_pass(p, pass, g);
  else
    streamed_pass(p, pass, g);
}

// The CPU's pass for graph_kl_host.h's op entry points.
struct CpuPass {
  struct Guard {
    explicit Guard(const at::Tensor&) {}
  };
  static constexpr const char* kName = "graph_kl_cpu";
  template <typename T>
  static void run(const GraphKL& p, bool forward, at::Tensor& kl, at::Tensor& stats_s, at::Tensor& stats_t,
                  const at::Tensor& row_grad, T grad_scalar, Grads& g) {
    sweep<T>(p, forward, kl.data_ptr<T>(), stats_s.data_ptr<T>(), stats_t.data_ptr<T>(),
             row_grad.defined() ? row_grad.data_ptr<T>() : nullptr, grad_scalar, g);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(mhgd_fast, CPU, m) { register_graph_kl<CpuPass>(m); }

}  // namespace mhgd_fast
