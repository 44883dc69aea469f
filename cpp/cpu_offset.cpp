// CPU fused offset and RoPE move (docs/method.md, "Keys move exactly" and "Estimating the offset"). A RoPE
// move is the fused offset with no deltas, so both ops share one kernel.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "cpu_kernels.h"
#include "cpu_ops.h"
#include "cpu_runners.h"
#include "cpu_views.h"
#include "kvcomm/math.h"
#include "op_checks.h"

namespace kvcomm {
namespace cpu {
namespace {

// Rows of tokens one offset task covers: its running sums (TB x D floats)
// stay in the L1 cache while the deltas stream through them.
int64_t token_block(int64_t dim) {
  // Floats: 32 KB of running sums, the L1 cache of the machine measured; a
  // delta is then read in runs of 16 KB (bf16, D=128) or more.
  constexpr int64_t kBudget = 8192;
  return std::clamp<int64_t>(kBudget / std::max<int64_t>(dim, 1), 1, 64);
}

// cos/sin of shift * inv_freq, [rows, D/2] with rows = 1 (one shift) or T.
void rope_tables(const checks::OffsetPlan& plan, const at::Tensor& shift,
                 const at::Tensor& inv_freq, std::vector<float>& cos_t,
                 std::vector<float>& sin_t) {
  const int64_t half = plan.shape.dim / 2;
  const int64_t rows = plan.per_token_shift ? plan.shape.tokens : 1;
  const at::Tensor s = shift.reshape({-1}).contiguous();
  const at::Tensor f = inv_freq.contiguous();
  const int64_t* sp = s.const_data_ptr<int64_t>();
  const float* fp = f.const_data_ptr<float>();
  cos_t.resize(rows * half);
  sin_t.resize(rows * half);
  at::parallel_for(0, rows, grain(half * 16), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t i = 0; i < half; ++i)
        math::sin_cos(math::rope_angle(sp[r], fp[i]), &sin_t[r * half + i], &cos_t[r * half + i]);
    }
  });
}

// A new output like `like`. A KV tensor of an 8B model is hundreds of MB, which
// the allocator maps fresh on every call; touched 4 KB page by page, the page
// faults cost more than the kernel itself (rope_move of 134 MB of bf16: 55 ms
// against 15 ms into an existing buffer). Asking for transparent huge pages
// (where the system leaves them to madvise) makes that 512 times fewer faults.
at::Tensor new_output(const at::Tensor& like) {
  at::Tensor out = at::empty_like(like, at::MemoryFormat::Contiguous);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const auto start = reinterpret_cast<uintptr_t>(out.mutable_data_ptr());
  const uintptr_t first = (start + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (start + out.nbytes()) & ~(kHuge - 1);
  // Advice only: a failure (no THP in this kernel) changes nothing.
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
  return out;
}

at::Tensor no_weights(const at::Tensor& keys) {
  return at::empty({0, keys.dim() == 4 ? keys.size(2) : 0}, keys.options().dtype(at::kFloat));
}

void run_offset(const char* op, const at::Tensor& dst, const at::Tensor& base,
                at::TensorList deltas, const at::Tensor& weights, const at::Tensor& shift,
                const c10::optional<at::Tensor>& inv_freq,
                const c10::optional<at::TensorList>& delta_scales) {
  const checks::OffsetPlan plan =
      checks::offset(op, dst, base, deltas, weights, shift, inv_freq, delta_scales);
  OffsetJob job{dst, base, deltas.vec(), weights, shift, inv_freq, plan};
  if (plan.codes != Codes::kPlain) {
    job.delta_scales = delta_scales->vec();
    job.delta_form = form_of(plan.codes);
  }
  apply_offsets({job});
}

}  // namespace

