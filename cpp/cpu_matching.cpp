// CPU matching: distances from new content to every candidate anchor, and the
// share-or-anchor decision (docs/method.md section 4).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <cmath>
#include <vector>

#include "cpu_ops.h"
#include "kvcomm/math.h"
#include "op_checks.h"

namespace kvcomm {
namespace cpu {

namespace {

// Sum of squared differences between content and anchor u over the first n
// tokens of row (l, h), in double so millions of terms do not lose digits.
template <typename scalar_t>
double row_sq_diff(const at::Tensor& c, const at::Tensor& a, int64_t l,
                   int64_t h, int64_t n, int64_t dim) {
  const scalar_t* cp = c.data_ptr<scalar_t>();
  const scalar_t* ap = a.data_ptr<scalar_t>();
  double acc = 0;
  for (int64_t t = 0; t < n; ++t) {
    float part = 0.f;
    for (int64_t d = 0; d < dim; ++d) {
      const float diff =
          static_cast<float>(cp[l * c.stride(0) + h * c.stride(1) + t * c.stride(2) + d * c.stride(3)]) -
          static_cast<float>(ap[l * a.stride(0) + h * a.stride(1) + t * a.stride(2) + d * a.stride(3)]);
      part += diff * diff;
    }
    acc += part;
  }
  return acc;
}

}  // namespace

at::Tensor value_distances(const at::Tensor& content, at::TensorList anchors,
                           bool rms) {
  const char* op = "kvcomm.value_distances";
  const auto s = checks::kv4(op, "content", content);
  checks::anchors(op, "anchors", content, s, anchors);
  const int64_t n_anchors = static_cast<int64_t>(anchors.size());
  const int64_t rows = s.layers * s.heads;
  std::vector<double> partial(n_anchors * rows, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, content.scalar_type(), "kvcomm.value_distances", [&] {
    at::parallel_for(0, n_anchors * rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t u = i / rows, lh = i % rows;
        partial[i] = row_sq_diff<scalar_t>(content, anchors[u], lh / s.heads,
                                           lh % s.heads, s.tokens, s.dim);
      }
    });
  });
  at::Tensor out = at::empty({n_anchors}, content.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  const double numel = static_cast<double>(rows * s.tokens * s.dim);
  for (int64_t u = 0; u < n_anchors; ++u) {
    double sum = 0;
    for (int64_t r = 0; r < rows; ++r) sum += partial[u * rows + r];
    if (rms) sum = numel > 0 ? sum / numel : 0.0;
    o[u] = static_cast<float>(std::sqrt(sum));
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> match_decide(
    const at::Tensor& distances, double tau, double gamma, double top_p) {
  const char* op = "kvcomm.match_decide";
  checks::distances(op, distances);
  checks::decide_params(op, tau, gamma, top_p);
  const int64_t n = distances.size(0);
  at::Tensor probs = distances.contiguous().clone();
  at::Tensor entropy = at::zeros({}, distances.options());
  at::Tensor share = at::zeros({}, distances.options().dtype(at::kBool));
  at::Tensor credit = at::zeros({n}, distances.options().dtype(at::kBool));
  std::vector<int64_t> order(n);
  float* p = probs.data_ptr<float>();
  const bool sh = math::match_decide_inplace(
      p, n, static_cast<float>(tau), static_cast<float>(gamma),
      static_cast<float>(top_p), entropy.data_ptr<float>(),
      credit.data_ptr<bool>(), order.data());
  share.fill_(sh);
  return {probs, entropy, share, credit};
}

}  // namespace cpu
}  // namespace kvcomm
