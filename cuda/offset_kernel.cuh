// The fused offset kernel, which also serves both RoPE moves (an offset with
// no deltas): dst = rot(base + [layer > 0] * sum_u w_u * delta_u, shift).
//
// Mapping. A thread owns one token t and one vector of channels c..c+V-1
// (with its rotate-half partner c+D/2.. when rotating) and walks a group of
// (layer, head) rows. The cos/sin of its pairs depend only on (t, c), so they
// are computed once per thread and reused across the row group, never per
// layer or head. Threads of a warp cover consecutive vectors of a token and
// then consecutive tokens, so every load and store is coalesced; with 16-byte
// alignment and a unit channel stride each access is one 128-bit
// instruction, otherwise the scalar path follows any strides (dst may be a
// strided slice of a [L, H, Tmax, D] cache buffer). Compact deltas (int8 /
// fp8 codes with per-channel scales) are decoded in registers: a thread then
// covers 16 channels, one 16-byte load of each delta's codes.
#pragma once

#include "kernel_common.cuh"

namespace kvcomm {
namespace cuda {

struct OffsetArgs {
  void* dst;
  Strides4 ds;
  const void* base;
  Strides4 bs;
  int64_t layers, heads, tokens, dim;
  int64_t half;            // dim / 2: offset of the rotate-half partner
  int64_t lanes;           // vectors per row span: (rotate ? dim/2 : dim) / V
  int64_t rows_per_group;  // (layer, head) rows one thread walks
  int64_t num_deltas;
  const KVRef* delta_table;  // device table when num_deltas > kMaxParamRefs
  const ScaleRef* scale_table;  // its scales, for compact deltas
  const float* weights;      // contiguous [N, T] or [N, L, H, D]
  bool per_token_weights;
  bool weights_vec4;         // per-channel weights 16-byte aligned: float4 loads
  const int64_t* shift;  // [1] or [T]
  bool per_token_shift;
  const float* inv_freq;  // [dim/2], rotation only
};
static_assert(sizeof(OffsetArgs) + sizeof(RefTable) + sizeof(ScaleTable) <= 4096,
              "offset kernel parameters over 4 KB");

// More deltas than kMaxParamRefs: the launcher writes their table to device
// memory in chunks of kMaxParamRefs, each chunk carried by the parameters of
// a tiny kernel whose thread i stores entry i. No host buffer is involved, so
// this stays correct inside CUDA graph capture, where a copy from pinned host
// memory would be replayed later from a buffer the host allocator may have
// handed out again.
KVCOMM_HD void store_ref(const RefTable& chunk, int64_t i, KVRef* out) { out[i] = chunk.r[i]; }
KVCOMM_HD void store_scale_ref(const ScaleTable& chunk, int64_t i, ScaleRef* out) {
  out[i] = chunk.r[i];
}

// The delta views of one launch, read where they live. Two types, not one
// pointer that may point at either: a pointer into the kernel parameters
// would be a generic address, and nvcc then reads every view field, and the
// deltas themselves, with generic loads (LD, not LDG). Read straight from the
// parameters the fields are constant-bank loads; from the device table they
// go through the read-only path.
struct ParamRefs {
  const RefTable& table;
  KVCOMM_HD KVRef operator[](int64_t u) const { return table.r[u]; }
};
// With the scales of compact deltas, also read from the parameters.
struct ParamScaledRefs : ParamRefs {
  const ScaleTable& scales;
  KVCOMM_HD ScaleRef scale(int64_t u) const { return scales.r[u]; }
};

// Entry u of a device table of plain structs (8-byte fields), each field
// through the read-only path.
template <typename R>
KVCOMM_HD R load_entry_ro(const R* table, int64_t u) {
#if defined(__CUDA_ARCH__)
  constexpr int kFields = sizeof(R) / sizeof(long long);
  static_assert(sizeof(R) == kFields * sizeof(long long), "table entries are 8-byte fields");
  const long long* f = reinterpret_cast<const long long*>(table + u);
  long long v[kFields];
#pragma unroll
  for (int i = 0; i < kFields; ++i) v[i] = load_ro(f + i);
  R r;
  memcpy(&r, v, sizeof(r));
  return r;
#else
  return table[u];
#endif
}

struct DeviceRefs {
  const KVRef* table;
  const ScaleRef* scales = nullptr;  // for compact deltas only
  KVCOMM_HD KVRef operator[](int64_t u) const { return load_entry_ro(table, u); }
  KVCOMM_HD ScaleRef scale(int64_t u) const { return load_entry_ro(scales, u); }
};

// lo (channels c..c+V-1) and, with kSides 2, hi (c+half..) += sum_u w_u *
// delta_u, in the order u = 0, 1, ... like the CPU. Refs: ParamRefs or
// DeviceRefs. Compact deltas of keys go one side per call (the sides are
// independent sums; one at a time holds half the codes, scales and weights)
// and are not unrolled: with both sides and two deltas in flight their rotate
// kernels took 174-218 registers (ptxas -v, sm_90a); this way they fit the
// 128 of kMinBlocks without spilling.
template <typename T, Codes C, bool kVec, int kSides, class Refs>
KVCOMM_HD void offset_add_deltas(const OffsetArgs& a, const Refs& refs, int64_t l, int64_t h,
                                 int64_t t, int64_t c, float* lo, float* hi) {
  constexpr int V = Lanes<T, C, kVec>::value;
  constexpr int G = Group<C, V, kVec>::value;
#pragma unroll(C == Codes::kPlain ? 2 : 1)
  for (int64_t u = 0; u < a.num_deltas; ++u) {
    ScaleRef sc{};
    if constexpr (C != Codes::kPlain) sc = refs.scale(u);
    const KVRef d = refs[u];
    const float wt = a.per_token_weights ? load_ro(a.weights + u * a.tokens + t) : 0.f;
    const float* w = a.weights + ((u * a.layers + l) * a.heads + h) * a.dim + c;
#pragma unroll
    for (int side = 0; side < kSides; ++side) {
      float* acc = side == 0 ? lo : hi;
      const int64_t off = side == 0 ? 0 : a.half;
      anchor_groups<T, C, V, kVec>(d, sc, l, h, t, c + off, [&](int g, const float* x) {
        float wg[G];
        if (a.per_token_weights) {
#pragma unroll
          for (int v = 0; v < G; ++v) wg[v] = wt;
        } else {
          load_floats_ro<G>(w + off + g, a.weights_vec4, wg);
        }
#pragma unroll
        for (int v = 0; v < G; ++v) acc[g + v] += wg[v] * x[v];
      });
    }
  }
}

// Both sides of a row (kSides, above): plain deltas in one pass, compact ones
// in one pass per side.
template <typename T, Codes C, bool kVec, bool kRotate, class Refs>
KVCOMM_HD void offset_add_row(const OffsetArgs& a, const Refs& refs, int64_t l, int64_t h,
                              int64_t t, int64_t c, float* lo, float* hi) {
  if constexpr (!kRotate) {
    offset_add_deltas<T, C, kVec, 1>(a, refs, l, h, t, c, lo, nullptr);
  } else if constexpr (C == Codes::kPlain) {
    offset_add_deltas<T, C, kVec, 2>(a, refs, l, h, t, c, lo, hi);
  } else {
    offset_add_deltas<T, C, kVec, 1>(a, refs, l, h, t, c, lo, nullptr);
    offset_add_deltas<T, C, kVec, 1>(a, refs, l, h, t, c + a.half, hi, nullptr);
  }
}

// Everything thread (t, k) of row group `group` does.
template <typename T, Codes C, bool kVec, bool kRotate>
KVCOMM_HD void offset_thread(const OffsetArgs& a, const RefTable& small,
                             const ScaleTable& small_scales, int64_t t, int64_t k, int64_t group) {
  constexpr int V = Lanes<T, C, kVec>::value;
  const int64_t c = k * V;
  float cs[V], sn[V];
  if constexpr (kRotate) {
    const int64_t s = load_ro(a.shift + (a.per_token_shift ? t : 0));
#pragma unroll
    for (int v = 0; v < V; ++v)
      math::sin_cos(math::rope_angle(s, load_ro(a.inv_freq + c + v)), &sn[v], &cs[v]);
  }
  const T* base = static_cast<const T*>(a.base);
  T* dst = static_cast<T*>(a.dst);
  const int64_t rows = a.layers * a.heads;
  const int64_t r0 = group * a.rows_per_group;
  const int64_t r1 = r0 + a.rows_per_group < rows ? r0 + a.rows_per_group : rows;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t l = r / a.heads, h = r - l * a.heads;
    float lo[V], hi[V];
    load_span<T, V, kVec>(base + a.bs.at(l, h, t, c), lo);
    if constexpr (kRotate) load_span<T, V, kVec>(base + a.bs.at(l, h, t, c + a.half), hi);
    // Layer 0 is exact by construction (docs/method.md, "Estimating the offset"): it never
    // gets deltas.
    if (l > 0) {
      if (a.delta_table != nullptr)
        offset_add_row<T, C, kVec, kRotate>(a, DeviceRefs{a.delta_table, a.scale_table}, l, h, t,
                                            c, lo, hi);
      else
        offset_add_row<T, C, kVec, kRotate>(a, ParamScaledRefs{{small}, small_scales}, l, h, t,
                                            c, lo, hi);
    }
    if constexpr (kRotate) {
#pragma unroll
      for (int v = 0; v < V; ++v) {
        float y1, y2;
        math::rotate_pair(lo[v], hi[v], cs[v], sn[v], &y1, &y2);
        lo[v] = y1;
        hi[v] = y2;
      }
      store_span<T, V, kVec>(dst + a.ds.at(l, h, t, c + a.half), hi);
    }
    store_span<T, V, kVec>(dst + a.ds.at(l, h, t, c), lo);
  }
}

// Launch shape: blocks of 256 threads = block_x vectors x block_y tokens;
// grid (token blocks, row groups). Rows per thread (1..8) grow with the work
// so that about two waves of 2048 threads per SM remain: small inputs still
// fill the GPU, large ones amortise the sin/cos over several rows. (The
// vector rotate kernels hold 60-150 registers, 256-768 resident threads per
// SM, so that is many more real waves.)
inline Launch plan_offset(int64_t layers, int64_t heads, int64_t tokens, int64_t lanes,
                          int sm_count, int64_t* rows_per_group) {
  Launch g;
  g.block_x = static_cast<unsigned>(lanes < 256 ? lanes : 256);
  g.block_y = 256 / g.block_x;
  g.grid_x = static_cast<unsigned>(ceil_div(tokens, g.block_y));
  const int64_t rows = layers * heads;
  const int64_t threads_per_row = static_cast<int64_t>(g.grid_x) * g.block_x * g.block_y;
  const int64_t target = static_cast<int64_t>(sm_count) * 2048 * 2;
  int64_t rpg = threads_per_row * rows / (target > 0 ? target : 1);
  rpg = rpg < 1 ? 1 : (rpg > 8 ? 8 : rpg);
  if (ceil_div(rows, rpg) > 65535) rpg = ceil_div(rows, 65535);
  *rows_per_group = rpg;
  g.grid_y = static_cast<unsigned>(ceil_div(rows, rpg));
  return g;
}

#if defined(__CUDACC__)
template <typename T, Codes C, bool kVec, bool kRotate>
__global__ void __launch_bounds__(256, kMinBlocks)
    offset_kernel(const KVCOMM_GRID_CONSTANT OffsetArgs a,
                  const KVCOMM_GRID_CONSTANT RefTable small,
                  const KVCOMM_GRID_CONSTANT ScaleTable small_scales) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (t >= a.tokens) return;
  for (int64_t k = threadIdx.x; k < a.lanes; k += blockDim.x)
    offset_thread<T, C, kVec, kRotate>(a, small, small_scales, t, k, blockIdx.y);
}
#endif

}  // namespace cuda
}  // namespace kvcomm
