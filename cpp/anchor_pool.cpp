// AnchorPool: matching, anchor insertion, delta recording, estimation and
// eviction. Save/load live in pool_file.cpp.
#include "kvcomm/anchor_pool.h"

#include <ATen/ops/cat.h>
#include <ATen/ops/full.h>

#include <algorithm>
#include <cmath>

#include "anchor.h"
#include "cpu_estimate.h"
#include "kvcomm/ops.h"
#include "op_checks.h"

namespace kvcomm {

namespace {

// Whether `w` (an earlier estimate's weights) weights exactly `anchors` over
// the content `base` [L, H, n, D] as this estimate would compute them; a
// segment's weights only where they are needed.
bool weights_fit(const EstimateWeights& w, const std::vector<int64_t>& anchors,
                 const at::Tensor& base, bool need_segment) {
  const int64_t n_anchors = static_cast<int64_t>(anchors.size());
  auto fits = [&](const at::Tensor& t, at::IntArrayRef shape) {
    return t.defined() && t.scalar_type() == at::kFloat && t.device() == base.device() &&
           t.is_contiguous() && t.sizes() == shape;
  };
  const std::vector<int64_t> token{n_anchors, base.size(2)};
  const std::vector<int64_t> segment{n_anchors, base.size(0), base.size(1), base.size(3)};
  return w.anchors == anchors && fits(w.token_k, token) && fits(w.token_v, token) &&
         (!need_segment || (fits(w.segment_k, segment) && fits(w.segment_v, segment)));
}

// The decoded values of stored tensors (handles taken under the pool's lock;
// decoding runs outside it).
std::vector<at::Tensor> expand_all(const std::vector<CompactTensor>& ts) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(t.expand());
  return out;
}

// The stored data (codes, or values in a float type).
std::vector<at::Tensor> codes_of(const std::vector<CompactTensor>& ts) {
  std::vector<at::Tensor> out;
  for (const auto& t : ts) out.push_back(t.data);
  return out;
}

// The scales of int8 / fp8 tensors; none for tensors stored without (bf16).
std::vector<at::Tensor> scales_of(const std::vector<CompactTensor>& ts) {
  std::vector<at::Tensor> out;
  for (const auto& t : ts)
    if (t.scale.defined()) out.push_back(t.scale);
  return out;
}

// Whether the ops read anchors of storage `s` next to `content` as codes
// with scales (int8, fp8), or take them as values of the content's dtype.
bool ops_take_codes(Storage s) { return s == Storage::kInt8 || s == Storage::kFp8; }

// Stored tensors as the ops take them: int8 / fp8 codes as stored (scales
// from ops_scales), every other storage as values of the content's dtype
// (decoded only for bf16 under another model dtype).
std::vector<at::Tensor> ops_codes(const std::vector<CompactTensor>& ts, Storage s) {
  return ops_take_codes(s) ? codes_of(ts) : expand_all(ts);
}

using ScalesArg = c10::optional<at::TensorList>;

// Their anchor_scales / delta_scales argument (none unless ops_take_codes).
// The TensorList it converts to views this object's handles: keep it alive
// across the op call.
class OpsScales {
 public:
  OpsScales(const std::vector<CompactTensor>& ts, Storage s) : on_(ops_take_codes(s)) {
    if (on_) scales_ = scales_of(ts);
  }
  operator ScalesArg() const { return on_ ? ScalesArg(at::TensorList(scales_)) : ScalesArg(); }

