// Launches of the offset-weight kernels (weight_kernels.cuh): per-token and
// per-channel scores, and their softmax finalize kernels.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "kernel_launch.cuh"

namespace kvcomm {
namespace cuda {

// One thread per token: mean over the partials, softmax over anchors.
__global__ void __launch_bounds__(256) token_finish_kernel(const TokenFinishArgs a) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t < a.tokens) token_finish(a, t);
}

// One thread per (layer, head, channel): norm over the partials, softmax.
__global__ void __launch_bounds__(256) segment_finish_kernel(const SegmentFinishArgs a) {
  const int64_t ch = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (ch < a.channels) segment_finish(a, ch);
}

template <typename T, Codes C, bool kVec, int NMAX>
cudaError_t launch_token_scores(const Launch& g, const TokenArgs& a, const RefTable& table,
                                const ScaleTable& scales, cudaStream_t stream) {
  token_score_kernel<T, C, kVec, NMAX>
      <<<dim3(g.grid_x, g.grid_y), dim3(g.block_x, g.block_y), 0, stream>>>(a, table, scales);
  return cudaGetLastError();
}

cudaError_t launch_token_finish(const TokenFinishArgs& a, cudaStream_t stream) {
  const Launch g = plan_finish(a.tokens);
  token_finish_kernel<<<g.grid_x, g.block_x, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename T, Codes C, int NMAX>
cudaError_t launch_segment_scores(const Launch& g, const SegmentArgs& a, const RefTable& table,
                                  const ScaleTable& scales, cudaStream_t stream) {
  segment_score_kernel<T, C, NMAX>
      <<<dim3(g.grid_x, g.grid_y), g.block_x, 0, stream>>>(a, table, scales);
  return cudaGetLastError();
}

cudaError_t launch_segment_finish(const SegmentFinishArgs& a, cudaStream_t stream) {
  const Launch g = plan_finish(a.channels);
  segment_finish_kernel<<<g.grid_x, g.block_x, 0, stream>>>(a);
  return cudaGetLastError();
}

#define KVCOMM_INSTANTIATE_TOKEN(T, C, VEC, NMAX)                                        \
  template cudaError_t launch_token_scores<T, C, VEC, NMAX>(const Launch&, const TokenArgs&, \
                                                            const RefTable&,                \
                                                            const ScaleTable&, cudaStream_t);
#define KVCOMM_INSTANTIATE_SEGMENT(T, C, NMAX)                                              \
  template cudaError_t launch_segment_scores<T, C, NMAX>(const Launch&, const SegmentArgs&, \
                                                         const RefTable&, const ScaleTable&, \
                                                         cudaStream_t);
// Compact anchors launch kCompactChunk at a time (launchers.cuh).
#define KVCOMM_INSTANTIATE_WEIGHTS_ALL(T)                        \
  KVCOMM_INSTANTIATE_TOKEN(T, Codes::kPlain, false, 8)             \
  KVCOMM_INSTANTIATE_TOKEN(T, Codes::kPlain, true, 8)              \
  KVCOMM_INSTANTIATE_TOKEN(T, Codes::kPlain, false, kMaxParamRefs) \
  KVCOMM_INSTANTIATE_TOKEN(T, Codes::kPlain, true, kMaxParamRefs)  \
  KVCOMM_INSTANTIATE_TOKEN(T, Codes::kInt8, false, kCompactChunk)  \
  KVCOMM_INSTANTIATE_TOKEN(T, Codes::kInt8, true, kCompactChunk)   \
  KVCOMM_INSTANTIATE_TOKEN(T, Codes::kFp8, false, kCompactChunk)   \
  KVCOMM_INSTANTIATE_TOKEN(T, Codes::kFp8, true, kCompactChunk)    \
  KVCOMM_INSTANTIATE_SEGMENT(T, Codes::kPlain, 8)                  \
  KVCOMM_INSTANTIATE_SEGMENT(T, Codes::kPlain, kSegmentChunk)      \
  KVCOMM_INSTANTIATE_SEGMENT(T, Codes::kInt8, kCompactChunk)       \
  KVCOMM_INSTANTIATE_SEGMENT(T, Codes::kFp8, kCompactChunk)

KVCOMM_INSTANTIATE_WEIGHTS_ALL(float)
KVCOMM_INSTANTIATE_WEIGHTS_ALL(c10::Half)
KVCOMM_INSTANTIATE_WEIGHTS_ALL(c10::BFloat16)

}  // namespace cuda
}  // namespace kvcomm
