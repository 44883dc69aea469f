// The CPU weights and offsets over any number of jobs in one parallel region
// each: an op runs one job; the estimate of a slot (cpu_estimate.cpp) runs its
// K and V jobs together, so the threads split all of the slot's work at once.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "op_checks.h"

namespace kvcomm {
namespace cpu {

// Token weights [N, T] and/or segment weights [N, L, H, D] (float32) of
// `base` [L, H, T, D] against `anchors` (each [L, H, >= T, D]), already
// checked. Asking for both reads every anchor token once.
struct WeightsJob {
  at::Tensor base;
  std::vector<at::Tensor> anchors;
  bool token = false, segment = false;
};
struct WeightsOut {
  at::Tensor token, segment;  // undefined when not asked for
};
std::vector<WeightsOut> compute_weights(const std::vector<WeightsJob>& jobs, double tau);

// One fused offset (or RoPE move: no deltas), already checked into `plan`.
struct OffsetJob {
  at::Tensor dst, base;
  std::vector<at::Tensor> deltas;
  at::Tensor weights, shift;
  c10::optional<at::Tensor> inv_freq;
  checks::OffsetPlan plan;
};
void apply_offsets(const std::vector<OffsetJob>& jobs);

}  // namespace cpu
}  // namespace kvcomm