 private:
  bool on_;
  std::vector<at::Tensor> scales_;
};

// A content's anchor weights from the weight ops (the kernels the fused CPU
// estimate runs too), anchor bases as the ops take them; the following
// segment's weights only when asked for.
EstimateWeights op_weights(const at::Tensor& base_k, const at::Tensor& base_v,
                           const std::vector<at::Tensor>& bk, const OpsScales& bks,
                           const std::vector<at::Tensor>& bv, const OpsScales& bvs, double tau,
                           bool segment) {
  EstimateWeights w;
  w.token_k = token_weights(base_k, bk, tau, bks);
  w.token_v = token_weights(base_v, bv, tau, bvs);
  if (segment) {
    w.segment_k = segment_weights(base_k, bk, tau, bks);
    w.segment_v = segment_weights(base_v, bv, tau, bvs);
  }
  return w;
}

// How the CPU kernels read anchors of storage `s` next to `content`
// (cpu_kernels.h StoreForm): every storage is read as stored, the model's
// dtype (and bf16 under a bf16 model) being the plain case.
cpu::StoreForm cpu_form(Storage s, const at::Tensor& content) {
  switch (s) {
    case Storage::kInt8: return cpu::StoreForm::kInt8;
    case Storage::kFp8: return cpu::StoreForm::kFp8;
    case Storage::kBf16:
      return content.scalar_type() == at::kBFloat16 ? cpu::StoreForm::kDense : cpu::StoreForm::kBf16;
    case Storage::kModel: return cpu::StoreForm::kDense;
  }
  TORCH_CHECK(false, "unknown anchor storage code ", static_cast<int>(s));
}

at::Tensor shift_scalar(int64_t position, const at::Tensor& like) {
  // A device-side fill, not a host-to-device copy: no sync on CUDA.
  return at::full({}, position, like.options().dtype(at::kLong));
}

void check_pair(const char* op, const char* k_name, const at::Tensor& k,
                const char* v_name, const at::Tensor& v) {
  checks::kv4(op, k_name, k);
  checks::kv4(op, v_name, v);
  checks::same_device_dtype(op, v_name, v, k_name, k);
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": ", k_name, " has shape ",
              k.sizes(), " but ", v_name, " has shape ", v.sizes());
}

}  // namespace

int64_t AgentDeltas::bytes() const {
  return tensor_bytes(ph_k) + tensor_bytes(ph_v) + tensor_bytes(seg_k) +
         tensor_bytes(seg_v);
}

AnchorPool::AnchorPool(PoolConfig config) : config_(config) {
  const char* op = "AnchorPool";
  checks::decide_params(op, config_.tau, config_.gamma, config_.top_p);
  TORCH_CHECK(config_.capacity >= 1, op, ": capacity must be >= 1, got ",
              config_.capacity);
  TORCH_CHECK(config_.window >= 1, op, ": window must be >= 1, got ",
              config_.window);
  TORCH_CHECK(config_.min_anchors >= 2, op,
              ": min_anchors must be >= 2 (a slot shares from at least 2 anchors), got ",
              config_.min_anchors);
  TORCH_CHECK(config_.byte_budget >= 0, op,
              ": byte_budget must be >= 0 (0 = unlimited), got ",
              config_.byte_budget);
  layers_ = config_.layers;
  heads_ = config_.kv_heads;
  dim_ = config_.head_dim;
}

at::ScalarType AnchorPool::dtype() const {
  std::shared_lock<std::shared_mutex> lock(mutex_);
  return dtype_;
}

void AnchorPool::check_layout_locked(const char* what, const at::Tensor& t) const {
  if (layers_ > 0) {
    TORCH_CHECK(t.size(0) == layers_ && t.size(1) == heads_ && t.size(3) == dim_,
                what, " has shape ", t.sizes(), " but this pool holds [layers=",
                layers_, ", kv_heads=", heads_, ", tokens, head_dim=", dim_, "]");
  }
  if (dtype_ != at::ScalarType::Undefined) {
    TORCH_CHECK(t.scalar_type() == dtype_, what, " is ", t.scalar_type(),
                " but this pool holds ", dtype_);
  }
}

std::shared_ptr<AnchorPool::Anchor> AnchorPool::find_locked(
    const std::string& slot, int64_t id) const {
  auto it = slots_.find(slot);
  TORCH_CHECK(it != slots_.end(), "AnchorPool: unknown slot '", slot, "'");
  for (const auto& a : it->second.anchors)
    if (a->id == id) return a;
  TORCH_CHECK(false, "AnchorPool: slot '", slot, "' has no anchor with id ", id,
              " (evicted or never added)");
}

Decision AnchorPool::decide(const std::string& slot, const at::Tensor& content_v,
                            bool credit) {
  Candidates c = candidate_distances(slot, content_v, config_.distance == DistanceMode::kRms);
  return decide_from_distances(slot, c.ids, c.distances, credit);
}

