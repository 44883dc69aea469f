// CPU offset weights (docs/method.md section 5): per-token weights for placeholder
// tokens and per-(layer, head, channel) weights for the following segment.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <cmath>
#include <vector>

#include "cpu_ops.h"
#include "kvcomm/math.h"
#include "op_checks.h"

namespace kvcomm {
namespace cpu {

namespace {

template <typename scalar_t>
scalar_t at4(const at::Tensor& x, const scalar_t* p, int64_t l, int64_t h,
             int64_t t, int64_t d) {
  return p[l * x.stride(0) + h * x.stride(1) + t * x.stride(2) + d * x.stride(3)];
}

}  // namespace

at::Tensor token_weights(const at::Tensor& base, at::TensorList anchors,
                         double tau) {
  const char* op = "kvcomm.token_weights";
  const auto s = checks::kv4(op, "base", base);
  checks::anchors(op, "anchors", base, s, anchors);
  checks::tau(op, tau);
  const int64_t n = static_cast<int64_t>(anchors.size());
  // Scores laid out [tokens, N] while computing so each token's softmax is
  // over a contiguous row; transposed to [N, tokens] at the end.
  at::Tensor scores = at::empty({s.tokens, n}, base.options().dtype(at::kFloat));
  float* sc = scores.data_ptr<float>();
  const double count = static_cast<double>(s.layers * s.heads * s.dim);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, base.scalar_type(), "kvcomm.token_weights", [&] {
    const scalar_t* bp = base.data_ptr<scalar_t>();
    at::parallel_for(0, s.tokens, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        for (int64_t u = 0; u < n; ++u) {
          const scalar_t* ap = anchors[u].data_ptr<scalar_t>();
          double acc = 0;
          for (int64_t l = 0; l < s.layers; ++l)
            for (int64_t h = 0; h < s.heads; ++h)
              for (int64_t d = 0; d < s.dim; ++d)
                acc += std::fabs(static_cast<float>(at4(base, bp, l, h, t, d)) -
                                 static_cast<float>(at4(anchors[u], ap, l, h, t, d)));
          sc[t * n + u] = count > 0 ? static_cast<float>(acc / count) : 0.f;
        }
        math::softmax_neg_over_tau(sc + t * n, n, static_cast<float>(tau));
      }
    });
  });
  return scores.t().contiguous();
}

at::Tensor segment_weights(const at::Tensor& base, at::TensorList anchors,
                           double tau) {
  const char* op = "kvcomm.segment_weights";
  const auto s = checks::kv4(op, "base", base);
  checks::anchors(op, "anchors", base, s, anchors);
  checks::tau(op, tau);
  const int64_t n = static_cast<int64_t>(anchors.size());
  const int64_t channels = s.layers * s.heads * s.dim;
  // [channels, N] while computing (softmax per channel), [N, L, H, D] after.
  at::Tensor scores = at::empty({channels, n}, base.options().dtype(at::kFloat));
  float* sc = scores.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, base.scalar_type(), "kvcomm.segment_weights", [&] {
    const scalar_t* bp = base.data_ptr<scalar_t>();
    at::parallel_for(0, s.layers * s.heads, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> acc(s.dim);
      for (int64_t lh = begin; lh < end; ++lh) {
        const int64_t l = lh / s.heads, h = lh % s.heads;
        for (int64_t u = 0; u < n; ++u) {
          const scalar_t* ap = anchors[u].data_ptr<scalar_t>();
          // The anchor's last n tokens line up with the content's tokens.
          const int64_t first = anchors[u].size(2) - s.tokens;
          std::fill(acc.begin(), acc.end(), 0.f);
          for (int64_t t = 0; t < s.tokens; ++t)
            for (int64_t d = 0; d < s.dim; ++d) {
              const float diff = static_cast<float>(at4(base, bp, l, h, t, d)) -
                                 static_cast<float>(at4(anchors[u], ap, l, h, first + t, d));
              acc[d] += diff * diff;
            }
          for (int64_t d = 0; d < s.dim; ++d)
            sc[(lh * s.dim + d) * n + u] = std::sqrt(acc[d]);
        }
        for (int64_t d = 0; d < s.dim; ++d)
          math::softmax_neg_over_tau(sc + (lh * s.dim + d) * n, n, static_cast<float>(tau));
      }
    });
  });
  return scores.t().contiguous().view({n, s.layers, s.heads, s.dim});
}

}  // namespace cpu
}  // namespace kvcomm
