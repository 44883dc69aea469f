// CPU matching: distances from new content to every candidate anchor, and the
// share-or-anchor decision (docs/method.md, "Deciding").
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <cmath>
#include <vector>

#include "cpu_kernels.h"
#include "cpu_ops.h"
#include "cpu_runners.h"
#include "cpu_views.h"
#include "kvcomm/math.h"
#include "op_checks.h"

namespace kvcomm {
namespace cpu {

at::Tensor value_distances(const at::Tensor& content, at::TensorList anchors, bool rms,
                           const c10::optional<at::TensorList>& anchor_scales) {
  const char* op = "kvcomm.value_distances";
  const auto s = checks::kv4(op, "content", content);
  const Codes codes = checks::anchor_codes(op, "anchors", content, s, anchors, anchor_scales);
  return distances(content, anchors, codes == Codes::kPlain ? at::TensorList() : *anchor_scales,
                   form_of(codes), rms);
}

at::Tensor distances(const at::Tensor& content, at::TensorList anchors, at::TensorList scales,
                     StoreForm form, bool rms) {
  const char* op = "kvcomm.value_distances";
  const int64_t n = static_cast<int64_t>(anchors.size());
  const Dims dims = dims_of(content);
  const int64_t chunks = row_chunks(dims.rows());
  // Squared sums per (row chunk, anchor) in double: a distance sums millions
  // of terms. Added up in chunk order below, whatever the thread count.
  std::vector<double> partial(chunks * n, 0.0);
  Inputs in;
  const std::vector<RowsIn> anchor_rows = in.rows(anchors, scales);
  const DistancePlan plan{kv_type(content, op), dims,   in.rows(content), anchor_rows.data(),
                          n,                    chunks, partial.data(),   /*token_block=*/0,
                          form};
  const KernelTable& k = kernels();
  const int64_t per_chunk = dims.rows() * dims.tokens * dims.dim * (n + 1) / chunks;
  if (n > 0) {
    at::parallel_for(0, chunks, grain(per_chunk),
                     [&](int64_t begin, int64_t end) { k.distances(plan, begin, end); });
  }
  at::Tensor out = at::empty({n}, content.options().dtype(at::kFloat));
  float* o = out.mutable_data_ptr<float>();
  const double numel = static_cast<double>(dims.rows() * dims.tokens * dims.dim);
  for (int64_t u = 0; u < n; ++u) {
    double sum = 0;
    for (int64_t c = 0; c < chunks; ++c) sum += partial[c * n + u];
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
  float* p = probs.mutable_data_ptr<float>();
  const bool sh = math::match_decide_inplace(
      p, n, static_cast<float>(tau), static_cast<float>(gamma),
      static_cast<float>(top_p), entropy.mutable_data_ptr<float>(),
      credit.mutable_data_ptr<bool>(), order.data());
  share.fill_(sh);
  return {probs, entropy, share, credit};
}

}  // namespace cpu
}  // namespace kvcomm