AnchorPool::Candidates AnchorPool::candidate_distances(const std::string& slot,
                                                       const at::Tensor& content_v,
                                                       bool rms) const {
  const char* op = "AnchorPool.decide";
  const auto shape = checks::kv4(op, "content_v", content_v);
  Candidates out;
  std::vector<CompactTensor> stored;
  {
    std::shared_lock<std::shared_mutex> lock(mutex_);
    check_layout_locked("AnchorPool.decide: content_v", content_v);
    auto it = slots_.find(slot);
    if (it != slots_.end()) {
      for (const auto& a : it->second.anchors) {
        if (a->length >= shape.tokens) {
          out.ids.push_back(a->id);
          stored.push_back(a->base_v);
        }
      }
    }
  }
  // The pool never copies across devices behind the caller's back: a
  // content on another device than the anchors is an error from the op.
  out.distances =
      content_v.device().is_cpu()
          ? cpu::stored_distances(op, content_v, codes_of(stored), scales_of(stored),
                                  cpu_form(config_.storage, content_v), rms)
          : value_distances(content_v, ops_codes(stored, config_.storage), rms,
                            OpsScales(stored, config_.storage));
  return out;
}

Decision AnchorPool::decide_from_distances(const std::string& slot,
                                           const std::vector<int64_t>& ids,
                                           const at::Tensor& distances, bool credit) {
  const char* op = "AnchorPool.decide";
  const int64_t n = static_cast<int64_t>(ids.size());
  TORCH_CHECK(distances.defined() && distances.dim() == 1 && distances.numel() == n, op,
              ": distances must be a 1-D tensor with one entry per candidate (", n,
              "), got ", distances.defined() ? distances.sizes() : at::IntArrayRef{});
  TORCH_CHECK(distances.scalar_type() == at::kFloat, op,
              ": distances must be float32, got ", distances.scalar_type());
  Decision out;
  out.candidates = ids;
  auto [probs, entropy, share, credit_mask] =
      match_decide(distances, config_.tau, config_.gamma, config_.top_p);
  // One small host read carries everything the caller needs.
  const at::Tensor host =
      at::cat({distances, probs, entropy.view({1}), share.to(at::kFloat).view({1}),
               credit_mask.to(at::kFloat)})
          .cpu();
  const float* h = host.data_ptr<float>();
  out.distances.assign(h, h + n);
  out.probs.assign(h + n, h + 2 * n);
  out.entropy = h[2 * n];
  for (int64_t u = 0; u < n; ++u) {
    TORCH_CHECK(std::isfinite(out.distances[u]), op, ": content_v for slot '", slot,
                "' is at a non-finite distance from anchor ", out.candidates[u],
                " (NaN or Inf in the values)");
  }
  // Coverage before confidence: under min_anchors candidates the content
  // becomes an anchor whatever the entropy says.
  const bool covered = n >= std::max<int64_t>(2, config_.min_anchors);
  out.share = covered && h[2 * n + 1] != 0.f;
  out.threshold = n >= 2 ? static_cast<float>(config_.gamma * std::log2(static_cast<double>(n)))
                         : 0.f;
  out.reason = out.share ? "share" : (!covered ? "too_few_candidates" : "entropy_above_gate");
  if (out.share) {
    std::vector<int64_t> credited;
    for (int64_t u = 0; u < n; ++u)
      if (h[2 * n + 2 + u] != 0.f) credited.push_back(out.candidates[u]);
    if (credit) {
      std::shared_lock<std::shared_mutex> lock(mutex_);
      auto it = slots_.find(slot);
      if (it != slots_.end()) {
        for (const auto& a : it->second.anchors) {
          if (std::find(credited.begin(), credited.end(), a->id) != credited.end()) {
            a->activations.fetch_add(1);
            out.credited.push_back(a->id);
          }
        }
      }
    }
  }
  return out;
}

