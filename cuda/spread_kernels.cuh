// Per-token spread on the device (kvcomm::token_spread, docs/method.md,
// "Beyond the paper"): how much the N anchors' deltas of a slot disagree at each
// token, the root mean over layers >= 1, heads and channels of their weighted
// variance across anchors. The math per element is the CPU's
// (kvcomm/spread_math.h).
//
// One block per token: its threads stride over the token's (L-1)*H*D
// elements (consecutive threads take consecutive channels, so a warp's reads
// of one anchor are coalesced), each element reading N deltas; a double block
// sum gives the token's value. The spread is computed once per estimate, for
// the few slots a recompute policy asks about, so this favours simplicity
// over the vector paths of the offset kernels.
#pragma once

#include "kernel_common.cuh"
#include "kvcomm/spread_math.h"
#include "offset_kernel.cuh"  // ParamRefs, DeviceRefs, store_ref

namespace kvcomm {
namespace cuda {

struct SpreadArgs {
  const float* weights;   // [num_deltas, tokens], contiguous
  const KVRef* table;     // the device table when num_deltas > kMaxParamRefs, else null
  int64_t num_deltas;
  int64_t heads, tokens, dim;
  int64_t elements;       // (layers - 1) * heads * dim per token
  float* out;             // [tokens]
};

constexpr int kSpreadThreads = 256;

// The weighted variance across anchors of element e (layer >= 1) of token t.
template <typename T, class Refs>
KVCOMM_HD float spread_element(const SpreadArgs& a, const Refs& refs, int64_t t, int64_t e) {
  const int64_t d = e % a.dim;
  const int64_t lh = e / a.dim;
  const int64_t h = lh % a.heads;
  const int64_t l = 1 + lh / a.heads;
  math::SpreadSums s;
  for (int64_t u = 0; u < a.num_deltas; ++u) {
    const KVRef r = refs[u];
    s.add(load_ro(a.weights + u * a.tokens + t), static_cast<float>(*elem<T>(r, l, h, t, d)), u == 0);
  }
  return s.variance();
}

// Thread `tx` of token t's block: its share of the token's elements.
template <typename T, class Refs>
KVCOMM_HD double spread_thread(const SpreadArgs& a, const Refs& refs, int64_t t, int64_t tx,
                               int64_t threads) {
  double acc = 0.0;
  for (int64_t e = tx; e < a.elements; e += threads) acc += spread_element<T>(a, refs, t, e);
  return acc;
}

// One block per token (tokens >= 1: the launcher returns early otherwise).
inline Launch plan_spread(int64_t tokens) {
  Launch g;
  g.block_x = kSpreadThreads;
  g.grid_x = static_cast<unsigned>(tokens);
  return g;
}

#if defined(__CUDACC__)
template <typename T, bool kTable>
__global__ void __launch_bounds__(kSpreadThreads)
    spread_kernel(const KVCOMM_GRID_CONSTANT SpreadArgs a,
                  const KVCOMM_GRID_CONSTANT RefTable refs) {
  const int64_t t = blockIdx.x;
  double s = kTable ? spread_thread<T>(a, DeviceRefs{a.table}, t, threadIdx.x, blockDim.x)
                    : spread_thread<T>(a, ParamRefs{refs}, t, threadIdx.x, blockDim.x);
  s = group_sum(s, 32);
  __shared__ double warp_sums[kSpreadThreads / 32];
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) total += warp_sums[w];
    a.out[t] = math::spread_from_sum(total, a.elements);
  }
}
#endif

}  // namespace cuda
}  // namespace kvcomm
