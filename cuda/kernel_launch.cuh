// Launch functions of every kernel, callable without seeing the kernels.
//
// The kernel files (launch_*.cu) include no torch header, only these plain
// declarations, and instantiate them for float, c10::Half and c10::BFloat16;
// the one file that needs ATen (cuda_register.cu, through cuda_exec.cuh)
// calls them. ATen.h costs ~25 s of compile per nvcc translation unit, so
// this keeps it to one. Each returns cudaGetLastError() after its launch
// (asynchronous; nothing waits for the device).
#pragma once

#include <cuda_runtime_api.h>

#include "matching_kernels.cuh"
#include "offset_kernel.cuh"
#include "spread_kernels.cuh"
#include "weight_kernels.cuh"

namespace kvcomm {
namespace cuda {

#if defined(__CUDACC__)
// kernel<<<grid (g.grid_x, g.grid_y), block (g.block_x, g.block_y)>>>(args)
// on `stream` (a 1-D plan leaves the y sizes at 1), then the launch's error.
template <typename... P, typename... A>
cudaError_t launch_kernel(void (*kernel)(P...), const Launch& g, cudaStream_t stream,
                          const A&... args) {
  kernel<<<dim3(g.grid_x, g.grid_y), dim3(g.block_x, g.block_y), 0, stream>>>(args...);
  return cudaGetLastError();
}
#endif

// Writes count (<= kMaxParamRefs) table entries at out (device memory).
cudaError_t launch_store_refs(const RefTable& chunk, int64_t count, KVRef* out,
                              cudaStream_t stream);
cudaError_t launch_store_scale_refs(const ScaleTable& chunk, int64_t count, ScaleRef* out,
                                    cudaStream_t stream);

// C: how the anchors / deltas are read (kvcomm/codes.h); the scale tables
// are unused for Codes::kPlain.
template <typename T, Codes C, bool kVec, bool kRotate>
cudaError_t launch_offset(const Launch& g, const OffsetArgs& a, const RefTable& table,
                          const ScaleTable& scales, cudaStream_t stream);

template <typename T, Codes C, bool kVec, int NMAX>
cudaError_t launch_distances(const Launch& g, const DistanceArgs& a, const RefTable& table,
                             const ScaleTable& scales, cudaStream_t stream);
cudaError_t launch_distances_finish(const DistanceFinishArgs& a, cudaStream_t stream);
cudaError_t launch_decide(const DecideArgs& a, cudaStream_t stream);

template <typename T, Codes C, bool kVec, int NMAX>
cudaError_t launch_token_scores(const Launch& g, const TokenArgs& a, const RefTable& table,
                                const ScaleTable& scales, cudaStream_t stream);
cudaError_t launch_token_finish(const TokenFinishArgs& a, cudaStream_t stream);

template <typename T, Codes C, int NMAX>
cudaError_t launch_segment_scores(const Launch& g, const SegmentArgs& a, const RefTable& table,
                                  const ScaleTable& scales, cudaStream_t stream);
cudaError_t launch_segment_finish(const SegmentFinishArgs& a, cudaStream_t stream);

template <typename T, bool kTable>
cudaError_t launch_spread(const Launch& g, const SpreadArgs& a, const RefTable& table,
                          cudaStream_t stream);

}  // namespace cuda
}  // namespace kvcomm
