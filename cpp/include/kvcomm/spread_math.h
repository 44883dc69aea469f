// Torch-free math of the per-token spread (kvcomm::token_spread), shared by
// the CPU and CUDA implementations: how much N anchors disagree on one
// element's offset, as the weighted variance of their deltas.
#pragma once

#include <cstdint>

#include "kvcomm/math.h"

namespace kvcomm {
namespace math {

// Running sums of one element's weighted variance across anchors, taken
// relative to the first anchor's value (x - x0) so that a large common offset
// does not cancel the small spread around it in float.
struct SpreadSums {
  float x0 = 0.f;  // the reference value (first anchor)
  float m1 = 0.f;  // sum_u w_u (x_u - x0)
  float m2 = 0.f;  // sum_u w_u (x_u - x0)^2

  KVCOMM_HD void add(float w, float x, bool first) {
    if (first) x0 = x;
    const float d = x - x0;
    m1 += w * d;
    m2 += w * d * d;
  }
  // Weighted variance for weights that sum to 1; never negative.
  KVCOMM_HD float variance() const {
    const float v = m2 - m1 * m1;
    return v > 0.f ? v : 0.f;
  }
};

// Per-token spread from the summed variances of its (layers - 1) * heads *
// dim elements: the root of their mean. 0 when there is nothing to average.
KVCOMM_HD float spread_from_sum(double variance_sum, int64_t count) {
  return count > 0 ? static_cast<float>(sqrt(variance_sum / static_cast<double>(count))) : 0.f;
}

}  // namespace math
}  // namespace kvcomm
