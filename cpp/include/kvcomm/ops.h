// Public C++ API of the kvcomm ops. Each function goes through the PyTorch
// dispatcher, so it runs the CPU or CUDA implementation by the device of its
// tensors, exactly like torch.ops.kvcomm.<name> from Python.
//
// Content KV layout everywhere: [layers, kv_heads, tokens, head_dim].
//
// Compact anchors / deltas (docs/method.md, "Compact anchors"): pass int8 or
// float8_e4m3fn codes with `anchor_scales` / `delta_scales`, one float32
// [layers, kv_heads, 1, head_dim] tensor per code tensor; the value read is
// code * scale, decoded in the kernels' registers (no decoded copy).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace kvcomm {

// Keys rotated by `shift` positions (int64, shape [] or [tokens]) with the
// model's rotate-half RoPE frequencies `inv_freq` (float32 [head_dim/2]).
at::Tensor rope_move(const at::Tensor& keys, const at::Tensor& inv_freq,
                     const at::Tensor& shift);
// In-place variant; `keys` may be a strided slice of a larger buffer.
void rope_move_(const at::Tensor& keys, const at::Tensor& inv_freq,
                const at::Tensor& shift);

// float32 [N]: distance from `content` values [L,H,n,D] to the first n tokens
// of each anchor's values [L,H,m_u>=n,D]; Frobenius norm, or per-element RMS
// when `rms`.
at::Tensor value_distances(const at::Tensor& content, at::TensorList anchors,
                           bool rms,
                           const c10::optional<at::TensorList>& anchor_scales = c10::nullopt);

// The share-or-anchor decision from distances [N]: (probs [N] float32,
// entropy [] float32 in bits, share [] bool, credit [N] bool).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> match_decide(
    const at::Tensor& distances, double tau, double gamma, double top_p);

// float32 [N, n]: per-token placeholder weights, softmax over anchors of
// -mean|base[t] - anchor_u[t]| / tau.
at::Tensor token_weights(const at::Tensor& base, at::TensorList anchors,
                         double tau,
                         const c10::optional<at::TensorList>& anchor_scales = c10::nullopt);
// float32 [N, L, H, D]: per-channel segment weights, softmax over anchors of
// -||base - anchor_u[-n:]||_tokens / tau.
at::Tensor segment_weights(const at::Tensor& base, at::TensorList anchors,
                           double tau,
                           const c10::optional<at::TensorList>& anchor_scales = c10::nullopt);

// base [L,H,T,D] plus, for layers >= 1, the weighted sum of deltas
// (each [L,H,>=T,D], first T tokens used) with weights [N,T] (per token) or
// [N,L,H,D] (per channel), then rotated by `shift` when inv_freq is given
// (keys) or left unrotated when it is not (values).
at::Tensor fused_offset(const at::Tensor& base, at::TensorList deltas,
                        const at::Tensor& weights, const at::Tensor& shift,
                        const c10::optional<at::Tensor>& inv_freq,
                        const c10::optional<at::TensorList>& delta_scales = c10::nullopt);
// Same, written into `dst` [L,H,T,D] (any strides, e.g. a KV-buffer slice).
void fused_offset_into(const at::Tensor& dst, const at::Tensor& base,
                       at::TensorList deltas, const at::Tensor& weights,
                       const at::Tensor& shift,
                       const c10::optional<at::Tensor>& inv_freq,
                       const c10::optional<at::TensorList>& delta_scales = c10::nullopt);

// float32 [n]: per-token spread of N deltas [L,H,>=n,D] under per-token
// weights [N, n] (each column summing to 1): the square root of the weighted
// variance across anchors, averaged over layers >= 1, heads and channels.
// Where the anchors disagree on a token's offset its estimate is least sure;
// a recompute policy ranks tokens by it. Zeros when N < 2 or L == 1.
at::Tensor token_spread(at::TensorList deltas, const at::Tensor& weights);

}  // namespace kvcomm
