// The estimate of one slot on the CPU, fused: what AnchorPool::estimate
// computes with four weight ops and four offset ops, in two passes.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "cpu_kernels.h"
#include "kvcomm/anchor_pool.h"

namespace kvcomm {
namespace cpu {

// The usable anchors of a slot for one agent, as AnchorPool::estimate
// collects them: bases (K, V), the agent's placeholder deltas and, when the
// request has a segment, its segment deltas. Compact anchors (form int8 or
// fp8, docs/method.md, "Compact anchors") are read as stored, each tensor with its
// float32 scales [L, H, 1, D] in the matching *_scale list, and decoded in
// the kernels' registers.
struct SlotAnchors {
  std::vector<at::Tensor> base_k, base_v, ph_k, ph_v, seg_k, seg_v;
  std::vector<at::Tensor> base_k_scale = {}, base_v_scale = {}, ph_k_scale = {}, ph_v_scale = {},
                          seg_k_scale = {}, seg_v_scale = {};
  StoreForm form = StoreForm::kDense;
};

// Distances of `content_v` to the slot's anchor values, dense or compact, as
// value_distances computes them: float32 [N].
at::Tensor stored_distances(const char* op, const at::Tensor& content_v,
                            const std::vector<at::Tensor>& values,
                            const std::vector<at::Tensor>& scales, StoreForm form, bool rms);

// Writes req's destinations exactly as the op sequence does (token weights
// and fused offsets for K and V, and with a segment the segment weights and
// their fused offsets) for CPU tensors. Pass 1 reads the content and every
// anchor base once for both weightings of K and of V - skipped when `given`
// holds them (an earlier agent's estimate of the same content from the same
// anchors); pass 2 streams every delta once into the destinations. Each pass
// is one parallel region. Returns the weights used: the segment's too, even
// without a segment here, so a later agent with one can take them.
EstimateWeights estimate_slot(const char* op, const EstimateRequest& req, const SlotAnchors& a,
                              double tau, const EstimateWeights* given);

}  // namespace cpu
}  // namespace kvcomm
