// Torch-free numerical kernels shared by the CPU and CUDA implementations.
//
// Everything here works on raw pointers and element strides so one definition
// serves both back ends (FlashInfer-style: the math never includes torch).
// Accumulation is always in float; storage types (float, c10::Half,
// c10::BFloat16) convert with static_cast on host and device alike.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define KVCOMM_HD __host__ __device__ __forceinline__
#else
#define KVCOMM_HD inline
#endif

namespace kvcomm {
namespace math {

// Strides of a 4-D [layers, heads, tokens, head_dim] view, in elements.
struct Strides4 {
  int64_t layer, head, token, dim;
  KVCOMM_HD int64_t at(int64_t l, int64_t h, int64_t t, int64_t d) const {
    return l * layer + h * head + t * token + d * dim;
  }
};

// Angle of a RoPE move for channel pair i: shift * inv_freq[i], computed in
// float like transformers computes position * inv_freq, so a moved key and a
// key the model computes at the new position agree to float rounding.
KVCOMM_HD float rope_angle(int64_t shift, float inv_freq) {
  return static_cast<float>(shift) * inv_freq;
}

// Rotate-half RoPE applied to one channel pair (x1 = channel i, x2 = channel
// i + head_dim/2) by an angle whose cosine and sine are given. Rotations
// compose additively, so rotating a cached key by shift*inv_freq moves it
// exactly by `shift` positions; no attention scaling is applied here because
// the cached key already carries it.
KVCOMM_HD void rotate_pair(float x1, float x2, float cos_a, float sin_a,
                           float* out1, float* out2) {
  *out1 = x1 * cos_a - x2 * sin_a;
  *out2 = x2 * cos_a + x1 * sin_a;
}

// Entropy in bits of a probability vector (0 log 0 = 0).
KVCOMM_HD float entropy_bits(const float* p, int64_t n) {
  float h = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    if (p[i] > 0.f) h -= p[i] * log2f(p[i]);
  }
  return h;
}

// In-place softmax of -x / tau over n values x[0], x[stride], ... (distances
// or scores): the weighting used by matching and both weight computations.
// Stable: the smallest distance gets exponent 0. The stride lets a CUDA
// finalize kernel normalise one column of an [N, tokens] or [N, channels]
// output in place with exactly the CPU's arithmetic.
KVCOMM_HD void softmax_neg_over_tau_strided(float* x, int64_t n, int64_t stride,
                                            float tau) {
  if (n <= 0) return;
  float mn = x[0];
  for (int64_t i = 1; i < n; ++i) mn = x[i * stride] < mn ? x[i * stride] : mn;
  float sum = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    x[i * stride] = expf(-(x[i * stride] - mn) / tau);
    sum += x[i * stride];
  }
  for (int64_t i = 0; i < n; ++i) x[i * stride] /= sum;
}

// The same over n contiguous values.
KVCOMM_HD void softmax_neg_over_tau(float* x, int64_t n, float tau) {
  softmax_neg_over_tau_strided(x, n, 1, tau);
}

// Sine and cosine of a RoPE angle. On the device this is the accurate
// sincosf (never the fast-math intrinsics, which lose digits for the large
// angles of far positions); on the host the float std::sin / std::cos the CPU
// path uses, so both back ends agree to the last bits the libraries allow.
KVCOMM_HD void sin_cos(float angle, float* s, float* c) {
#if defined(__CUDA_ARCH__)
  sincosf(angle, s, c);
#else
  *s = std::sin(angle);
  *c = std::cos(angle);
#endif
}

// The share-or-anchor gate of docs/method.md, "Deciding" for probabilities p (already a
// softmax over n candidates): share when n >= 2 and the entropy is at most
// gamma * log2(n). On share, credit marks the smallest set of most probable
// anchors whose probability sums to top_p (ties broken by lower index).
// `order` is scratch space of n indices. Returns whether to share.
KVCOMM_HD bool decide_share(const float* p, int64_t n, float gamma, float top_p,
                            float* entropy_out, bool* credit, int64_t* order) {
  const float h = entropy_bits(p, n);
  *entropy_out = h;
  for (int64_t i = 0; i < n; ++i) credit[i] = false;
  if (n < 2) return false;
  if (h > gamma * log2f(static_cast<float>(n))) return false;
  // Insertion sort by descending probability; n is a pool's capacity (tens).
  for (int64_t i = 0; i < n; ++i) {
    int64_t j = i;
    while (j > 0 && p[order[j - 1]] < p[i]) {
      order[j] = order[j - 1];
      --j;
    }
    order[j] = i;
  }
  float cum = 0.f;
  for (int64_t k = 0; k < n; ++k) {
    credit[order[k]] = true;
    cum += p[order[k]];
    if (cum >= top_p) break;
  }
  return true;
}

// The whole decision of docs/method.md, "Deciding" from distances: x holds the N
// distances on entry and the probabilities on exit. A non-finite distance
// (NaN/Inf in the values) must never look like a confident match: then no
// share, no credit, and the entropy is NaN.
KVCOMM_HD bool match_decide_inplace(float* x, int64_t n, float tau, float gamma,
                                    float top_p, float* entropy_out,
                                    bool* credit, int64_t* order) {
  bool finite = true;
  // x - x is 0 exactly for finite x and NaN for NaN/Inf; portable to host
  // and device without std::isfinite vs ::isfinite.
  for (int64_t i = 0; i < n; ++i) finite = finite && (x[i] - x[i] == 0.f);
  softmax_neg_over_tau(x, n, tau);
  if (!finite) {
    for (int64_t i = 0; i < n; ++i) credit[i] = false;
    *entropy_out = NAN;
    return false;
  }
  return decide_share(x, n, gamma, top_p, entropy_out, credit, order);
}

}  // namespace math
}  // namespace kvcomm