int64_t AnchorPool::add_anchor(const std::string& slot, const at::Tensor& base_k,
                               const at::Tensor& base_v) {
  const char* op = "AnchorPool.add_anchor";
  TORCH_CHECK(!slot.empty(), op, ": slot name is empty");
  check_pair(op, "base_k", base_k, "base_v", base_v);
  TORCH_CHECK(base_k.size(2) > 0, op, ": content has no tokens");
  auto anchor = std::make_shared<Anchor>();
  anchor->length = base_k.size(2);
  anchor->base_k = compact(op, "base_k", base_k, config_.storage);
  anchor->base_v = compact(op, "base_v", base_v, config_.storage);
  const int64_t bytes = anchor->bytes();
  TORCH_CHECK(config_.byte_budget == 0 || bytes <= config_.byte_budget, op,
              ": one anchor of ", bytes, " bytes exceeds the pool's byte budget of ",
              config_.byte_budget);
  std::unique_lock<std::shared_mutex> lock(mutex_);
  check_layout_locked("AnchorPool.add_anchor: base_k", base_k);
  if (layers_ == 0) {
    layers_ = base_k.size(0);
    heads_ = base_k.size(1);
    dim_ = base_k.size(3);
  }
  if (dtype_ == at::ScalarType::Undefined) dtype_ = base_k.scalar_type();
  anchor->id = next_id_++;
  anchor->seq = next_seq_++;
  Slot& s = slots_[slot];
  s.anchors.push_back(anchor);
  evict_for_capacity_locked(s);
  enforce_budget_locked(anchor.get(), 0);
  return anchor->id;
}

void AnchorPool::record_deltas(const std::string& slot, int64_t id,
                               const std::string& agent,
                               const AgentDeltas& deltas) {
  const char* op = "AnchorPool.record_deltas";
  TORCH_CHECK(!agent.empty(), op, ": agent name is empty");
  check_pair(op, "ph_k", deltas.ph_k, "ph_v", deltas.ph_v);
  const bool has_seg = deltas.seg_k.defined() || deltas.seg_v.defined();
  if (has_seg) {
    TORCH_CHECK(deltas.seg_k.defined() && deltas.seg_v.defined(), op,
                ": give both seg_k and seg_v, or neither");
    check_pair(op, "seg_k", deltas.seg_k, "seg_v", deltas.seg_v);
    checks::same_device_dtype(op, "seg_k", deltas.seg_k, "ph_k", deltas.ph_k);
    TORCH_CHECK(deltas.seg_k.size(0) == deltas.ph_k.size(0) &&
                    deltas.seg_k.size(1) == deltas.ph_k.size(1) &&
                    deltas.seg_k.size(3) == deltas.ph_k.size(3),
                op, ": seg_k has shape ", deltas.seg_k.sizes(),
                " which does not match ph_k ", deltas.ph_k.sizes(),
                " in layers, kv_heads or head_dim");
  }
  const Storage st = config_.storage;
  StoredDeltas owned{compact(op, "ph_k", deltas.ph_k, st), compact(op, "ph_v", deltas.ph_v, st),
                     compact(op, "seg_k", deltas.seg_k, st), compact(op, "seg_v", deltas.seg_v, st)};
  std::unique_lock<std::shared_mutex> lock(mutex_);
  auto anchor = find_locked(slot, id);
  TORCH_CHECK(deltas.ph_k.sizes() == anchor->base_k.sizes(), op,
              ": ph_k has shape ", deltas.ph_k.sizes(), " but anchor ", id,
              " of slot '", slot, "' has base shape ", anchor->base_k.sizes());
  TORCH_CHECK(deltas.ph_k.device() == anchor->base_k.device() &&
                  deltas.ph_k.scalar_type() == anchor->base_k.dtype,
              op, ": ph_k is ", deltas.ph_k.scalar_type(), " on ", deltas.ph_k.device(),
              " but the anchor base is ", anchor->base_k.dtype, " on ", anchor->base_k.device());
  auto next = std::make_shared<DeltaMap>(*anchor->deltas);
  int64_t extra = owned.bytes();
  auto old = next->find(agent);
  if (old != next->end()) extra -= old->second.bytes();
  if (config_.byte_budget > 0) {
    TORCH_CHECK(anchor->bytes() + extra <= config_.byte_budget, op,
                ": anchor ", id, " with agent '", agent, "''s deltas would take ",
                anchor->bytes() + extra, " bytes, over the byte budget of ",
                config_.byte_budget);
  }
  enforce_budget_locked(anchor.get(), extra);
  (*next)[agent] = std::move(owned);
  anchor->deltas = std::move(next);
}

