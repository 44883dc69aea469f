// CPU implementations of the kvcomm ops (registered in cpu_register.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace kvcomm {
namespace cpu {

at::Tensor rope_move(const at::Tensor& keys, const at::Tensor& inv_freq,
                     const at::Tensor& shift);
void rope_move_(const at::Tensor& keys, const at::Tensor& inv_freq,
                const at::Tensor& shift);
// anchor_scales / delta_scales: compact anchors (checks::anchor_codes).
at::Tensor value_distances(const at::Tensor& content, at::TensorList anchors,
                           bool rms, const c10::optional<at::TensorList>& anchor_scales);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> match_decide(
    const at::Tensor& distances, double tau, double gamma, double top_p);
at::Tensor token_weights(const at::Tensor& base, at::TensorList anchors,
                         double tau, const c10::optional<at::TensorList>& anchor_scales);
at::Tensor segment_weights(const at::Tensor& base, at::TensorList anchors,
                           double tau, const c10::optional<at::TensorList>& anchor_scales);
at::Tensor fused_offset(const at::Tensor& base, at::TensorList deltas,
                        const at::Tensor& weights, const at::Tensor& shift,
                        const c10::optional<at::Tensor>& inv_freq,
                        const c10::optional<at::TensorList>& delta_scales);
void fused_offset_into(const at::Tensor& dst, const at::Tensor& base,
                       at::TensorList deltas, const at::Tensor& weights,
                       const at::Tensor& shift,
                       const c10::optional<at::Tensor>& inv_freq,
                       const c10::optional<at::TensorList>& delta_scales);

}  // namespace cpu
}  // namespace kvcomm
