// CPU implementation of kvcomm::token_spread: per token, the weighted variance
// of N anchors' deltas across anchors, averaged over layers >= 1, heads and
// channels (layer 0 carries no offset). One pass over each delta row; tokens
// are independent, so threads split them.
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <vector>

#include "dispatch.h"
#include "kvcomm/spread_math.h"
#include "spread.h"

namespace kvcomm {
namespace cpu {
namespace {

template <typename scalar_t>
void spread_kernel(const checks::SpreadPlan& p, at::TensorList deltas, const float* w,
                   float* out) {
  const int64_t n = p.num_deltas;
  std::vector<const scalar_t*> ptr(n);
  std::vector<int64_t> sl(n), sh(n), st(n), sd(n);
  for (int64_t u = 0; u < n; ++u) {
    ptr[u] = deltas[u].data_ptr<scalar_t>();
    sl[u] = deltas[u].stride(0);
    sh[u] = deltas[u].stride(1);
    st[u] = deltas[u].stride(2);
    sd[u] = deltas[u].stride(3);
  }
  const int64_t count = (p.layers - 1) * p.heads * p.dim;
  at::parallel_for(0, p.tokens, 8, [&](int64_t begin, int64_t end) {
    std::vector<math::SpreadSums> row(p.dim);
    for (int64_t t = begin; t < end; ++t) {
      double total = 0.0;  // per token: (L-1)*H*D variances
      for (int64_t l = 1; l < p.layers; ++l) {
        for (int64_t h = 0; h < p.heads; ++h) {
          std::fill(row.begin(), row.end(), math::SpreadSums{});
          for (int64_t u = 0; u < n; ++u) {
            const float wu = w[u * p.tokens + t];
            const scalar_t* x = ptr[u] + l * sl[u] + h * sh[u] + t * st[u];
            const int64_t s = sd[u];
            for (int64_t d = 0; d < p.dim; ++d)
              row[d].add(wu, static_cast<float>(x[d * s]), u == 0);
          }
          float part = 0.f;
          for (int64_t d = 0; d < p.dim; ++d) part += row[d].variance();
          total += part;
        }
      }
      out[t] = math::spread_from_sum(total, count);
    }
  });
}

at::Tensor token_spread(at::TensorList deltas, const at::Tensor& weights) {
  const checks::SpreadPlan plan = checks::token_spread("kvcomm.token_spread", deltas, weights);
  at::Tensor out = at::zeros({plan.tokens}, weights.options());
  if (plan.num_deltas < 2 || plan.layers < 2 || plan.tokens == 0) return out;
  const at::Tensor wc = weights.contiguous();
  KVCOMM_DISPATCH_KV_TYPES(deltas[0].scalar_type(), "kvcomm.token_spread", [&] {
    spread_kernel<scalar_t>(plan, deltas, wc.data_ptr<float>(), out.data_ptr<float>());
  });
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace kvcomm

TORCH_LIBRARY_IMPL(kvcomm, CPU, m) {
  m.impl("token_spread", &kvcomm::cpu::token_spread);
}