void apply_offsets(const std::vector<OffsetJob>& jobs) {
  const KernelTable& k = kernels();
  const size_t n_jobs = jobs.size();
  std::vector<OffsetPlan> plans(n_jobs);
  std::vector<std::vector<RowsIn>> delta_rows(n_jobs);
  std::vector<std::vector<float>> cos_t(n_jobs), sin_t(n_jobs);
  std::vector<at::Tensor> weights(n_jobs), staging(n_jobs);
  std::vector<int64_t> first_task(n_jobs + 1, 0);
  Inputs in;
  int64_t work_per_task = 1;
  for (size_t j = 0; j < n_jobs; ++j) {
    const OffsetJob& job = jobs[j];
    const checks::OffsetPlan& cp = job.plan;
    // A destination with strided channels is written through a contiguous
    // staging tensor; every other layout (a KV-buffer slice) in place.
    const at::Tensor& out = unit_channels(job.dst)
                                ? job.dst
                                : (staging[j] = at::empty(job.dst.sizes(), job.dst.options()));
    if (cp.rotate) rope_tables(cp, job.shift, *job.inv_freq, cos_t[j], sin_t[j]);
    weights[j] = job.weights.contiguous();
    delta_rows[j] = in.rows(job.deltas, job.delta_scales);
    const Dims s{cp.shape.layers, cp.shape.heads, cp.shape.tokens, cp.shape.dim};
    plans[j] = OffsetPlan{kv_type(job.base, "kvcomm.fused_offset"), s, rows_out(out),
                          in.rows(job.base), delta_rows[j].data(), cp.num_deltas,
                          weights[j].const_data_ptr<float>(), cp.per_token_weights,
                          cp.rotate ? cos_t[j].data() : nullptr,
                          cp.rotate ? sin_t[j].data() : nullptr, cp.per_token_shift,
                          token_block(s.dim), job.delta_form};
    first_task[j + 1] = first_task[j] + plans[j].tasks();
    work_per_task = std::max<int64_t>(work_per_task, plans[j].token_block * s.dim * (cp.num_deltas + 2));
  }
  at::parallel_for(0, first_task.back(), grain(work_per_task), [&](int64_t begin, int64_t end) {
    for (size_t j = 0; j < n_jobs; ++j) {
      const int64_t lo = std::max(begin, first_task[j]), hi = std::min(end, first_task[j + 1]);
      if (lo < hi) k.offset(plans[j], lo - first_task[j], hi - first_task[j]);
    }
  });
  for (size_t j = 0; j < n_jobs; ++j) {
    if (staging[j].defined()) jobs[j].dst.copy_(staging[j]);
  }
}

void fused_offset_into(const at::Tensor& dst, const at::Tensor& base, at::TensorList deltas,
                       const at::Tensor& weights, const at::Tensor& shift,
                       const c10::optional<at::Tensor>& inv_freq,
                       const c10::optional<at::TensorList>& delta_scales) {
  run_offset("kvcomm.fused_offset_into", dst, base, deltas, weights, shift, inv_freq,
             delta_scales);
}

at::Tensor fused_offset(const at::Tensor& base, at::TensorList deltas, const at::Tensor& weights,
                        const at::Tensor& shift, const c10::optional<at::Tensor>& inv_freq,
                        const c10::optional<at::TensorList>& delta_scales) {
  checks::kv4("kvcomm.fused_offset", "base", base);
  at::Tensor out = new_output(base);
  run_offset("kvcomm.fused_offset", out, base, deltas, weights, shift, inv_freq, delta_scales);
  return out;
}

void rope_move_(const at::Tensor& keys, const at::Tensor& inv_freq, const at::Tensor& shift) {
  checks::kv4("kvcomm.rope_move_", "keys", keys);
  run_offset("kvcomm.rope_move_", keys, keys, {}, no_weights(keys), shift, inv_freq, c10::nullopt);
}

at::Tensor rope_move(const at::Tensor& keys, const at::Tensor& inv_freq, const at::Tensor& shift) {
  checks::kv4("kvcomm.rope_move", "keys", keys);
  at::Tensor out = new_output(keys);
  run_offset("kvcomm.rope_move", out, keys, {}, no_weights(keys), shift, inv_freq, c10::nullopt);
  return out;
}

}  // namespace cpu
}  // namespace kvcomm
