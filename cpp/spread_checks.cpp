#include "spread.h"

#include <string>

#include "op_checks.h"

namespace kvcomm {
namespace checks {

SpreadPlan token_spread(const char* op, at::TensorList deltas, const at::Tensor& weights) {
  TORCH_CHECK(weights.defined(), op, ": weights is undefined");
  TORCH_CHECK(weights.scalar_type() == at::kFloat, op, ": weights must be float32, got ",
              weights.scalar_type());
  const int64_t n_deltas = static_cast<int64_t>(deltas.size());
  TORCH_CHECK(weights.dim() == 2 && weights.size(0) == n_deltas, op,
              ": weights must be [num_deltas, tokens] = [", n_deltas, ", tokens], got ",
              weights.sizes());
  SpreadPlan plan{n_deltas, weights.size(1), 0, 0, 0};
  if (n_deltas == 0) return plan;
  const KVShape first = kv4(op, "deltas[0]", deltas[0]);
  plan.layers = first.layers;
  plan.heads = first.heads;
  plan.dim = first.dim;
  TORCH_CHECK(weights.device() == deltas[0].device(), op, ": weights are on ",
              weights.device(), " but deltas[0] is on ", deltas[0].device());
  // Every delta has the first one's layout and at least n tokens.
  anchors(op, "deltas", deltas[0], KVShape{first.layers, first.heads, plan.tokens, first.dim},
          deltas);
  return plan;
}

}  // namespace checks
}  // namespace kvcomm
