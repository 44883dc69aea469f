#include "op_checks.h"

#include <ATen/MemoryOverlap.h>

#include <cmath>

namespace kvcomm {
namespace checks {

KVShape kv4(const char* op, const char* arg, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), op, ": ", arg, " is undefined");
  TORCH_CHECK(t.dim() == 4, op, ": ", arg,
              " must be [layers, kv_heads, tokens, head_dim] (4-D), got shape ",
              t.sizes());
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": ", arg, " must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(t.size(0) > 0 && t.size(1) > 0 && t.size(3) > 0, op, ": ", arg,
              " must have at least one layer, kv_head and head_dim channel, got shape ",
              t.sizes());
  return {t.size(0), t.size(1), t.size(2), t.size(3)};
}

void same_device_dtype(const char* op, const char* arg, const at::Tensor& t,
                       const char* like_arg, const at::Tensor& like) {
  TORCH_CHECK(t.device() == like.device(), op, ": ", arg, " is on ",
              t.device(), " but ", like_arg, " is on ", like.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", arg, " is ",
              t.scalar_type(), " but ", like_arg, " is ", like.scalar_type());
}

void inv_freq(const char* op, const at::Tensor& f, int64_t head_dim,
              const at::Tensor& like) {
  TORCH_CHECK(head_dim % 2 == 0, op, ": head_dim must be even for rotate-half "
              "RoPE, got ", head_dim);
  TORCH_CHECK(f.dim() == 1 && f.size(0) == head_dim / 2, op,
              ": inv_freq must be [head_dim/2] = [", head_dim / 2, "], got ",
              f.sizes());
  TORCH_CHECK(f.scalar_type() == at::kFloat, op,
              ": inv_freq must be float32, got ", f.scalar_type());
  TORCH_CHECK(f.device() == like.device(), op, ": inv_freq is on ", f.device(),
              " but the keys are on ", like.device());
}

bool shift(const char* op, const at::Tensor& s, int64_t tokens,
           const at::Tensor& like) {
  TORCH_CHECK(s.defined(), op, ": shift is undefined");
  TORCH_CHECK(s.scalar_type() == at::kLong, op,
              ": shift must be int64, got ", s.scalar_type());
  TORCH_CHECK(s.device() == like.device(), op, ": shift is on ", s.device(),
              " but the keys are on ", like.device());
  const bool scalar = s.dim() == 0 || (s.dim() == 1 && s.size(0) == 1 && tokens != 1);
  const bool per_token = s.dim() == 1 && s.size(0) == tokens;
  TORCH_CHECK(scalar || per_token, op,
              ": shift must be [] (one shift) or [tokens] = [", tokens,
              "], got shape ", s.sizes());
  return per_token && !scalar;
}

void anchors(const char* op, const char* arg, const at::Tensor& content,
             const KVShape& shape, at::TensorList list) {
  for (size_t u = 0; u < list.size(); ++u) {
    const std::string name = std::string(arg) + "[" + std::to_string(u) + "]";
    const KVShape a = kv4(op, name.c_str(), list[u]);
    same_device_dtype(op, name.c_str(), list[u], "the content", content);
    TORCH_CHECK(a.layers == shape.layers && a.heads == shape.heads &&
                    a.dim == shape.dim,
                op, ": ", name, " has shape ", list[u].sizes(),
                " but the content is ", content.sizes(),
                " (layers, kv_heads and head_dim must match)");
    TORCH_CHECK(a.tokens >= shape.tokens, op, ": ", name, " has ", a.tokens,
                " tokens, fewer than the content's ", shape.tokens);
  }
}

OffsetPlan offset(const char* op, const at::Tensor& dst, const at::Tensor& base,
                  at::TensorList deltas, const at::Tensor& weights,
                  const at::Tensor& shift_t,
                  const c10::optional<at::Tensor>& inv_freq_t) {
  OffsetPlan plan{};
  plan.shape = kv4(op, "base", base);
  const KVShape& s = plan.shape;
  const KVShape d = kv4(op, "dst", dst);
  same_device_dtype(op, "dst", dst, "base", base);
  TORCH_CHECK(at::has_internal_overlap(dst) != at::MemOverlap::Yes, op,
              ": dst has overlapping memory (an expanded or stride-0 view); "
              "write into a real buffer");
  TORCH_CHECK(d.layers == s.layers && d.heads == s.heads &&
                  d.tokens == s.tokens && d.dim == s.dim,
              op, ": dst has shape ", dst.sizes(), " but base is ",
              base.sizes());
  anchors(op, "deltas", base, s, deltas);
  plan.num_deltas = static_cast<int64_t>(deltas.size());
  TORCH_CHECK(weights.scalar_type() == at::kFloat, op,
              ": weights must be float32, got ", weights.scalar_type());
  TORCH_CHECK(weights.device() == base.device(), op, ": weights are on ",
              weights.device(), " but base is on ", base.device());
  const int64_t n = plan.num_deltas;
  if (weights.dim() == 2) {
    TORCH_CHECK(weights.size(0) == n && weights.size(1) == s.tokens, op,
                ": per-token weights must be [num_deltas, tokens] = [", n, ", ",
                s.tokens, "], got ", weights.sizes());
    plan.per_token_weights = true;
  } else {
    TORCH_CHECK(weights.dim() == 4 && weights.size(0) == n &&
                    weights.size(1) == s.layers && weights.size(2) == s.heads &&
                    weights.size(3) == s.dim,
                op,
                ": weights must be [num_deltas, tokens] (per token) or "
                "[num_deltas, layers, kv_heads, head_dim] = [",
                n, ", ", s.layers, ", ", s.heads, ", ", s.dim,
                "] (per channel), got ", weights.sizes());
    plan.per_token_weights = false;
  }
  plan.per_token_shift = shift(op, shift_t, s.tokens, base);
  plan.rotate = inv_freq_t.has_value() && inv_freq_t->defined();
  if (plan.rotate) inv_freq(op, *inv_freq_t, s.dim, base);
  return plan;
}

void distances(const char* op, const at::Tensor& d) {
  TORCH_CHECK(d.dim() == 1, op, ": distances must be [N], got shape ",
              d.sizes());
  TORCH_CHECK(d.scalar_type() == at::kFloat, op,
              ": distances must be float32, got ", d.scalar_type());
}

void tau(const char* op, double tau) {
  TORCH_CHECK(std::isfinite(tau) && tau > 0, op, ": tau must be > 0, got ",
              tau);
}

void decide_params(const char* op, double tau_v, double gamma, double top_p) {
  tau(op, tau_v);
  TORCH_CHECK(std::isfinite(gamma) && gamma >= 0, op,
              ": gamma must be >= 0, got ", gamma);
  TORCH_CHECK(top_p > 0 && top_p <= 1, op, ": top_p must be in (0, 1], got ",
              top_p);
}

}  // namespace checks
}  // namespace kvcomm
