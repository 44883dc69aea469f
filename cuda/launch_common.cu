// Launches of the kernels that do not depend on how anchors are stored: the
// device table writers, the finalize kernels of distances and weights, the
// on-device decision, and the per-token spread (spread_kernels.cuh).
// The kernels are defined here, not in a header: a non-template kernel may
// be defined in only one translation unit, and none of these depends on the
// anchors' code type.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "kernel_launch.cuh"

namespace kvcomm {
namespace cuda {

// Entry i of a device table chunk (offset_kernel.cuh: store_ref,
// store_scale_ref), one thread per entry.
template <typename Table, typename R, void (*kStore)(const Table&, int64_t, R*)>
__global__ void __launch_bounds__(kMaxParamRefs)
    store_table_kernel(const KVCOMM_GRID_CONSTANT Table chunk, int count, R* out) {
  if (static_cast<int>(threadIdx.x) < count) kStore(chunk, threadIdx.x, out);
}

constexpr Launch kTableChunk{1, 1, kMaxParamRefs, 1};

cudaError_t launch_store_refs(const RefTable& chunk, int64_t count, KVRef* out,
                              cudaStream_t stream) {
  return launch_kernel(store_table_kernel<RefTable, KVRef, store_ref>, kTableChunk, stream, chunk,
                       static_cast<int>(count), out);
}

cudaError_t launch_store_scale_refs(const ScaleTable& chunk, int64_t count, ScaleRef* out,
                                    cudaStream_t stream) {
  return launch_kernel(store_table_kernel<ScaleTable, ScaleRef, store_scale_ref>, kTableChunk,
                       stream, chunk, static_cast<int>(count), out);
}

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

cudaError_t launch_distances_finish(const DistanceFinishArgs& a, cudaStream_t stream) {
  return launch_kernel(distance_finish_kernel, plan_distance_finish(a.n), stream, a);
}

// A single thread: N is a pool's capacity (tens), and a launch is cheaper
// than a round trip through the host.
__global__ void decide_kernel(const DecideArgs a) { decide_thread(a); }

cudaError_t launch_decide(const DecideArgs& a, cudaStream_t stream) {
  return launch_kernel(decide_kernel, Launch{}, stream, a);
}

// One thread per item of a finalize step: a token (token weights: mean over
// the partials, softmax over anchors) or a (layer, head, channel) (segment
// weights: norm over the partials, softmax).
template <typename Args, void (*kFinish)(const Args&, int64_t)>
__global__ void __launch_bounds__(256) finish_kernel(const Args a, int64_t items) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < items) kFinish(a, i);
}

cudaError_t launch_token_finish(const TokenFinishArgs& a, cudaStream_t stream) {
  return launch_kernel(finish_kernel<TokenFinishArgs, token_finish>, plan_finish(a.tokens), stream,
                       a, a.tokens);
}

cudaError_t launch_segment_finish(const SegmentFinishArgs& a, cudaStream_t stream) {
  return launch_kernel(finish_kernel<SegmentFinishArgs, segment_finish>, plan_finish(a.channels),
                       stream, a, a.channels);
}

template <typename T, bool kTable>
cudaError_t launch_spread(const Launch& g, const SpreadArgs& a, const RefTable& table,
                          cudaStream_t stream) {
  return launch_kernel(spread_kernel<T, kTable>, g, stream, a, table);
}

#define KVCOMM_INSTANTIATE_SPREAD(T)                                                        \
  template cudaError_t launch_spread<T, false>(const Launch&, const SpreadArgs&,            \
                                               const RefTable&, cudaStream_t);              \
  template cudaError_t launch_spread<T, true>(const Launch&, const SpreadArgs&,             \
                                              const RefTable&, cudaStream_t);

KVCOMM_INSTANTIATE_SPREAD(float)
KVCOMM_INSTANTIATE_SPREAD(c10::Half)
KVCOMM_INSTANTIATE_SPREAD(c10::BFloat16)

}  // namespace cuda
}  // namespace kvcomm
