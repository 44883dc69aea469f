// The CUDA implementations of the kvcomm ops, registered under the schemas of
// cpp/schemas.cpp: the dispatcher sends calls whose tensors are on a CUDA
// device here. Each op is the shared launcher (launchers.cuh) run by
// CudaExec; the kernels live in the launch_*.cu files. This is the only CUDA
// file that includes ATen. tests/ops/test_cuda_registration.py checks that
// every schema has an m.impl below.
//
// Host code only, so nvcc's device passes (one per arch of
// TORCH_CUDA_ARCH_LIST) skip all of it: they would each preprocess ATen's
// headers for nothing (44 s of CPU for four archs and PTX, 17 s without).
#if !defined(__CUDA_ARCH__)
#include <torch/library.h>

#include "cuda_exec.cuh"
#include "launchers.cuh"

namespace kvcomm {
namespace gpu {

using cuda::CudaExec;
// Compact anchors / deltas: one float32 scale tensor per int8 / fp8 code tensor.
using ScalesArg = c10::optional<at::TensorList>;

at::Tensor rope_move(const at::Tensor& keys, const at::Tensor& inv_freq,
                     const at::Tensor& shift) {
  return cuda::rope_move<CudaExec>(keys, inv_freq, shift);
}

void rope_move_(const at::Tensor& keys, const at::Tensor& inv_freq, const at::Tensor& shift) {
  cuda::rope_move_<CudaExec>(keys, inv_freq, shift);
}

at::Tensor value_distances(const at::Tensor& content, at::TensorList anchors, bool rms,
                           const ScalesArg& anchor_scales) {
  return cuda::value_distances<CudaExec>(content, anchors, rms, anchor_scales);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> match_decide(
    const at::Tensor& distances, double tau, double gamma, double top_p) {
  return cuda::match_decide<CudaExec>(distances, tau, gamma, top_p);
}

at::Tensor token_weights(const at::Tensor& base, at::TensorList anchors, double tau,
                         const ScalesArg& anchor_scales) {
  return cuda::token_weights<CudaExec>(base, anchors, tau, anchor_scales);
}

at::Tensor segment_weights(const at::Tensor& base, at::TensorList anchors, double tau,
                           const ScalesArg& anchor_scales) {
  return cuda::segment_weights<CudaExec>(base, anchors, tau, anchor_scales);
}

at::Tensor fused_offset(const at::Tensor& base, at::TensorList deltas, const at::Tensor& weights,
                        const at::Tensor& shift, const c10::optional<at::Tensor>& inv_freq,
                        const ScalesArg& delta_scales) {
  return cuda::fused_offset<CudaExec>(base, deltas, weights, shift, inv_freq, delta_scales);
}

void fused_offset_into(const at::Tensor& dst, const at::Tensor& base, at::TensorList deltas,
                       const at::Tensor& weights, const at::Tensor& shift,
                       const c10::optional<at::Tensor>& inv_freq,
                       const ScalesArg& delta_scales) {
  cuda::offset_into<CudaExec>("kvcomm.fused_offset_into", dst, base, deltas, weights, shift,
                              inv_freq, delta_scales);
}

at::Tensor token_spread(at::TensorList deltas, const at::Tensor& weights) {
  return cuda::token_spread<CudaExec>(deltas, weights);
}

}  // namespace gpu
}  // namespace kvcomm

TORCH_LIBRARY_IMPL(kvcomm, CUDA, m) {
  m.impl("rope_move", &kvcomm::gpu::rope_move);
  m.impl("rope_move_", &kvcomm::gpu::rope_move_);
  m.impl("value_distances", &kvcomm::gpu::value_distances);
  m.impl("match_decide", &kvcomm::gpu::match_decide);
  m.impl("token_weights", &kvcomm::gpu::token_weights);
  m.impl("segment_weights", &kvcomm::gpu::segment_weights);
  m.impl("fused_offset", &kvcomm::gpu::fused_offset);
  m.impl("fused_offset_into", &kvcomm::gpu::fused_offset_into);
  m.impl("token_spread", &kvcomm::gpu::token_spread);
}

#endif  // !defined(__CUDA_ARCH__)
