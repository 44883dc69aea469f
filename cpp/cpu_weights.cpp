// CPU offset weights (docs/method.md, "Estimating the offset"): per-token weights for the
// placeholder's tokens and per-(layer, head, channel) weights for the segment
// after it. Both come out of one kernel pass (cpu_kernels_impl.h).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <vector>

#include "cpu_kernels.h"
#include "cpu_ops.h"
#include "cpu_runners.h"
#include "cpu_views.h"
#include "kvcomm/math.h"
#include "op_checks.h"

namespace kvcomm {
namespace cpu {

namespace {

// Anchor tokens per step of the weights kernel, all anchors per step: about
// 32 KB of each anchor per visit, so the hardware prefetcher streams long runs
// even with 20 anchors interleaved (16-token steps, 4 KB of a bf16 D=128 row,
// ran slower at 12 anchors), while the content rows of a step stay in L2.
int64_t weights_token_block(KVType type, StoreForm form, int64_t dim) {
  const int64_t value_bytes = form_has_scale(form)        ? 1
                              : form == StoreForm::kBf16   ? 2
                              : type == KVType::kFloat     ? 4
                                                           : 2;
  const int64_t row_bytes = std::max<int64_t>(1, dim) * value_bytes;
  return std::clamp<int64_t>((int64_t{32} << 10) / row_bytes, 16, 256);
}

// Token scores from the per-chunk partial sums (summed in chunk order, so
// the result does not depend on the thread count), then the softmax over
// anchors of each token: out [N, T].
void finish_token_weights(const std::vector<double>& partial, int64_t chunks, int64_t n,
                          const Dims& s, double tau, float* out) {
  const double count = static_cast<double>(s.rows() * s.dim);
  at::parallel_for(0, s.tokens, grain(n * chunks), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t u = 0; u < n; ++u) {
        double sum = 0;
        for (int64_t c = 0; c < chunks; ++c) sum += partial[(c * n + u) * s.tokens + t];
        out[u * s.tokens + t] = static_cast<float>(sum / count);
      }
      math::softmax_neg_over_tau_strided(out + t, n, s.tokens, static_cast<float>(tau));
    }
  });
}

}  // namespace

std::vector<WeightsOut> compute_weights(const std::vector<WeightsJob>& jobs, double tau) {
  const KernelTable& k = kernels();
  std::vector<WeightsOut> outs(jobs.size());
  std::vector<WeightsPlan> plans(jobs.size());
  std::vector<std::vector<RowsIn>> anchor_rows(jobs.size());
  std::vector<std::vector<int64_t>> anchor_tokens(jobs.size());
  std::vector<std::vector<double>> partials(jobs.size());
  std::vector<int64_t> first_task(jobs.size() + 1, 0);
  Inputs in;
  int64_t work_per_task = 1;
  for (size_t j = 0; j < jobs.size(); ++j) {
    const WeightsJob& job = jobs[j];
    const Dims s = dims_of(job.base);
    const int64_t n = static_cast<int64_t>(job.anchors.size());
    const auto opts = job.base.options().dtype(at::kFloat);
    if (job.token) outs[j].token = at::empty({n, s.tokens}, opts);
    if (job.segment) outs[j].segment = at::empty({n, s.layers, s.heads, s.dim}, opts);
    const int64_t chunks = n > 0 ? row_chunks(s.rows()) : 0;
    anchor_rows[j] = in.rows(job.anchors, job.anchor_scales);
    for (const auto& a : job.anchors) anchor_tokens[j].push_back(a.size(2));
    if (job.token) partials[j].assign(chunks * n * s.tokens, 0.0);
    const KVType type = kv_type(job.base, "kvcomm weights");
    plans[j] = WeightsPlan{type, s, in.rows(job.base),
                           anchor_rows[j].data(), anchor_tokens[j].data(), n, chunks,
                           job.token ? partials[j].data() : nullptr,
                           job.segment ? outs[j].segment.mutable_data_ptr<float>() : nullptr,
                           static_cast<float>(tau),
                           weights_token_block(type, job.anchor_form, s.dim), job.anchor_form};
    first_task[j + 1] = first_task[j] + chunks;
    if (chunks > 0)
      work_per_task = std::max<int64_t>(work_per_task, s.rows() * s.tokens * s.dim * (n + 1) / chunks);
  }
  at::parallel_for(0, first_task.back(), grain(work_per_task), [&](int64_t begin, int64_t end) {
    for (size_t j = 0; j < jobs.size(); ++j) {
      const int64_t lo = std::max(begin, first_task[j]), hi = std::min(end, first_task[j + 1]);
      if (lo < hi) k.weights(plans[j], lo - first_task[j], hi - first_task[j]);
    }
  });
  for (size_t j = 0; j < jobs.size(); ++j) {
    if (jobs[j].token && plans[j].num_anchors > 0)
      finish_token_weights(partials[j], plans[j].chunks, plans[j].num_anchors, plans[j].dims, tau,
                           outs[j].token.mutable_data_ptr<float>());
  }
  return outs;
}

namespace {

WeightsOut checked_weights(const char* op, const at::Tensor& base, at::TensorList anchors,
                           double tau, const c10::optional<at::TensorList>& anchor_scales,
                           bool token) {
  const auto s = checks::kv4(op, "base", base);
  const Codes codes = checks::anchor_codes(op, "anchors", base, s, anchors, anchor_scales);
  checks::tau(op, tau);
  WeightsJob job{base, anchors.vec(), token, !token};
  if (codes != Codes::kPlain) {
    job.anchor_scales = anchor_scales->vec();
    job.anchor_form = form_of(codes);
  }
  return compute_weights({job}, tau)[0];
}

}  // namespace

at::Tensor token_weights(const at::Tensor& base, at::TensorList anchors, double tau,
                         const c10::optional<at::TensorList>& anchor_scales) {
  return checked_weights("kvcomm.token_weights", base, anchors, tau, anchor_scales, true).token;
}

at::Tensor segment_weights(const at::Tensor& base, at::TensorList anchors, double tau,
                           const c10::optional<at::TensorList>& anchor_scales) {
  return checked_weights("kvcomm.segment_weights", base, anchors, tau, anchor_scales, false)
      .segment;
}

}  // namespace cpu
}  // namespace kvcomm
