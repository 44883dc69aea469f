// Launches of the matching kernels (matching_kernels.cuh): the one-pass
// distances, their finalize, and the on-device decision.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "kernel_launch.cuh"

namespace kvcomm {
namespace cuda {

// One block per anchor: sum its partials in double, write the distance.
__global__ void __launch_bounds__(256) distance_finish_kernel(const DistanceFinishArgs a) {
  const int64_t u = blockIdx.x;
  double s = 0.0;
  for (int64_t b = threadIdx.x; b < a.blocks; b += blockDim.x) s += a.partial[b * a.n + u];
  s = group_sum(s, 32);
  __shared__ double warp_sums[8];
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) total += warp_sums[w];
    a.out[u] = finish_distance(total, a.numel, a.rms);
  }
}

// A single thread: N is a pool's capacity (tens), and a launch is cheaper
// than a round trip through the host.
__global__ void decide_kernel(const DecideArgs a) { decide_thread(a); }

template <typename T, Codes C, bool kVec, int NMAX>
cudaError_t launch_distances(const Launch& g, const DistanceArgs& a, const RefTable& table,
                             const ScaleTable& scales, cudaStream_t stream) {
  distance_kernel<T, C, kVec, NMAX><<<g.grid_x, g.block_x, 0, stream>>>(a, table, scales);
  return cudaGetLastError();
}

cudaError_t launch_distances_finish(const DistanceFinishArgs& a, cudaStream_t stream) {
  const Launch g = plan_distance_finish(a.n);
  distance_finish_kernel<<<g.grid_x, g.block_x, 0, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t launch_decide(const DecideArgs& a, cudaStream_t stream) {
  decide_kernel<<<1, 1, 0, stream>>>(a);
  return cudaGetLastError();
}

#define KVCOMM_INSTANTIATE_DISTANCES(T, C, VEC, NMAX)                                     \
  template cudaError_t launch_distances<T, C, VEC, NMAX>(const Launch&, const DistanceArgs&, \
                                                         const RefTable&, const ScaleTable&, \
                                                         cudaStream_t);
// Compact anchors launch kCompactChunk at a time (launchers.cuh).
#define KVCOMM_INSTANTIATE_DISTANCES_ALL(T)                              \
  KVCOMM_INSTANTIATE_DISTANCES(T, Codes::kPlain, false, 8)               \
  KVCOMM_INSTANTIATE_DISTANCES(T, Codes::kPlain, true, 8)                \
  KVCOMM_INSTANTIATE_DISTANCES(T, Codes::kPlain, false, kMaxParamRefs)   \
  KVCOMM_INSTANTIATE_DISTANCES(T, Codes::kPlain, true, kMaxParamRefs)    \
  KVCOMM_INSTANTIATE_DISTANCES(T, Codes::kInt8, false, kCompactChunk)    \
  KVCOMM_INSTANTIATE_DISTANCES(T, Codes::kInt8, true, kCompactChunk)     \
  KVCOMM_INSTANTIATE_DISTANCES(T, Codes::kFp8, false, kCompactChunk)     \
  KVCOMM_INSTANTIATE_DISTANCES(T, Codes::kFp8, true, kCompactChunk)

KVCOMM_INSTANTIATE_DISTANCES_ALL(float)
KVCOMM_INSTANTIATE_DISTANCES_ALL(c10::Half)
KVCOMM_INSTANTIATE_DISTANCES_ALL(c10::BFloat16)

}  // namespace cuda
}  // namespace kvcomm
