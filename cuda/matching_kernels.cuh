// Matching on the device: distances from one content to all N anchors in one
// pass, and the share-or-anchor decision (docs/method.md, "Deciding").
//
// Distances. The content is read once, not N times: a thread loads one vector
// of it and the matching vector of every anchor of the launch (up to 32,
// their pointers in the kernel parameters), keeping N running sums of
// squares in registers. Blocks reduce to one partial per anchor; a second
// tiny kernel sums the partials in double and takes the square root. No
// atomics, so the result is deterministic run to run. Compact anchors (int8 /
// fp8 codes, kernel_common.cuh anchor_groups) are decoded in registers.
#pragma once

#include "kernel_common.cuh"

namespace kvcomm {
namespace cuda {

struct DistanceArgs {
  const void* content;
  Strides4 cs;
  int64_t heads, tokens;
  int64_t lanes;     // vectors per (row, token): dim / V
  int64_t total;     // rows * tokens * lanes
  int64_t num_refs;  // anchors in this launch
  float* partial;    // [blocks, n_total]
  int64_t n_total;   // all anchors of the call
  int64_t first;     // index of this launch's first anchor
};

// acc[u] += squared difference between content vector i and anchor u.
template <typename T, Codes C, bool kVec, int NMAX>
KVCOMM_HD void distance_accumulate(const DistanceArgs& a, const RefTable& refs,
                                   const ScaleTable& scales, int64_t i, float* acc) {
  constexpr int V = Lanes<T, C, kVec>::value;
  const int64_t k = i % a.lanes;
  const int64_t rt = i / a.lanes;
  const int64_t t = rt % a.tokens, row = rt / a.tokens;
  const int64_t l = row / a.heads, h = row - l * a.heads;
  const int64_t c = k * V;
  float x[V];
  load_span<T, V, kVec>(static_cast<const T*>(a.content) + a.cs.at(l, h, t, c), x);
#pragma unroll
  for (int u = 0; u < NMAX; ++u) {
    if (u < a.num_refs) {
      float s = 0.f;
      anchor_groups<T, C, V, kVec>(refs.r[u], scales.r[u], l, h, t, c, [&](int g, const float* y) {
#pragma unroll
        for (int v = 0; v < Group<C, V, kVec>::value; ++v) {
          const float d = x[g + v] - y[v];
          s += d * d;
        }
      });
      acc[u] += s;
    }
  }
}

// sqrt of the summed squares, divided by the element count in RMS mode;
// exactly the CPU's final step.
KVCOMM_HD float finish_distance(double sq, double numel, bool rms) {
  if (rms) sq = numel > 0 ? sq / numel : 0.0;
  return static_cast<float>(sqrt(sq));
}

struct DistanceFinishArgs {
  const float* partial;  // [blocks, n]
  int64_t blocks, n;
  double numel;
  bool rms;
  float* out;  // [n]
};

// Softmax, entropy gate and top-p credit: the CPU's math.h code run by one
// device thread (N is a pool's capacity, tens), so the decision never makes
// a trip through the host.
struct DecideArgs {
  const float* distances;
  int64_t stride, n;
  float tau, gamma, top_p;
  float* probs;
  float* entropy;
  bool* share;
  bool* credit;
  int64_t* order;  // scratch [n]
};

KVCOMM_HD void decide_thread(const DecideArgs& a) {
  for (int64_t i = 0; i < a.n; ++i) a.probs[i] = a.distances[i * a.stride];
  *a.share = math::match_decide_inplace(a.probs, a.n, a.tau, a.gamma, a.top_p, a.entropy,
                                        a.credit, a.order);
}

// About one resident wave of 256-thread blocks; the kernel strides over the
// rest, so the partial buffer stays small.
inline Launch plan_distances(int64_t total, int sm_count) {
  Launch g;
  g.block_x = 256;
  const int64_t want = ceil_div(total, 256);
  const int64_t cap = static_cast<int64_t>(sm_count) * 4;
  g.grid_x = static_cast<unsigned>(want < cap ? (want < 1 ? 1 : want) : cap);
  return g;
}

// The finalize: one block of 256 threads per anchor (n >= 1: a zero grid is
// a launch error, so the launcher returns before for no anchors).
inline Launch plan_distance_finish(int64_t n) {
  Launch g;
  g.grid_x = static_cast<unsigned>(n);
  g.block_x = 256;
  return g;
}

#if defined(__CUDACC__)
template <typename T, Codes C, bool kVec, int NMAX>
__global__ void __launch_bounds__(256, kMinBlocks)
    distance_kernel(const KVCOMM_GRID_CONSTANT DistanceArgs a,
                    const KVCOMM_GRID_CONSTANT RefTable refs,
                    const KVCOMM_GRID_CONSTANT ScaleTable scales) {
  float acc[NMAX];
#pragma unroll
  for (int u = 0; u < NMAX; ++u) acc[u] = 0.f;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < a.total;
       i += step)
    distance_accumulate<T, C, kVec, NMAX>(a, refs, scales, i, acc);
  // Warp sums, then the first warp adds the warps' sums.
  __shared__ float warp_sums[8][NMAX];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int u = 0; u < NMAX; ++u) {
    const float s = group_sum(acc[u], 32);
    if (lane == 0) warp_sums[warp][u] = s;
  }
  __syncthreads();
  if (threadIdx.x < a.num_refs) {
    float s = 0.f;
    for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) s += warp_sums[w][threadIdx.x];
    a.partial[blockIdx.x * a.n_total + a.first + threadIdx.x] = s;
  }
}

#endif

}  // namespace cuda
}  // namespace kvcomm
