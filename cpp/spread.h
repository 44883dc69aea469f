// Argument checks of kvcomm::token_spread, shared by the CPU and CUDA
// implementations (every user error names the op, the argument, what was
// expected and what was given).
#pragma once

#include <ATen/core/Tensor.h>

namespace kvcomm {
namespace checks {

struct SpreadPlan {
  int64_t num_deltas;  // N
  int64_t tokens;      // n, from weights [N, n]
  int64_t layers, heads, dim;  // of the deltas (0 when N == 0)
};

// deltas: N tensors [L,H,>=n,D] of one dtype, device and (L,H,D);
// weights: float32 [N, n] on their device.
SpreadPlan token_spread(const char* op, at::TensorList deltas, const at::Tensor& weights);

}  // namespace checks
}  // namespace kvcomm
