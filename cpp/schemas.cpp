// Every kvcomm op schema, in one place. Implementations register under these
// names per dispatch key (cpu_register.cpp, cuda/cuda_register.cu), so the
// dispatcher picks CPU or CUDA by the device of the tensors.
#include <torch/library.h>

// Anchors and deltas may be compact (docs/method.md, "Compact anchors"): int8 or
// float8_e4m3fn codes with one float32 scale tensor [L, H, 1, D] each in
// anchor_scales / delta_scales (value = code * scale), decoded in registers.
TORCH_LIBRARY(kvcomm, m) {
  // Rotate keys [L,H,T,D] by a position shift ([] or [T] int64), exact RoPE move.
  m.def("rope_move(Tensor keys, Tensor inv_freq, Tensor shift) -> Tensor");
  // In-place RoPE move of keys (may be a strided slice of a KV buffer).
  m.def("rope_move_(Tensor(a!) keys, Tensor inv_freq, Tensor shift) -> ()");
  // Distances [N] from content values to the first n tokens of N anchors.
  m.def("value_distances(Tensor content, Tensor[] anchors, bool rms=False, "
      "Tensor[]? anchor_scales=None) -> Tensor");
  // Softmax, entropy gate and top-p credit over distances [N].
  m.def(
      "match_decide(Tensor distances, float tau, float gamma, float top_p) -> "
      "(Tensor probs, Tensor entropy, Tensor share, Tensor credit)");
  // Per-token placeholder weights [N, n].
  m.def("token_weights(Tensor base, Tensor[] anchors, float tau, "
      "Tensor[]? anchor_scales=None) -> Tensor");
  // Per-(layer, head, channel) segment weights [N, L, H, D].
  m.def("segment_weights(Tensor base, Tensor[] anchors, float tau, "
      "Tensor[]? anchor_scales=None) -> Tensor");
  // Moved base + weighted sum of moved deltas (layers >= 1), as a new tensor.
  m.def(
      "fused_offset(Tensor base, Tensor[] deltas, Tensor weights, Tensor shift, "
      "Tensor? inv_freq, Tensor[]? delta_scales=None) -> Tensor");
  // The same, written into a caller-provided destination.
  m.def(
      "fused_offset_into(Tensor(a!) dst, Tensor base, Tensor[] deltas, "
      "Tensor weights, Tensor shift, Tensor? inv_freq, Tensor[]? delta_scales=None) -> ()");
  // Per-token spread [n] of N anchors' deltas under per-token weights [N, n]:
  // how much the anchors disagree on each token's offset (layers >= 1).
  m.def("token_spread(Tensor[] deltas, Tensor weights) -> Tensor");
}
