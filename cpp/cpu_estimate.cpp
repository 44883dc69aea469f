#include "cpu_estimate.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>

#include "cpu_runners.h"
#include "op_checks.h"

namespace kvcomm {
namespace cpu {

namespace {

// The checks the ops run on their anchors (checks::anchor_codes), for the
// forms the ops take; bf16 anchors under another model dtype, a form only the
// pool hands the kernels, are checked here (the pool checked the layout when
// it stored them; this guards the kernels' reads).
void stored_anchors(const char* op, const char* arg, const at::Tensor& content,
                    const checks::KVShape& s, const std::vector<at::Tensor>& list,
                    const std::vector<at::Tensor>& scales, StoreForm form) {
  if (form != StoreForm::kBf16) {
    const Codes codes = checks::anchor_codes(
        op, arg, content, s, list,
        form_has_scale(form) ? c10::optional<at::TensorList>(scales) : c10::nullopt);
    TORCH_INTERNAL_ASSERT(list.empty() || form_of(codes) == form, op, ": ", arg,
                          " are not stored as the pool's storage says");
    return;
  }
  TORCH_INTERNAL_ASSERT(scales.empty(), op, ": ", arg, " with scales");
  for (size_t u = 0; u < list.size(); ++u) {
    const at::Tensor& t = list[u];
    TORCH_INTERNAL_ASSERT(t.dim() == 4 && t.scalar_type() == at::kBFloat16 &&
                              t.device() == content.device() && t.size(0) == s.layers &&
                              t.size(1) == s.heads && t.size(3) == s.dim && t.size(2) >= s.tokens &&
                              t.stride(3) == 1,
                          op, ": ", arg, "[", u, "] is not a bf16 anchor of this content");
  }
}

}  // namespace

at::Tensor stored_distances(const char* op, const at::Tensor& content_v,
                            const std::vector<at::Tensor>& values,
                            const std::vector<at::Tensor>& scales, StoreForm form, bool rms) {
  const auto s = checks::kv4(op, "content_v", content_v);
  stored_anchors(op, "anchor base_v", content_v, s, values, scales, form);
  return distances(content_v, values, scales, form, rms);
}

EstimateWeights estimate_slot(const char* op, const EstimateRequest& req, const SlotAnchors& a,
                              double tau, const EstimateWeights* given) {
  const bool seg = req.seg_template_k.defined();
  const bool dense = a.form == StoreForm::kDense;
  // The checks the weight and offset ops would run, before anything is read.
  const auto s = checks::kv4(op, "base_k", req.base_k);
  stored_anchors(op, "anchor base_k", req.base_k, s, a.base_k, a.base_k_scale, a.form);
  stored_anchors(op, "anchor base_v", req.base_v, s, a.base_v, a.base_v_scale, a.form);
  if (!dense) {
    stored_anchors(op, "anchor ph_k", req.base_k, s, a.ph_k, a.ph_k_scale, a.form);
    stored_anchors(op, "anchor ph_v", req.base_v, s, a.ph_v, a.ph_v_scale, a.form);
    if (seg) {
      const auto ss = checks::kv4(op, "seg_template_k", req.seg_template_k);
      stored_anchors(op, "anchor seg_k", req.seg_template_k, ss, a.seg_k, a.seg_k_scale, a.form);
      stored_anchors(op, "anchor seg_v", req.seg_template_v, ss, a.seg_v, a.seg_v_scale, a.form);
    }
  }
  checks::tau(op, tau);
  const at::Tensor shift = at::full({}, req.position, req.base_k.options().dtype(at::kLong));
  const int64_t n = static_cast<int64_t>(a.base_k.size());
  const auto f32 = req.base_k.options().dtype(at::kFloat);
  const at::Tensor token_shape = at::empty({n, s.tokens}, f32);
  const at::Tensor channel_shape = at::empty({n, s.layers, s.heads, s.dim}, f32);
  std::vector<OffsetJob> jobs;
  auto job = [&](const at::Tensor& dst, const at::Tensor& base, const std::vector<at::Tensor>& deltas,
                 const std::vector<at::Tensor>& scales, const at::Tensor& like_weights,
                 const at::Tensor& sh, const c10::optional<at::Tensor>& inv_freq) {
    const checks::OffsetPlan plan =
        dense ? checks::offset(op, dst, base, deltas, like_weights, sh, inv_freq)
              : checks::offset(op, dst, base, {}, like_weights, sh, inv_freq, c10::nullopt,
                               static_cast<int64_t>(deltas.size()));
    jobs.push_back(OffsetJob{dst, base, deltas, at::Tensor(), sh, inv_freq, plan, scales, a.form});
  };
  job(req.dst_k, req.base_k, a.ph_k, a.ph_k_scale, token_shape, shift, req.inv_freq);
  job(req.dst_v, req.base_v, a.ph_v, a.ph_v_scale, token_shape, shift, c10::nullopt);
  if (seg) {
    const at::Tensor seg_shift = at::full({}, req.seg_position, shift.options());
    job(req.seg_dst_k, req.seg_template_k, a.seg_k, a.seg_k_scale, channel_shape, seg_shift,
        req.inv_freq);
    job(req.seg_dst_v, req.seg_template_v, a.seg_v, a.seg_v_scale, channel_shape, seg_shift,
        c10::nullopt);
  }
  // Pass 1: both weightings of K and of V from one read of the bases.
  EstimateWeights w;
  if (given != nullptr) {
    w = *given;
  } else {
    std::vector<WeightsOut> out = compute_weights(
        {WeightsJob{req.base_k, a.base_k, true, true, a.base_k_scale, a.form},
         WeightsJob{req.base_v, a.base_v, true, true, a.base_v_scale, a.form}},
        tau);
    w.token_k = out[0].token;
    w.token_v = out[1].token;
    w.segment_k = out[0].segment;
    w.segment_v = out[1].segment;
  }
  jobs[0].weights = w.token_k;
  jobs[1].weights = w.token_v;
  if (seg) {
    jobs[2].weights = w.segment_k;
    jobs[3].weights = w.segment_v;
  }
  // Pass 2: every delta once, all four destinations in one parallel region.
  apply_offsets(jobs);
  return w;
}

}  // namespace cpu
}  // namespace kvcomm
