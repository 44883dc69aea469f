// The estimate of one slot on the CPU, fused: what AnchorPool::estimate
// computes with four weight ops and four offset ops, in two passes.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "kvcomm/anchor_pool.h"

namespace kvcomm {
namespace cpu {

// The usable anchors of a slot for one agent, as AnchorPool::estimate
// collects them: bases (K, V), the agent's placeholder deltas and, when the
// request has a segment, its segment deltas.
struct SlotAnchors {
  std::vector<at::Tensor> base_k, base_v, ph_k, ph_v, seg_k, seg_v;
};

// The placeholder's token weights, which the caller may need again.
struct SlotWeights {
  at::Tensor token_k, token_v;  // float32 [N, n]
};

// Writes req's destinations exactly as the op sequence does (token weights
// and fused offsets for K and V, and with a segment the segment weights and
// their fused offsets) for CPU tensors. Pass 1 reads the content and every
// anchor base once for both weightings of K and of V; pass 2 streams every
// delta once into the destinations. Each pass is one parallel region.
SlotWeights estimate_slot(const char* op, const EstimateRequest& req, const SlotAnchors& a,
                          double tau);

}  // namespace cpu
}  // namespace kvcomm