EstimateResult AnchorPool::estimate(const std::string& slot,
                                    const std::string& agent,
                                    const EstimateRequest& req) const {
  const char* op = "AnchorPool.estimate";
  // Positions in the prompt, where the estimate's keys are rotated to: a negative
  // one would silently rotate them backwards (to before the prompt's start).
  TORCH_CHECK(req.position >= 0, op,
              ": position (the placeholder's first token in the prompt) must be >= 0, got ",
              req.position);
  TORCH_CHECK(req.seg_position >= 0, op,
              ": seg_position (the following segment's first token in the prompt) must be "
              ">= 0, got ",
              req.seg_position);
  check_pair(op, "base_k", req.base_k, "base_v", req.base_v);
  const int64_t n = req.base_k.size(2);
  checks::inv_freq(op, req.inv_freq, req.base_k.size(3), req.base_k);
  check_pair(op, "dst_k", req.dst_k, "dst_v", req.dst_v);
  checks::same_device_dtype(op, "dst_k", req.dst_k, "base_k", req.base_k);
  TORCH_CHECK(req.dst_k.sizes() == req.base_k.sizes(), op, ": dst_k has shape ",
              req.dst_k.sizes(), " but base_k has shape ", req.base_k.sizes());
  const bool seg = req.seg_template_k.defined();
  int64_t seg_len = 0;
  if (seg) {
    check_pair(op, "seg_template_k", req.seg_template_k, "seg_template_v",
               req.seg_template_v);
    check_pair(op, "seg_dst_k", req.seg_dst_k, "seg_dst_v", req.seg_dst_v);
    TORCH_CHECK(req.seg_dst_k.sizes() == req.seg_template_k.sizes(), op,
                ": seg_dst_k has shape ", req.seg_dst_k.sizes(),
                " but seg_template_k has shape ", req.seg_template_k.sizes());
    seg_len = req.seg_template_k.size(2);
  }
  TORCH_CHECK(req.limit >= 0, op, ": limit (the most anchors an estimate uses; 0 = all) must be >= 0, got ",
              req.limit);
  std::vector<CompactTensor> cbk, cbv, cdk, cdv, csk, csv;
  EstimateResult result;
  {
    std::shared_lock<std::shared_mutex> lock(mutex_);
    check_layout_locked("AnchorPool.estimate: base_k", req.base_k);
    // A slot that has no anchors (never had, or all evicted) has none usable:
    // the caller runs dense, as for any other empty result.
    auto it = slots_.find(slot);
    if (it == slots_.end()) return result;
    const auto usable = usable_locked(it->second, n, &agent, seg ? seg_len : -1, req.nearest, req.limit);
    for (const auto& [a, deltas] : usable) {
      const StoredDeltas& d = *deltas;
      result.anchors.push_back(a->id);
      cbk.push_back(a->base_k);
      cbv.push_back(a->base_v);
      cdk.push_back(d.ph_k);
      cdv.push_back(d.ph_v);
      if (seg) {
        csk.push_back(d.seg_k);
        csv.push_back(d.seg_v);
      }
    }
  }
  if (result.anchors.empty()) return result;
  const double tau = config_.tau;
  if (req.base_k.device().is_cpu()) {
    // One fused routine reads each anchor's data once, as stored (compact
    // anchors decoded in the kernels' registers; cpu_estimate.h); it writes
    // what the op sequence below writes.
    cpu::SlotAnchors a{codes_of(cbk),  codes_of(cbv),  codes_of(cdk),  codes_of(cdv),
                       codes_of(csk),  codes_of(csv),  scales_of(cbk), scales_of(cbv),
                       scales_of(cdk), scales_of(cdv), scales_of(csk), scales_of(csv),
                       cpu_form(config_.storage, req.base_k)};
    // The CPU routine computes the segment's weights in the same pass, so
    // weights taken from it serve a later estimate with a segment too.
    const bool given = weights_fit(req.weights, result.anchors, req.base_k, true);
    result.weights = cpu::estimate_slot(op, req, a, tau, given ? &req.weights : nullptr);
    result.weights.anchors = result.anchors;
    // token_spread takes the model's dtype (decoded copies only for compact anchors).
    if (req.want_spread)
      result.spread = token_spread(expand_all(cdk), result.weights.token_k)
                          .add_(token_spread(expand_all(cdv), result.weights.token_v));
    return result;
  }
  // On CUDA the ops read int8 / fp8 anchors as stored (decoded in the
  // kernels' registers); bf16 anchors under a float32 / float16 model, a form
  // the ops do not take, are decoded to the model's dtype first.
  const Storage st = config_.storage;
  const std::vector<at::Tensor> bk = ops_codes(cbk, st), bv = ops_codes(cbv, st),
                                dk = ops_codes(cdk, st), dv = ops_codes(cdv, st),
                                sk = ops_codes(csk, st), sv = ops_codes(csv, st);
  const OpsScales bks(cbk, st), bvs(cbv, st), dks(cdk, st), dvs(cdv, st), sks(csk, st),
      svs(csv, st);
  const at::Tensor shift = shift_scalar(req.position, req.base_k);
  EstimateWeights& w = result.weights;
  w = weights_fit(req.weights, result.anchors, req.base_k, seg)
          ? req.weights
          : op_weights(req.base_k, req.base_v, bk, bks, bv, bvs, tau, seg);
  w.anchors = result.anchors;
  const at::Tensor& wk = w.token_k;
  const at::Tensor& wv = w.token_v;
  fused_offset_into(req.dst_k, req.base_k, dk, wk, shift, req.inv_freq, dks);
  fused_offset_into(req.dst_v, req.base_v, dv, wv, shift, c10::nullopt, dvs);
  // token_spread takes the model's dtype (decoded copies only for compact anchors).
  if (req.want_spread)
    result.spread = token_spread(expand_all(cdk), wk).add_(token_spread(expand_all(cdv), wv));
  if (seg) {
    const at::Tensor seg_shift = shift_scalar(req.seg_position, req.base_k);
    fused_offset_into(req.seg_dst_k, req.seg_template_k, sk, w.segment_k, seg_shift, req.inv_freq,
                      sks);
    fused_offset_into(req.seg_dst_v, req.seg_template_v, sv, w.segment_v, seg_shift, c10::nullopt,
                      svs);
  }
  return result;
}

