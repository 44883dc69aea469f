// CPU fused offset and RoPE move. A RoPE move is the fused offset with no
// deltas, so both ops share one kernel.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <vector>

#include "cpu_ops.h"
#include "kvcomm/math.h"
#include "op_checks.h"

namespace kvcomm {
namespace cpu {
namespace {

using math::Strides4;

Strides4 strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// cos/sin of shift * inv_freq, [rows, half] with rows = 1 (one shift) or T.
void rope_tables(const checks::OffsetPlan& plan, const at::Tensor& shift,
                 const at::Tensor& inv_freq, std::vector<float>& cos_t,
                 std::vector<float>& sin_t) {
  const int64_t half = plan.shape.dim / 2;
  const int64_t rows = plan.per_token_shift ? plan.shape.tokens : 1;
  const at::Tensor s = shift.reshape({-1}).contiguous();
  const at::Tensor f = inv_freq.contiguous();
  const int64_t* sp = s.data_ptr<int64_t>();
  const float* fp = f.data_ptr<float>();
  cos_t.resize(rows * half);
  sin_t.resize(rows * half);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < half; ++i) {
      const float a = math::rope_angle(sp[r], fp[i]);
      cos_t[r * half + i] = std::cos(a);
      sin_t[r * half + i] = std::sin(a);
    }
  }
}

template <typename scalar_t>
void offset_kernel(const checks::OffsetPlan& plan, const at::Tensor& dst,
                   const at::Tensor& base, at::TensorList deltas,
                   const at::Tensor& weights, const std::vector<float>& cos_t,
                   const std::vector<float>& sin_t) {
  const auto& s = plan.shape;
  const int64_t n = plan.num_deltas;
  const int64_t half = s.dim / 2;
  scalar_t* out = dst.data_ptr<scalar_t>();
  const scalar_t* in = base.data_ptr<scalar_t>();
  const Strides4 os = strides_of(dst), is = strides_of(base);
  std::vector<const scalar_t*> dp(n);
  std::vector<Strides4> dstr(n);
  for (int64_t u = 0; u < n; ++u) {
    dp[u] = deltas[u].data_ptr<scalar_t>();
    dstr[u] = strides_of(deltas[u]);
  }
  const at::Tensor wc = weights.contiguous();
  const float* w = wc.data_ptr<float>();

  // Weight of delta u for element (l, h, t, d).
  auto weight = [&](int64_t u, int64_t l, int64_t h, int64_t t, int64_t d) {
    return plan.per_token_weights ? w[u * s.tokens + t]
                                  : w[((u * s.layers + l) * s.heads + h) * s.dim + d];
  };
  // base + (layer > 0) * sum_u w_u * delta_u, in float.
  auto offset_value = [&](int64_t l, int64_t h, int64_t t, int64_t d) {
    float acc = static_cast<float>(in[is.at(l, h, t, d)]);
    if (l > 0) {
      for (int64_t u = 0; u < n; ++u) {
        acc += weight(u, l, h, t, d) *
               static_cast<float>(dp[u][dstr[u].at(l, h, t, d)]);
      }
    }
    return acc;
  };

  at::parallel_for(0, s.layers * s.heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t lh = begin; lh < end; ++lh) {
      const int64_t l = lh / s.heads, h = lh % s.heads;
      for (int64_t t = 0; t < s.tokens; ++t) {
        if (!plan.rotate) {
          for (int64_t d = 0; d < s.dim; ++d) {
            out[os.at(l, h, t, d)] = static_cast<scalar_t>(offset_value(l, h, t, d));
          }
          continue;
        }
        const int64_t row = plan.per_token_shift ? t : 0;
        for (int64_t i = 0; i < half; ++i) {
          float y1, y2;
          math::rotate_pair(offset_value(l, h, t, i), offset_value(l, h, t, i + half),
                            cos_t[row * half + i], sin_t[row * half + i], &y1, &y2);
          out[os.at(l, h, t, i)] = static_cast<scalar_t>(y1);
          out[os.at(l, h, t, i + half)] = static_cast<scalar_t>(y2);
        }
      }
    }
  });
}

void run_offset(const char* op, const at::Tensor& dst, const at::Tensor& base,
                at::TensorList deltas, const at::Tensor& weights,
                const at::Tensor& shift,
                const c10::optional<at::Tensor>& inv_freq) {
  const checks::OffsetPlan plan =
      checks::offset(op, dst, base, deltas, weights, shift, inv_freq);
  std::vector<float> cos_t, sin_t;
  if (plan.rotate) rope_tables(plan, shift, *inv_freq, cos_t, sin_t);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, base.scalar_type(), "kvcomm.fused_offset", [&] {
    offset_kernel<scalar_t>(plan, dst, base, deltas, weights, cos_t, sin_t);
  });
}

at::Tensor no_weights(const at::Tensor& keys) {
  return at::empty({0, keys.dim() == 4 ? keys.size(2) : 0},
                   keys.options().dtype(at::kFloat));
}

}  // namespace

void fused_offset_into(const at::Tensor& dst, const at::Tensor& base,
                       at::TensorList deltas, const at::Tensor& weights,
                       const at::Tensor& shift,
                       const c10::optional<at::Tensor>& inv_freq) {
  run_offset("kvcomm.fused_offset_into", dst, base, deltas, weights, shift, inv_freq);
}

at::Tensor fused_offset(const at::Tensor& base, at::TensorList deltas,
                        const at::Tensor& weights, const at::Tensor& shift,
                        const c10::optional<at::Tensor>& inv_freq) {
  checks::kv4("kvcomm.fused_offset", "base", base);
  at::Tensor out = at::empty_like(base, at::MemoryFormat::Contiguous);
  run_offset("kvcomm.fused_offset", out, base, deltas, weights, shift, inv_freq);
  return out;
}

void rope_move_(const at::Tensor& keys, const at::Tensor& inv_freq,
                const at::Tensor& shift) {
  checks::kv4("kvcomm.rope_move_", "keys", keys);
  run_offset("kvcomm.rope_move_", keys, keys, {}, no_weights(keys), shift, inv_freq);
}

at::Tensor rope_move(const at::Tensor& keys, const at::Tensor& inv_freq,
                     const at::Tensor& shift) {
  checks::kv4("kvcomm.rope_move", "keys", keys);
  at::Tensor out = at::empty_like(keys, at::MemoryFormat::Contiguous);
  run_offset("kvcomm.rope_move", out, keys, {}, no_weights(keys), shift, inv_freq);
  return out;
}

}  // namespace cpu
}  // namespace kvcomm
