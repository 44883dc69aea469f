// C++ entry points for the ops: typed dispatcher calls, so C++ users get the
// same device dispatch as torch.ops.kvcomm from Python.
#include "kvcomm/ops.h"

#include <ATen/core/dispatch/Dispatcher.h>

namespace kvcomm {
namespace {

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow(name, "")
      .typed<Signature>();
}

}  // namespace

at::Tensor rope_move(const at::Tensor& keys, const at::Tensor& inv_freq,
                     const at::Tensor& shift) {
  static auto h = op<at::Tensor(const at::Tensor&, const at::Tensor&,
                                const at::Tensor&)>("kvcomm::rope_move");
  return h.call(keys, inv_freq, shift);
}

void rope_move_(const at::Tensor& keys, const at::Tensor& inv_freq,
                const at::Tensor& shift) {
  static auto h = op<void(const at::Tensor&, const at::Tensor&,
                          const at::Tensor&)>("kvcomm::rope_move_");
  h.call(keys, inv_freq, shift);
}

at::Tensor value_distances(const at::Tensor& content, at::TensorList anchors,
                           bool rms, const c10::optional<at::TensorList>& anchor_scales) {
  static auto h = op<at::Tensor(const at::Tensor&, at::TensorList, bool,
                                const c10::optional<at::TensorList>&)>(
      "kvcomm::value_distances");
  return h.call(content, anchors, rms, anchor_scales);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> match_decide(
    const at::Tensor& distances, double tau, double gamma, double top_p) {
  static auto h =
      op<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
          const at::Tensor&, double, double, double)>("kvcomm::match_decide");
  return h.call(distances, tau, gamma, top_p);
}

at::Tensor token_weights(const at::Tensor& base, at::TensorList anchors,
                         double tau, const c10::optional<at::TensorList>& anchor_scales) {
  static auto h = op<at::Tensor(const at::Tensor&, at::TensorList, double,
                                const c10::optional<at::TensorList>&)>(
      "kvcomm::token_weights");
  return h.call(base, anchors, tau, anchor_scales);
}

at::Tensor segment_weights(const at::Tensor& base, at::TensorList anchors,
                           double tau, const c10::optional<at::TensorList>& anchor_scales) {
  static auto h = op<at::Tensor(const at::Tensor&, at::TensorList, double,
                                const c10::optional<at::TensorList>&)>(
      "kvcomm::segment_weights");
  return h.call(base, anchors, tau, anchor_scales);
}

at::Tensor fused_offset(const at::Tensor& base, at::TensorList deltas,
                        const at::Tensor& weights, const at::Tensor& shift,
                        const c10::optional<at::Tensor>& inv_freq,
                        const c10::optional<at::TensorList>& delta_scales) {
  static auto h = op<at::Tensor(const at::Tensor&, at::TensorList,
                                const at::Tensor&, const at::Tensor&,
                                const c10::optional<at::Tensor>&,
                                const c10::optional<at::TensorList>&)>(
      "kvcomm::fused_offset");
  return h.call(base, deltas, weights, shift, inv_freq, delta_scales);
}

void fused_offset_into(const at::Tensor& dst, const at::Tensor& base,
                       at::TensorList deltas, const at::Tensor& weights,
                       const at::Tensor& shift,
                       const c10::optional<at::Tensor>& inv_freq,
                       const c10::optional<at::TensorList>& delta_scales) {
  static auto h = op<void(const at::Tensor&, const at::Tensor&, at::TensorList,
                          const at::Tensor&, const at::Tensor&,
                          const c10::optional<at::Tensor>&,
                          const c10::optional<at::TensorList>&)>(
      "kvcomm::fused_offset_into");
  h.call(dst, base, deltas, weights, shift, inv_freq, delta_scales);
}

at::Tensor token_spread(at::TensorList deltas, const at::Tensor& weights) {
  static auto h = op<at::Tensor(at::TensorList, const at::Tensor&)>("kvcomm::token_spread");
  return h.call(deltas, weights);
}

}  // namespace kvcomm