std::vector<std::pair<const AnchorPool::Anchor*, const StoredDeltas*>> AnchorPool::usable_locked(
    const Slot& slot, int64_t n, const std::string* agent, int64_t seg_len,
    const std::vector<int64_t>& nearest, int64_t limit) const {
  std::vector<std::pair<const Anchor*, const StoredDeltas*>> usable;
  for (const auto& a : slot.anchors) {
    if (a->length < n) continue;
    const StoredDeltas* deltas = nullptr;
    if (agent != nullptr) {
      auto d = a->deltas->find(*agent);
      if (d == a->deltas->end()) continue;
      if (seg_len >= 0 && (!d->second.seg_k.defined() || d->second.seg_k.size(2) != seg_len))
        continue;
      deltas = &d->second;
    }
    usable.emplace_back(a.get(), deltas);
  }
  if (limit > 0 && static_cast<int64_t>(usable.size()) > limit) {
    // Rank by the caller's order (unknown ids last, in pool order), keep the
    // first `limit`, then restore pool order for the sums.
    auto rank = [&](int64_t id) {
      return static_cast<int64_t>(std::find(nearest.begin(), nearest.end(), id) - nearest.begin());
    };
    std::vector<size_t> order(usable.size());
    for (size_t u = 0; u < order.size(); ++u) order[u] = u;
    std::stable_sort(order.begin(), order.end(), [&](size_t x, size_t y) {
      return rank(usable[x].first->id) < rank(usable[y].first->id);
    });
    order.resize(static_cast<size_t>(limit));
    std::sort(order.begin(), order.end());
    std::vector<std::pair<const Anchor*, const StoredDeltas*>> kept;
    for (size_t u : order) kept.push_back(usable[u]);
    usable.swap(kept);
  }
  return usable;
}

