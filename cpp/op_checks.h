// Argument validation shared by the CPU and CUDA launchers. Every user error
// is a TORCH_CHECK that names the op, the argument, what was expected and
// what was given.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

#include "kvcomm/codes.h"

namespace kvcomm {
namespace checks {

// Shape of one content KV tensor [layers, kv_heads, tokens, head_dim].
struct KVShape {
  int64_t layers, heads, tokens, dim;
};

// A floating KV tensor (float32/bfloat16/float16) of rank 4.
KVShape kv4(const char* op, const char* arg, const at::Tensor& t);

// `t` has the device and dtype of `like`.
void same_device_dtype(const char* op, const char* arg, const at::Tensor& t,
                       const char* like_arg, const at::Tensor& like);

// float32 [head_dim/2] on the device of `like`; head_dim must be even.
void inv_freq(const char* op, const at::Tensor& inv_freq, int64_t head_dim,
              const at::Tensor& like);

// int64 [] / [1] (one shift) or [tokens] (one per token) on the device of
// `like`. Returns true when the shift is per token.
bool shift(const char* op, const at::Tensor& shift, int64_t tokens,
           const at::Tensor& like);

// Every anchor matches `content` in layers, heads, head_dim, dtype and device
// and has at least content.tokens tokens.
void anchors(const char* op, const char* arg, const at::Tensor& content,
             const KVShape& shape, at::TensorList anchors);

// Anchors (or deltas) that may be compact. Without `scales` they are checked
// by anchors() (the content's dtype) and read as kPlain. With `scales` they
// are int8 or float8_e4m3fn codes, all of one dtype, each [L, H, >= T, D] on
// the content's device, with one float32 scale tensor [L, H, 1, D] each (same
// device): value = code * scale. An empty list is kPlain either way.
Codes anchor_codes(const char* op, const char* arg, const at::Tensor& content,
                   const KVShape& shape, at::TensorList list,
                   const c10::optional<at::TensorList>& scales);

// Whether some element of `a` and some element of `b` share a byte of memory.
// Exact for strided views (a slice of a [L, H, Tmax, D] buffer against
// another slice of it is not an overlap unless their elements meet), and
// conservative (true) in the rare layouts it cannot settle in a bounded
// search. Unlike at::get_overlap_status, it does not give up on views that
// are not dense, which is what dst usually is.
bool may_share_memory(const at::Tensor& a, const at::Tensor& b);

// An op that writes dst while it reads `t` must not see them overlap: a
// kernel thread could read an element another thread already overwrote (on
// a GPU, a race). allow_same: t may be exactly dst (same start, shape and
// strides), an in-place call, where every element is read before it is
// written by the same thread.
void no_overlap(const char* op, const at::Tensor& dst, const char* arg,
                const at::Tensor& t, bool allow_same);

// Everything fused_offset needs, checked once for both back ends. Includes
// no_overlap between dst and every input (base may be dst itself).
struct OffsetPlan {
  KVShape shape;
  int64_t num_deltas;
  bool per_token_weights;  // weights [N,T]; otherwise [N,L,H,D]
  bool per_token_shift;
  bool rotate;             // inv_freq given: keys
  Codes codes = Codes::kPlain;  // how the deltas are read (anchor_codes)
};
// delta_scales: compact deltas, as for anchor_codes. stored_deltas >= 0: the
// deltas are that many tensors of the anchor pool in a form the kernels read
// but the ops do not take (bfloat16 under a float32 model), checked when they
// were stored (and never dst); pass no `deltas` then.
OffsetPlan offset(const char* op, const at::Tensor& dst, const at::Tensor& base,
                  at::TensorList deltas, const at::Tensor& weights,
                  const at::Tensor& shift,
                  const c10::optional<at::Tensor>& inv_freq,
                  const c10::optional<at::TensorList>& delta_scales = c10::nullopt,
                  int64_t stored_deltas = -1);

// float32 [N] distances.
void distances(const char* op, const at::Tensor& distances);

// tau > 0, gamma >= 0, 0 < top_p <= 1.
void decide_params(const char* op, double tau, double gamma, double top_p);
void tau(const char* op, double tau);

}  // namespace checks
}  // namespace kvcomm
