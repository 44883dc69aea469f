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

template <typename T, bool kVec, int NMAX>
cudaError_t launch_token_scores(const Launch& g, const TokenArgs& a, const RefTable& table,
                                cudaStream_t stream) {
  token_score_kernel<T, kVec, NMAX>
      <<<dim3(g.grid_x, g.grid_y), dim3(g.block_x, g.block_y), 0, stream>>>(a, table);
  return cudaGetLastError();
}

cudaError_t launch_token_finish(const TokenFinishArgs& a, cudaStream_t stream) {
  const Launch g = plan_finish(a.tokens);
  token_finish_kernel<<<g.grid_x, g.block_x, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename T, int NMAX>
cudaError_t launch_segment_scores(const Launch& g, const SegmentArgs& a, const RefTable& table,
                                  cudaStream_t stream) {
  segment_score_kernel<T, NMAX><<<dim3(g.grid_x, g.grid_y), g.block_x, 0, stream>>>(a, table);
  return cudaGetLastError();
}

cudaError_t launch_segment_finish(const SegmentFinishArgs& a, cudaStream_t stream) {
  const Launch g = plan_finish(a.channels);
  segment_finish_kernel<<<g.grid_x, g.block_x, 0, stream>>>(a);
  return cudaGetLastError();
}

#define KVCOMM_INSTANTIATE_TOKEN(T, VEC, NMAX)                                        \
  template cudaError_t launch_token_scores<T, VEC, NMAX>(const Launch&, const TokenArgs&, \
                                                         const RefTable&, cudaStream_t);
#define KVCOMM_INSTANTIATE_SEGMENT(T, NMAX)                                              \
  template cudaError_t launch_segment_scores<T, NMAX>(const Launch&, const SegmentArgs&, \
                                                      const RefTable&, cudaStream_t);
#define KVCOMM_INSTANTIATE_WEIGHTS_ALL(T)           \
  KVCOMM_INSTANTIATE_TOKEN(T, false, 8)             \
  KVCOMM_INSTANTIATE_TOKEN(T, true, 8)              \
  KVCOMM_INSTANTIATE_TOKEN(T, false, kMaxParamRefs) \
  KVCOMM_INSTANTIATE_TOKEN(T, true, kMaxParamRefs)  \
  KVCOMM_INSTANTIATE_SEGMENT(T, 8)                  \
  KVCOMM_INSTANTIATE_SEGMENT(T, kSegmentChunk)

KVCOMM_INSTANTIATE_WEIGHTS_ALL(float)
KVCOMM_INSTANTIATE_WEIGHTS_ALL(c10::Half)
KVCOMM_INSTANTIATE_WEIGHTS_ALL(c10::BFloat16)

}  // namespace cuda
}  // namespace kvcomm