EstimateWeights AnchorPool::estimate_weights(const std::string& slot, const at::Tensor& base_k,
                                             const at::Tensor& base_v,
                                             const std::vector<int64_t>& nearest,
                                             int64_t limit) const {
  const char* op = "AnchorPool.estimate_weights";
  check_pair(op, "base_k", base_k, "base_v", base_v);
  TORCH_CHECK(limit >= 0, op, ": limit (the most anchors an estimate uses; 0 = all) must be >= 0, got ",
              limit);
  EstimateWeights w;
  std::vector<CompactTensor> cbk, cbv;
  {
    std::shared_lock<std::shared_mutex> lock(mutex_);
    check_layout_locked("AnchorPool.estimate_weights: base_k", base_k);
    auto it = slots_.find(slot);
    if (it == slots_.end()) return w;
    for (const auto& [a, unused] : usable_locked(it->second, base_k.size(2), nullptr, -1, nearest, limit)) {
      w.anchors.push_back(a->id);
      cbk.push_back(a->base_k);
      cbv.push_back(a->base_v);
    }
  }
  if (w.anchors.empty()) return w;
  // The weight ops run the kernels the fused CPU estimate runs (and CUDA's), so
  // these are the numbers an estimate from the same anchors would compute.
  const Storage st = config_.storage;
  const std::vector<at::Tensor> bk = ops_codes(cbk, st), bv = ops_codes(cbv, st);
  std::vector<int64_t> ids = std::move(w.anchors);
  w = op_weights(base_k, base_v, bk, OpsScales(cbk, st), bv, OpsScales(cbv, st), config_.tau, true);
  w.anchors = std::move(ids);
  return w;
}

void AnchorPool::evict_for_capacity_locked(Slot& slot) {
  auto& v = slot.anchors;
  const Anchor* newest = v.empty() ? nullptr : v.back().get();
  while (static_cast<int64_t>(v.size()) > config_.capacity) {
    // Least-activated among the W oldest (earliest wins ties); never the
    // anchor that was just added.
    const size_t window = std::min<size_t>(config_.window, v.size());
    size_t victim = v.size();
    for (size_t i = 0; i < window; ++i) {
      if (v[i].get() == newest) continue;
      if (victim == v.size() || v[i]->activations.load() < v[victim]->activations.load())
        victim = i;
    }
    TORCH_INTERNAL_ASSERT(victim < v.size());
    v.erase(v.begin() + victim);
    evictions_.fetch_add(1);
  }
}

void AnchorPool::enforce_budget_locked(const Anchor* keep, int64_t extra_bytes) {
  if (config_.byte_budget == 0) return;
  while (bytes_locked() + extra_bytes > config_.byte_budget) {
    // Pool-wide: the W oldest anchors by insertion, least-activated first.
    std::vector<std::pair<int64_t, std::pair<Slot*, size_t>>> order;
    for (auto& kv : slots_)
      for (size_t i = 0; i < kv.second.anchors.size(); ++i)
        if (kv.second.anchors[i].get() != keep)
          order.push_back({kv.second.anchors[i]->seq, {&kv.second, i}});
    TORCH_INTERNAL_ASSERT(!order.empty(), "byte budget unreachable");
    std::sort(order.begin(), order.end(),
              [](const auto& a, const auto& b) { return a.first < b.first; });
    const size_t window = std::min<size_t>(config_.window, order.size());
    size_t best = 0;
    for (size_t i = 1; i < window; ++i) {
      const auto& a = order[i].second;
      const auto& b = order[best].second;
      if (a.first->anchors[a.second]->activations.load() <
          b.first->anchors[b.second]->activations.load())
        best = i;
    }
    auto [slot, index] = order[best].second;
    slot->anchors.erase(slot->anchors.begin() + index);
    evictions_.fetch_add(1);
  }
  for (auto it = slots_.begin(); it != slots_.end();) {
    it = it->second.anchors.empty() ? slots_.erase(it) : std::next(it);
  }
}

