#include "op_checks.h"

#include <ATen/MemoryOverlap.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace kvcomm {
namespace checks {

namespace {

// One term m * stride of a byte offset, m an integer in [lo, hi].
struct Term {
  int64_t stride, lo, hi;
};

// Whether sum_k m_k * terms[k].stride == target for some m_k in their
// ranges, terms sorted by stride, largest first. Depth-first over the
// values of the largest stride that the smaller ones could still make up;
// for views of one buffer there are one or two such values per level.
// `budget` bounds the search; when it runs out the answer is "yes".
bool reachable(const std::vector<Term>& terms, size_t k, int64_t target,
               const std::vector<int64_t>& rest_min,
               const std::vector<int64_t>& rest_max, int64_t& budget) {
  if (--budget < 0) return true;
  if (k == terms.size()) return target == 0;
  const Term& t = terms[k];
  // m * stride + rest == target, rest in [rest_min[k+1], rest_max[k+1]].
  const int64_t hi_num = target - rest_min[k + 1], lo_num = target - rest_max[k + 1];
  const auto floor_div = [](int64_t a, int64_t b) { return a / b - ((a % b != 0) && ((a < 0) != (b < 0))); };
  const auto ceil_div = [&](int64_t a, int64_t b) { return -floor_div(-a, b); };
  const int64_t m0 = std::max(t.lo, ceil_div(lo_num, t.stride));
  const int64_t m1 = std::min(t.hi, floor_div(hi_num, t.stride));
  for (int64_t m = m0; m <= m1; ++m) {
    if (reachable(terms, k + 1, target - m * t.stride, rest_min, rest_max, budget)) return true;
  }
  return false;
}

// The memory a strided view covers: its start and, per dimension, size and
// stride, in bytes. A copy of a tensor's metadata (no new tensor for a
// narrowed view: the checks run on every call).
struct View {
  int64_t start = 0, item = 1;
  int64_t dims = 0;
  int64_t size[8] = {}, stride[8] = {};
};

View view_of(const at::Tensor& t, int64_t max_tokens = -1) {
  View v;
  v.start = reinterpret_cast<int64_t>(t.data_ptr());
  v.item = t.element_size();
  TORCH_INTERNAL_ASSERT(t.dim() <= 8, "view_of: more than 8 dimensions");
  v.dims = t.dim();
  for (int64_t d = 0; d < v.dims; ++d) {
    v.size[d] = t.size(d);
    v.stride[d] = t.stride(d) * v.item;
  }
  if (max_tokens >= 0 && t.dim() == 4) v.size[2] = std::min(v.size[2], max_tokens);
  return v;
}

bool empty(const View& v) {
  for (int64_t d = 0; d < v.dims; ++d)
    if (v.size[d] == 0) return true;
  return false;
}

// First and one-past-last byte of a view's elements.
void byte_span(const View& v, int64_t& first, int64_t& end) {
  first = v.start;
  int64_t last = first;
  for (int64_t d = 0; d < v.dims; ++d) last += (v.size[d] - 1) * v.stride[d];
  end = last + v.item;
}

bool same_view(const at::Tensor& a, const at::Tensor& b) {
  return a.data_ptr() == b.data_ptr() && a.sizes() == b.sizes() &&
         a.strides() == b.strides() && a.scalar_type() == b.scalar_type();
}

bool views_share_memory(const View& a, const View& b) {
  if (empty(a) || empty(b)) return false;
  int64_t a0, a1, b0, b1;
  byte_span(a, a0, a1);
  byte_span(b, b0, b1);
  if (a1 <= b0 || b1 <= a0) return false;  // the common case: apart
  // Elements i of a and j of b share a byte iff
  //   addr_a(i) - addr_b(j) = -e  for some e in [-(item_a - 1), item_b - 1],
  // i.e. sum_k i_k*sa_k - sum_k j_k*sb_k + e = b0 - a0 (strides in bytes).
  std::vector<Term> terms;
  const auto add = [&](int64_t stride, int64_t lo, int64_t hi) {
    if (stride == 0 || lo == hi) return;
    for (Term& t : terms) {
      if (t.stride == stride) {  // same stride: the ranges add up
        t.lo += lo;
        t.hi += hi;
        return;
      }
    }
    terms.push_back({stride, lo, hi});
  };
  for (int64_t d = 0; d < a.dims; ++d) add(a.stride[d], 0, a.size[d] - 1);
  for (int64_t d = 0; d < b.dims; ++d) add(b.stride[d], -(b.size[d] - 1), 0);
  add(1, -(a.item - 1), b.item - 1);
  std::sort(terms.begin(), terms.end(), [](const Term& x, const Term& y) { return x.stride > y.stride; });
  std::vector<int64_t> rest_min(terms.size() + 1, 0), rest_max(terms.size() + 1, 0);
  for (size_t k = terms.size(); k-- > 0;) {
    rest_min[k] = rest_min[k + 1] + terms[k].lo * terms[k].stride;
    rest_max[k] = rest_max[k + 1] + terms[k].hi * terms[k].stride;
  }
  int64_t budget = 1 << 16;
  return reachable(terms, 0, b0 - a0, rest_min, rest_max, budget);
}

void check_apart(const char* op, const at::Tensor& dst, const char* arg, const at::Tensor& t,
                 const View& tv, bool allow_same) {
  // rope_move_ writes its `keys`; the other ops a `dst`.
  const char* out = std::strstr(op, "rope_move_") != nullptr ? "keys" : "dst";
  TORCH_CHECK(!views_share_memory(view_of(dst), tv), op, ": ", out, " overlaps ", arg,
              " in memory (", out, " shape ", dst.sizes(), " strides ", dst.strides(), ", ",
              arg, " shape ", t.sizes(), " strides ", t.strides(), "): the op reads ", arg,
              " while it writes ", out, ", so overlapping elements would be read after they "
              "were overwritten",
              allow_same ? "; to work in place, pass the very same view as dst and as " : "",
              allow_same ? arg : "");
}

}  // namespace

bool may_share_memory(const at::Tensor& a, const at::Tensor& b) {
  if (!a.defined() || !b.defined() || a.device() != b.device()) return false;
  return views_share_memory(view_of(a), view_of(b));
}

void no_overlap(const char* op, const at::Tensor& dst, const char* arg,
                const at::Tensor& t, bool allow_same) {
  if (allow_same && same_view(dst, t)) return;
  if (dst.device() != t.device()) return;
  check_apart(op, dst, arg, t, view_of(t), allow_same);
}

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

Codes anchor_codes(const char* op, const char* arg, const at::Tensor& content,
                   const KVShape& shape, at::TensorList list,
                   const c10::optional<at::TensorList>& scales) {
  if (!scales.has_value()) {
    anchors(op, arg, content, shape, list);
    return Codes::kPlain;
  }
  TORCH_CHECK(scales->size() == list.size(), op, ": ", arg, " has ", list.size(),
              " tensors but ", scales->size(), " scale tensors were given (one each)");
  if (list.empty()) return Codes::kPlain;
  const at::ScalarType code = list[0].scalar_type();
  TORCH_CHECK(code == at::kChar || code == at::kFloat8_e4m3fn, op, ": ", arg,
              "[0] is ", code, "; with scales, ", arg,
              " must be int8 or float8_e4m3fn codes (without scales, the content's dtype ",
              content.scalar_type(), ")");
  for (size_t u = 0; u < list.size(); ++u) {
    const std::string name = std::string(arg) + "[" + std::to_string(u) + "]";
    const at::Tensor& t = list[u];
    TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
    TORCH_CHECK(t.scalar_type() == code, op, ": ", name, " is ", t.scalar_type(), " but ", arg,
                "[0] is ", code, " (compact ", arg, " share one code dtype)");
    TORCH_CHECK(t.device() == content.device(), op, ": ", name, " is on ", t.device(),
                " but the content is on ", content.device());
    TORCH_CHECK(t.dim() == 4 && t.size(0) == shape.layers && t.size(1) == shape.heads &&
                    t.size(3) == shape.dim,
                op, ": ", name, " has shape ", t.sizes(), " but the content is [", shape.layers,
                ", ", shape.heads, ", ", shape.tokens, ", ", shape.dim,
                "] (layers, kv_heads and head_dim must match)");
    TORCH_CHECK(t.size(2) >= shape.tokens, op, ": ", name, " has ", t.size(2),
                " tokens, fewer than the content's ", shape.tokens);
    const at::Tensor& s = (*scales)[u];
    const std::string sname = std::string(arg) + " scale [" + std::to_string(u) + "]";
    TORCH_CHECK(s.defined(), op, ": ", sname, " is undefined");
    TORCH_CHECK(s.scalar_type() == at::kFloat, op, ": ", sname, " must be float32, got ",
                s.scalar_type());
    TORCH_CHECK(s.device() == content.device(), op, ": ", sname, " is on ", s.device(),
                " but the content is on ", content.device());
    TORCH_CHECK(s.dim() == 4 && s.size(0) == shape.layers && s.size(1) == shape.heads &&
                    s.size(2) == 1 && s.size(3) == shape.dim,
                op, ": ", sname, " must be [layers, kv_heads, 1, head_dim] = [", shape.layers,
                ", ", shape.heads, ", 1, ", shape.dim, "], got ", s.sizes());
  }
  return code == at::kChar ? Codes::kInt8 : Codes::kFp8;
}

OffsetPlan offset(const char* op, const at::Tensor& dst, const at::Tensor& base,
                  at::TensorList deltas, const at::Tensor& weights,
                  const at::Tensor& shift_t,
                  const c10::optional<at::Tensor>& inv_freq_t,
                  const c10::optional<at::TensorList>& delta_scales, int64_t stored_deltas) {
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
  plan.codes = anchor_codes(op, "deltas", base, s, deltas, delta_scales);
  TORCH_INTERNAL_ASSERT(stored_deltas < 0 || deltas.empty(), "stored deltas are passed by count");
  plan.num_deltas = stored_deltas >= 0 ? stored_deltas : static_cast<int64_t>(deltas.size());
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
  // dst is written while everything else is read.
  no_overlap(op, dst, "base", base, /*allow_same=*/true);
  for (size_t u = 0; u < deltas.size(); ++u) {
    // Only a delta's first `tokens` tokens are read.
    if (!views_share_memory(view_of(dst), view_of(deltas[u], s.tokens))) continue;
    const std::string name = "deltas[" + std::to_string(u) + "]";
    check_apart(op, dst, name.c_str(), deltas[u], view_of(deltas[u], s.tokens), false);
  }
  if (delta_scales.has_value()) {
    for (size_t u = 0; u < delta_scales->size(); ++u) {
      const std::string name = "deltas scale [" + std::to_string(u) + "]";
      no_overlap(op, dst, name.c_str(), (*delta_scales)[u], false);
    }
  }
  no_overlap(op, dst, "weights", weights, false);
  no_overlap(op, dst, "shift", shift_t, false);
  if (plan.rotate) no_overlap(op, dst, "inv_freq", *inv_freq_t, false);
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
