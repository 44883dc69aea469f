#include "cpu_estimate.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>

#include "cpu_runners.h"
#include "op_checks.h"

namespace kvcomm {
namespace cpu {

SlotWeights estimate_slot(const char* op, const EstimateRequest& req, const SlotAnchors& a,
                          double tau) {
  const bool seg = req.seg_template_k.defined();
  // The checks the weight and offset ops would run, before anything is read.
  const auto s = checks::kv4(op, "base_k", req.base_k);
  checks::anchors(op, "anchor base_k", req.base_k, s, a.base_k);
  checks::anchors(op, "anchor base_v", req.base_v, s, a.base_v);
  checks::tau(op, tau);
  const at::Tensor shift = at::full({}, req.position, req.base_k.options().dtype(at::kLong));
  const int64_t n = static_cast<int64_t>(a.base_k.size());
  const auto f32 = req.base_k.options().dtype(at::kFloat);
  const at::Tensor token_shape = at::empty({n, s.tokens}, f32);
  const at::Tensor channel_shape = at::empty({n, s.layers, s.heads, s.dim}, f32);
  std::vector<OffsetJob> jobs;
  auto job = [&](const at::Tensor& dst, const at::Tensor& base, const std::vector<at::Tensor>& deltas,
                 const at::Tensor& like_weights, const at::Tensor& sh,
                 const c10::optional<at::Tensor>& inv_freq) {
    jobs.push_back(OffsetJob{dst, base, deltas, at::Tensor(), sh, inv_freq,
                             checks::offset(op, dst, base, deltas, like_weights, sh, inv_freq)});
  };
  job(req.dst_k, req.base_k, a.ph_k, token_shape, shift, req.inv_freq);
  job(req.dst_v, req.base_v, a.ph_v, token_shape, shift, c10::nullopt);
  if (seg) {
    const at::Tensor seg_shift = at::full({}, req.seg_position, shift.options());
    job(req.seg_dst_k, req.seg_template_k, a.seg_k, channel_shape, seg_shift, req.inv_freq);
    job(req.seg_dst_v, req.seg_template_v, a.seg_v, channel_shape, seg_shift, c10::nullopt);
  }
  // Pass 1: both weightings of K and of V from one read of the bases.
  std::vector<WeightsOut> w = compute_weights(
      {WeightsJob{req.base_k, a.base_k, true, seg}, WeightsJob{req.base_v, a.base_v, true, seg}}, tau);
  jobs[0].weights = w[0].token;
  jobs[1].weights = w[1].token;
  if (seg) {
    jobs[2].weights = w[0].segment;
    jobs[3].weights = w[1].segment;
  }
  // Pass 2: every delta once, all four destinations in one parallel region.
  apply_offsets(jobs);
  return {w[0].token, w[1].token};
}

}  // namespace cpu
}  // namespace kvcomm