int64_t AnchorPool::bytes_locked() const {
  int64_t b = 0;
  for (const auto& kv : slots_)
    for (const auto& a : kv.second.anchors) b += a->bytes();
  return b;
}

bool AnchorPool::has_slot(const std::string& slot) const {
  std::shared_lock<std::shared_mutex> lock(mutex_);
  return slots_.count(slot) > 0;
}

std::vector<std::string> AnchorPool::slots() const {
  std::shared_lock<std::shared_mutex> lock(mutex_);
  std::vector<std::string> out;
  for (const auto& kv : slots_) out.push_back(kv.first);
  return out;
}

std::vector<AnchorInfo> AnchorPool::anchors(const std::string& slot) const {
  std::shared_lock<std::shared_mutex> lock(mutex_);
  std::vector<AnchorInfo> out;
  auto it = slots_.find(slot);
  if (it == slots_.end()) return out;
  for (const auto& a : it->second.anchors) {
    AnchorInfo info{a->id, a->length, a->activations.load(), a->seq, {}, a->bytes()};
    for (const auto& kv : *a->deltas) info.agents.push_back(kv.first);
    out.push_back(std::move(info));
  }
  return out;
}

std::pair<at::Tensor, at::Tensor> AnchorPool::anchor_base(const std::string& slot,
                                                          int64_t id) const {
  std::shared_lock<std::shared_mutex> lock(mutex_);
  auto a = find_locked(slot, id);
  return {a->base_k.expand(), a->base_v.expand()};
}

AgentDeltas AnchorPool::anchor_deltas(const std::string& slot, int64_t id,
                                      const std::string& agent) const {
  std::shared_lock<std::shared_mutex> lock(mutex_);
  auto a = find_locked(slot, id);
  auto d = a->deltas->find(agent);
  TORCH_CHECK(d != a->deltas->end(), "AnchorPool: anchor ", id, " of slot '",
              slot, "' has no deltas for agent '", agent, "'");
  return d->second.expand();
}

std::vector<AnchorPool::StoredTensor> AnchorPool::anchor_stored(const std::string& slot,
                                                                int64_t id) const {
  std::shared_lock<std::shared_mutex> lock(mutex_);
  auto a = find_locked(slot, id);
  std::vector<StoredTensor> out{{"base_k", a->base_k.data, a->base_k.scale},
                                {"base_v", a->base_v.data, a->base_v.scale}};
  for (const auto& kv : *a->deltas) {
    const StoredDeltas& d = kv.second;
    for (const auto& [name, t] : {std::pair<const char*, const CompactTensor*>{"ph_k", &d.ph_k},
                                  {"ph_v", &d.ph_v}, {"seg_k", &d.seg_k}, {"seg_v", &d.seg_v}})
      if (t->defined()) out.push_back({kv.first + "/" + name, t->data, t->scale});
  }
  return out;
}

bool AnchorPool::has_deltas(const std::string& slot, int64_t id,
                            const std::string& agent) const {
  std::shared_lock<std::shared_mutex> lock(mutex_);
  return find_locked(slot, id)->deltas->count(agent) > 0;
}

int64_t AnchorPool::size() const {
  std::shared_lock<std::shared_mutex> lock(mutex_);
  int64_t n = 0;
  for (const auto& kv : slots_) n += static_cast<int64_t>(kv.second.anchors.size());
  return n;
}

int64_t AnchorPool::size(const std::string& slot) const {
  std::shared_lock<std::shared_mutex> lock(mutex_);
  auto it = slots_.find(slot);
  return it == slots_.end() ? 0 : static_cast<int64_t>(it->second.anchors.size());
}

int64_t AnchorPool::memory_bytes() const {
  std::shared_lock<std::shared_mutex> lock(mutex_);
  return bytes_locked();
}

void AnchorPool::clear() {
  std::unique_lock<std::shared_mutex> lock(mutex_);
  slots_.clear();
}

}  // namespace kvcomm
