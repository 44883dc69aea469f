// The CPU weights and offsets over any number of jobs in one parallel region
// each: an op runs one job; the estimate of a slot (cpu_estimate.cpp) runs its
// K and V jobs together, so the threads split all of the slot's work at once.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "cpu_kernels.h"
#include "op_checks.h"

namespace kvcomm {
namespace cpu {

// Token weights [N, T] and/or segment weights [N, L, H, D] (float32) of
// `base` [L, H, T, D] against `anchors` (each [L, H, >= T, D]), already
// checked. Asking for both reads every anchor token once. Compact anchors
// (form int8 / fp8) come with one float32 scale tensor [L, H, 1, D] each.
struct WeightsJob {
  at::Tensor base;
  std::vector<at::Tensor> anchors;
  bool token = false, segment = false;
  std::vector<at::Tensor> anchor_scales = {};
  StoreForm anchor_form = StoreForm::kDense;
};
struct WeightsOut {
  at::Tensor token, segment;  // undefined when not asked for
};
std::vector<WeightsOut> compute_weights(const std::vector<WeightsJob>& jobs, double tau);

// One fused offset (or RoPE move: no deltas), already checked into `plan`;
// compact deltas as for WeightsJob.
struct OffsetJob {
  at::Tensor dst, base;
  std::vector<at::Tensor> deltas;
  at::Tensor weights, shift;
  c10::optional<at::Tensor> inv_freq;
  checks::OffsetPlan plan;
  std::vector<at::Tensor> delta_scales = {};
  StoreForm delta_form = StoreForm::kDense;
};

// Distances (docs/method.md, "Deciding") of `content` to already checked
// anchors, dense or compact: float32 [N].
at::Tensor distances(const at::Tensor& content, at::TensorList anchors, at::TensorList scales,
                     StoreForm form, bool rms);
void apply_offsets(const std::vector<OffsetJob>& jobs);

}  // namespace cpu
}  // namespace kvcomm
