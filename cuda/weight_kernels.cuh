// Offset weights on the device (docs/method.md, "Estimating the offset"), each a one-pass
// score kernel over all anchors of a launch plus a finalize kernel that
// applies the softmax with the CPU's math.h code.
//
// Token weights, scores [N, T]: mean over (layer, head, channel) of
// |base - anchor_u| per token. A thread owns one token and a vector of
// channels and walks a group of rows; the threads of one token sit in the
// same warp (block_x a power of two <= 32) and add up with shuffles.
// Partials [groups, N, T] are summed in double by the finalize kernel.
//
// Segment weights, scores [N, L, H, D]: the L2 norm over tokens of
// base - anchor_u's last T tokens, per channel. A thread owns one channel and
// a chunk of tokens (lanes of a warp = consecutive channels, so loads are
// coalesced); partials [chunks, N, channels].
//
// Compact anchors (int8 / fp8 codes with per-channel scales) are decoded in
// registers (kernel_common.cuh anchor_groups).
#pragma once

#include "kernel_common.cuh"

namespace kvcomm {
namespace cuda {

struct TokenArgs {
  const void* base;
  Strides4 bs;
  int64_t heads, tokens, rows;
  int64_t lanes;  // dim / V
  int64_t rows_per_group;
  int64_t num_refs;
  float* partial;  // [groups, n_total, tokens]
  int64_t n_total, first;
};

template <typename T, Codes C, bool kVec, int NMAX>
KVCOMM_HD void token_accumulate(const TokenArgs& a, const RefTable& refs,
                                const ScaleTable& scales, int64_t t, int64_t k, int64_t group,
                                float* acc) {
  constexpr int V = Lanes<T, C, kVec>::value;
  const int64_t c = k * V;
  const int64_t r0 = group * a.rows_per_group;
  const int64_t r1 = r0 + a.rows_per_group < a.rows ? r0 + a.rows_per_group : a.rows;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t l = r / a.heads, h = r - l * a.heads;
    float x[V];
    load_span<T, V, kVec>(static_cast<const T*>(a.base) + a.bs.at(l, h, t, c), x);
#pragma unroll
    for (int u = 0; u < NMAX; ++u) {
      if (u < a.num_refs) {
        float s = 0.f;
        anchor_groups<T, C, V, kVec>(refs.r[u], scales.r[u], l, h, t, c,
                                     [&](int g, const float* y) {
#pragma unroll
          for (int v = 0; v < Group<C, V, kVec>::value; ++v) s += fabsf(x[g + v] - y[v]);
        });
        acc[u] += s;
      }
    }
  }
}

struct TokenFinishArgs {
  const float* partial;  // [groups, n, tokens]
  int64_t groups, n, tokens;
  double count;  // layers * heads * dim
  float tau;
  float* out;  // [n, tokens]
};

// Column t of the output: mean absolute differences, then the softmax over
// anchors, in place with stride T.
KVCOMM_HD void token_finish(const TokenFinishArgs& a, int64_t t) {
  for (int64_t u = 0; u < a.n; ++u) {
    double s = 0.0;
    for (int64_t g = 0; g < a.groups; ++g) s += a.partial[(g * a.n + u) * a.tokens + t];
    a.out[u * a.tokens + t] = a.count > 0 ? static_cast<float>(s / a.count) : 0.f;
  }
  math::softmax_neg_over_tau_strided(a.out + t, a.n, a.tokens, a.tau);
}

struct SegmentArgs {
  const void* base;
  Strides4 bs;
  int64_t heads, tokens, dim;
  int64_t channels;  // rows * dim
  int64_t tokens_per_chunk;
  int64_t num_refs;
  float* partial;  // [chunks, n_total, channels]
  int64_t n_total, first;
};

// refs are already advanced to each anchor's last `tokens` tokens. A
// compact anchor's scale is one per channel: read once, outside the tokens.
template <typename T, Codes C, int NMAX>
KVCOMM_HD void segment_accumulate(const SegmentArgs& a, const RefTable& refs,
                                  const ScaleTable& scales, int64_t ch, int64_t chunk,
                                  float* acc) {
  const int64_t row = ch / a.dim, d = ch - row * a.dim;
  const int64_t l = row / a.heads, h = row - l * a.heads;
  const int64_t t0 = chunk * a.tokens_per_chunk;
  const int64_t t1 = t0 + a.tokens_per_chunk < a.tokens ? t0 + a.tokens_per_chunk : a.tokens;
  float scale[NMAX];
#pragma unroll
  for (int u = 0; u < NMAX; ++u) {
    scale[u] = 1.f;
    if constexpr (C != Codes::kPlain) {
      if (u < a.num_refs) {
        const ScaleRef& s = scales.r[u];
        scale[u] = load_ro(s.ptr + l * s.layer + h * s.head + d);
      }
    }
  }
  for (int64_t t = t0; t < t1; ++t) {
    const float x = static_cast<float>(static_cast<const T*>(a.base)[a.bs.at(l, h, t, d)]);
#pragma unroll
    for (int u = 0; u < NMAX; ++u) {
      if (u < a.num_refs) {
        float y;
        if constexpr (C == Codes::kPlain)
          y = static_cast<float>(*elem<T>(refs.r[u], l, h, t, d));
        else
          y = math::decode_code<C>(*elem<uint8_t>(refs.r[u], l, h, t, d)) * scale[u];
        const float diff = x - y;
        acc[u] += diff * diff;
      }
    }
  }
}

struct SegmentFinishArgs {
  const float* partial;  // [chunks, n, channels]
  int64_t chunks, n, channels;
  float tau;
  float* out;  // [n, channels]
};

KVCOMM_HD void segment_finish(const SegmentFinishArgs& a, int64_t ch) {
  for (int64_t u = 0; u < a.n; ++u) {
    double s = 0.0;
    for (int64_t c = 0; c < a.chunks; ++c) s += a.partial[(c * a.n + u) * a.channels + ch];
    a.out[u * a.channels + ch] = sqrtf(static_cast<float>(s));
  }
  math::softmax_neg_over_tau_strided(a.out + ch, a.n, a.channels, a.tau);
}

constexpr int kSegmentChunk = 16;

inline unsigned pow2_at_least(int64_t x, unsigned cap) {
  unsigned p = 1;
  while (p < x && p < cap) p *= 2;
  return p;
}

// Token scores: block = block_x vectors (power of two <= 32) x block_y
// tokens; grid = (token blocks, row groups) sized for about two waves.
inline Launch plan_token_scores(int64_t rows, int64_t tokens, int64_t lanes, int sm_count,
                                int64_t* rows_per_group) {
  Launch g;
  g.block_x = pow2_at_least(lanes, 32);
  g.block_y = 256 / g.block_x;
  g.grid_x = static_cast<unsigned>(ceil_div(tokens, g.block_y));
  const int64_t per_group = static_cast<int64_t>(g.grid_x) * 256;
  const int64_t target = static_cast<int64_t>(sm_count) * 2048 * 2;
  int64_t groups = target / per_group;
  groups = groups < 1 ? 1 : (groups > rows ? rows : groups);
  if (groups > 65535) groups = 65535;
  *rows_per_group = ceil_div(rows, groups);
  g.grid_y = static_cast<unsigned>(ceil_div(rows, *rows_per_group));
  return g;
}

// Segment scores: 256 channels per block, tokens split in chunks so that
// about one wave of threads runs (each thread already has N loads in flight).
inline Launch plan_segment_scores(int64_t channels, int64_t tokens, int sm_count,
                                  int64_t* tokens_per_chunk) {
  Launch g;
  g.block_x = 256;
  g.grid_x = static_cast<unsigned>(ceil_div(channels, 256));
  const int64_t per_chunk = static_cast<int64_t>(g.grid_x) * 256;
  const int64_t target = static_cast<int64_t>(sm_count) * 2048;
  int64_t chunks = target / per_chunk;
  chunks = chunks < 1 ? 1 : (chunks > tokens ? tokens : chunks);
  if (chunks > 65535) chunks = 65535;
  *tokens_per_chunk = ceil_div(tokens, chunks);
  g.grid_y = static_cast<unsigned>(ceil_div(tokens, *tokens_per_chunk));
  return g;
}

// The finalize kernels: one thread per token (token weights) or per channel
// (segment weights), 256 per block; items >= 1 (the launchers return early
// for empty outputs: a zero grid is a launch error).
inline Launch plan_finish(int64_t items) {
  Launch g;
  g.block_x = 256;
  g.grid_x = static_cast<unsigned>(ceil_div(items, 256));
  return g;
}

#if defined(__CUDACC__)
template <typename T, Codes C, bool kVec, int NMAX>
__global__ void __launch_bounds__(256, kMinBlocks)
    token_score_kernel(const KVCOMM_GRID_CONSTANT TokenArgs a,
                       const KVCOMM_GRID_CONSTANT RefTable refs,
                       const KVCOMM_GRID_CONSTANT ScaleTable scales) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  float acc[NMAX];
#pragma unroll
  for (int u = 0; u < NMAX; ++u) acc[u] = 0.f;
  if (t < a.tokens) {
    for (int64_t k = threadIdx.x; k < a.lanes; k += blockDim.x)
      token_accumulate<T, C, kVec, NMAX>(a, refs, scales, t, k, blockIdx.y, acc);
  }
  // Every lane takes part in the shuffles, including those past the end.
#pragma unroll
  for (int u = 0; u < NMAX; ++u) {
    const float s = group_sum(acc[u], static_cast<int>(blockDim.x));
    if (threadIdx.x == 0 && t < a.tokens && u < a.num_refs)
      a.partial[(blockIdx.y * a.n_total + a.first + u) * a.tokens + t] = s;
  }
}

// Launched for at most kSegmentChunk anchors: with 32, ptxas keeps every
// anchor's address live and takes ~200 registers (one block per SM), or
// spills under a bound; re-reading the base per chunk costs 1/(N+1) of the
// traffic.
template <typename T, Codes C, int NMAX>
__global__ void __launch_bounds__(256, kMinBlocks)
    segment_score_kernel(const KVCOMM_GRID_CONSTANT SegmentArgs a,
                         const KVCOMM_GRID_CONSTANT RefTable refs,
                         const KVCOMM_GRID_CONSTANT ScaleTable scales) {
  const int64_t ch = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (ch >= a.channels) return;
  float acc[NMAX];
#pragma unroll
  for (int u = 0; u < NMAX; ++u) acc[u] = 0.f;
  segment_accumulate<T, C, NMAX>(a, refs, scales, ch, blockIdx.y, acc);
#pragma unroll
  for (int u = 0; u < NMAX; ++u)
    if (u < a.num_refs) a.partial[(blockIdx.y * a.n_total + a.first + u) * a.channels + ch] = acc[u];
}

#endif

}  // namespace cuda
}  // namespace kvcomm
