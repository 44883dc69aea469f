// Pieces every kvcomm CUDA kernel uses: tensor references passed as kernel
// parameters, 16-byte vector loads and stores, and the launch-shape type.
//
// Written so the per-thread bodies compile for the host too (plain C++ when
// not under nvcc): host_emulation.cuh runs the very same bodies in loops on
// the CPU, which is how the index arithmetic is tested on machines without a
// GPU. Only the __global__ wrappers and block reductions are device-only.
#pragma once

#include <cstdint>
#include <cstring>

#include "kvcomm/codes.h"
#include "kvcomm/math.h"

// __grid_constant__ (kernel parameters read in place, even when indexed at
// run time) exists from compute_70 on; nvcc rejects it for older targets, so
// it is spelled only in the device pass for those that have it (the host
// pass and older targets get a plain const parameter, which is correct, only
// copied to local memory when indexed dynamically).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
#define KVCOMM_GRID_CONSTANT __grid_constant__
#else
#define KVCOMM_GRID_CONSTANT
#endif

// KVCOMM_PLAIN_CXX_VECTOR_ACCESS: the vector load and store below in plain
// C++ instead of PTX, as they were written before; nothing defines it but
// .ci/cuda_compile_check.sh, whose negative control builds the offset kernels
// with it and expects .ci/sass_check.py to reject their machine code.

// Called by the host branch of every 16-byte vector access below. The host
// emulation (host_emulation.cuh) defines it to check the address is 16-byte
// aligned, as the GPU's 128-bit loads require (a host memcpy would not
// notice); a no-op everywhere else.
#ifndef KVCOMM_HOST_CHECK_VECTOR_ALIGNED
#define KVCOMM_HOST_CHECK_VECTOR_ALIGNED(p) ((void)0)
#endif
#define KVCOMM_KERNEL_COMMON_INCLUDED 1

namespace kvcomm {
namespace cuda {

using math::Strides4;

// Anchors / deltas handed to one launch through the kernel parameters (no
// host-to-device copy): 32 x 40 bytes, well inside the parameter space.
// More than this: distances and weights launch once per chunk of 32;
// the fused offset reads a table written to device memory (store_ref).
constexpr int kMaxParamRefs = 32;

// One [layers, heads, tokens, head_dim] view: its first element and strides
// in elements. The pointer may already be advanced (segment weights use an
// anchor's last tokens).
struct KVRef {
  const void* ptr;
  Strides4 s;
};

struct RefTable {
  KVRef r[kMaxParamRefs];
};

// The scales of one compact anchor / delta (float32 [L, H, 1, D], unit
// channel stride; the launchers make them so): its first element and its
// layer and head strides in elements. Unused for plain anchors.
struct ScaleRef {
  const float* ptr;
  int64_t layer, head;
};
struct ScaleTable {
  ScaleRef r[kMaxParamRefs];
};
static_assert(sizeof(ScaleRef) == 24, "ScaleRef is shared by host and device: keep it plain");

// Compact anchors per distance / weight launch: their decode keeps 16 codes
// and 16 scales per anchor in flight, so launches take 8 at a time.
constexpr int kCompactChunk = 8;
static_assert(sizeof(KVRef) == 40, "KVRef is shared by host and device: keep it plain");
// A kernel's parameters may take 4 KB (32 KB only from CUDA 12.1 on Volta+);
// a table plus the largest argument struct (~250 bytes) must stay under that.
static_assert(sizeof(RefTable) + 512 <= 4096, "RefTable too big for the kernel parameters");

// The blocks of 256 threads per SM that the score and offset kernels ask
// ptxas for in __launch_bounds__, i.e. a budget of 65536 / (256 * blocks)
// registers per thread. Given the thread count alone, ptxas (nvcc 13.0,
// sm_90a) spilled 4-8 bytes in 9 int8 / fp8 token-score and offset kernels
// at 40-80 registers (a value stored before a loop, loaded after it); with
// the minimum stated none spills, and .ci/resource_check.py fails the build
// if one does. Two blocks (128 registers) fit every kernel.
constexpr int kMinBlocks = 2;

// A launch shape that is also meaningful to the host emulation.
struct Launch {
  unsigned grid_x = 1, grid_y = 1;
  unsigned block_x = 1, block_y = 1;
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Elements of scalar_t in one 16-byte vector (4 floats, 8 halves/bfloat16s),
// or 1 for the scalar path used with arbitrary strides.
template <typename T, bool kVec>
struct Width {
  static constexpr int value = kVec ? static_cast<int>(16 / sizeof(T)) : 1;
};

// Elements one thread reads per access of anchors read as `C`: a 16-byte
// vector of T for plain anchors; 16 codes (one 16-byte vector of codes, and
// 16 * sizeof(T) / 16 vectors of the content) for compact ones; 1 on the
// strided path.
template <typename T, Codes C, bool kVec>
struct Lanes {
  static constexpr int value = !kVec ? 1 : C == Codes::kPlain ? static_cast<int>(16 / sizeof(T)) : 16;
};

// The 16 bytes at p (16-byte aligned) into out.
KVCOMM_HD void load16(const void* p, void* out) {
#if defined(__CUDA_ARCH__)
  // One 128-bit global load (LDG.E.128). In PTX, like the store below: a
  // C++ dereference of a pointer read from a table (the offset kernel's
  // delta views) is a generic load (LD.E.128), since nvcc cannot tell the
  // pointer is global. volatile keeps the loads in order with the stores
  // (an in-place move reads and writes the same rows).
#if defined(KVCOMM_PLAIN_CXX_VECTOR_ACCESS)
  const uint4 bits = *reinterpret_cast<const uint4*>(p);
#else
  uint4 bits;
  asm volatile("ld.global.v4.b32 {%0, %1, %2, %3}, [%4];"
               : "=r"(bits.x), "=r"(bits.y), "=r"(bits.z), "=r"(bits.w)
               : "l"(__cvta_generic_to_global(p)));
#endif
  memcpy(out, &bits, 16);
#else
  KVCOMM_HOST_CHECK_VECTOR_ALIGNED(p);
  memcpy(out, p, 16);
#endif
}

// Reads Width elements starting at p (contiguous when kVec; the caller has
// checked 16-byte alignment) and widens them to float.
template <typename T, bool kVec>
KVCOMM_HD void load_float(const T* p, float* out) {
  constexpr int V = Width<T, kVec>::value;
  if constexpr (V == 1) {
    out[0] = static_cast<float>(p[0]);
  } else {
    T e[V];
    load16(p, e);
#pragma unroll
    for (int v = 0; v < V; ++v) out[v] = static_cast<float>(e[v]);
  }
}

// N consecutive elements of T at p widened to float: N * sizeof(T) / 16
// vector loads when kVec (p 16-byte aligned), else N == 1.
template <typename T, int N, bool kVec>
KVCOMM_HD void load_span(const T* p, float* out) {
  if constexpr (!kVec) {
    static_assert(N == 1, "the strided path reads one element");
    out[0] = static_cast<float>(p[0]);
  } else {
    constexpr int W = Width<T, true>::value;
    static_assert(N % W == 0, "a span is whole vectors");
#pragma unroll
    for (int j = 0; j < N / W; ++j) load_float<T, true>(p + j * W, out + j * W);
  }
}

// Narrows Width floats to T (round to nearest even, as on the CPU) and
// writes them at p.
template <typename T, bool kVec>
KVCOMM_HD void store_float(T* p, const float* in) {
  constexpr int V = Width<T, kVec>::value;
  if constexpr (V == 1) {
    p[0] = static_cast<T>(in[0]);
  } else {
    T e[V];
#pragma unroll
    for (int v = 0; v < V; ++v) e[v] = static_cast<T>(in[v]);
#if defined(__CUDA_ARCH__)
    uint4 bits;
    memcpy(&bits, e, 16);
    // One 128-bit store instruction (STG.E.128). Written in PTX because the
    // C++ spellings (a uint4 assignment, make_uint4, alignas(16),
    // __builtin_assume_aligned) all came out of nvcc 13 as four 32-bit STGs
    // in the offset kernels, while the matching loads were 128-bit. The
    // "memory" clobber keeps it ordered like the C++ store it replaces.
    // .ci/sass_check.py fails the build if a vector kernel loses this.
#if defined(KVCOMM_PLAIN_CXX_VECTOR_ACCESS)
    *reinterpret_cast<uint4*>(p) = bits;
#else
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};"
                 :
                 : "l"(__cvta_generic_to_global(p)), "r"(bits.x), "r"(bits.y), "r"(bits.z),
                   "r"(bits.w)
                 : "memory");
#endif
#else
    KVCOMM_HOST_CHECK_VECTOR_ALIGNED(p);
    memcpy(p, e, 16);
#endif
  }
}

// N floats narrowed to T and written at p: N * sizeof(T) / 16 vector stores
// when kVec, else N == 1.
template <typename T, int N, bool kVec>
KVCOMM_HD void store_span(T* p, const float* in) {
  if constexpr (!kVec) {
    static_assert(N == 1, "the strided path writes one element");
    p[0] = static_cast<T>(in[0]);
  } else {
    constexpr int W = Width<T, true>::value;
    static_assert(N % W == 0, "a span is whole vectors");
#pragma unroll
    for (int j = 0; j < N / W; ++j) store_float<T, true>(p + j * W, in + j * W);
  }
}

// One read of an auxiliary input (weights, inv_freq, shift, the device table
// of delta views) through the read-only data path (LDG.CONSTANT): a kernel
// never writes them, and the argument checks reject a dst that overlaps
// them, so the non-coherent path is allowed. Keeping them off plain LDGs
// also lets .ci/sass_check.py demand that every plain LDG of a vector kernel
// (the KV data) is a 128-bit one.
template <typename X>
KVCOMM_HD X load_ro(const X* p) {
#if defined(__CUDA_ARCH__)
  return __ldg(p);
#else
  return *p;
#endif
}

template <typename T>
KVCOMM_HD const T* elem(const KVRef& r, int64_t l, int64_t h, int64_t t, int64_t d) {
  return static_cast<const T*>(r.ptr) + r.s.at(l, h, t, d);
}

// V consecutive floats of an auxiliary input (weights, scales) through the
// read-only path; as float4 loads when vec4 (16-byte aligned; V is then a
// multiple of 4).
template <int V>
KVCOMM_HD void load_floats_ro(const float* w, bool vec4, float* out) {
#if defined(__CUDA_ARCH__)
  if constexpr (V % 4 == 0) {
    if (vec4) {
#pragma unroll
      for (int v = 0; v < V; v += 4) {
        const float4 q = load_ro(reinterpret_cast<const float4*>(w + v));
        out[v] = q.x;
        out[v + 1] = q.y;
        out[v + 2] = q.z;
        out[v + 3] = q.w;
      }
      return;
    }
  }
#else
  // The device takes the float4 path here: it needs 16-byte alignment.
  if (V % 4 == 0 && vec4) KVCOMM_HOST_CHECK_VECTOR_ALIGNED(w);
#endif
  (void)vec4;
#pragma unroll
  for (int v = 0; v < V; ++v) out[v] = load_ro(w + v);
}

// Channels of a compact vector read that a thread decodes at once: one
// float4 of scales. All 16 at once kept 16 scales per anchor (and, in the
// fused offset, 16 weights per side) live beside the codes. Plain anchors
// and the strided path take their whole span in one group.
// Scales depend on (layer, head, channel), not on the token. Segment weights,
// whose threads walk tokens at one channel, read them once per thread. The
// vector kernels' threads walk rows at one token (offset, token weights:
// their sums are per token) or a flat grid (distances) whose next item,
// gridDim.x * 256 items on, is in another row unless the content has more
// than ~16K tokens (head_dim 128, 132 SMs); so they read a lane's scales once
// per row and anchor, a float4 at a time.
template <Codes C, int N, bool kVec>
struct Group {
  static constexpr int value = C != Codes::kPlain && kVec ? 4 : N;
};

// The N values of anchor r at (l, h, t, c..c+N-1) as floats, one group of
// G = Group channels at a time: f(g, y) gets y[0..G) = channels c+g.. . Read
// in T for plain anchors (Lanes: N vectors' worth), or as N one-byte codes
// (one 16-byte load when kVec) times their channels' scales, decoded here in
// registers.
template <typename T, Codes C, int N, bool kVec, class F>
KVCOMM_HD void anchor_groups(const KVRef& r, const ScaleRef& sc, int64_t l, int64_t h, int64_t t,
                             int64_t c, F&& f) {
  if constexpr (C == Codes::kPlain) {
    (void)sc;
    float y[N];
    load_span<T, N, kVec>(elem<T>(r, l, h, t, c), y);
    f(0, y);
  } else {
    constexpr int G = Group<C, N, kVec>::value;
    const uint8_t* p = elem<uint8_t>(r, l, h, t, c);
    uint8_t code[N];
    if constexpr (kVec) {
      static_assert(N == 16, "compact vector reads are 16 codes");
      load16(p, code);
    } else {
      code[0] = p[0];
    }
    const float* scale = sc.ptr + l * sc.layer + h * sc.head + c;
#pragma unroll
    for (int g = 0; g < N; g += G) {
      float y[G];
      load_floats_ro<G>(scale + g, kVec, y);
#pragma unroll
      for (int v = 0; v < G; ++v) y[v] = math::decode_code<C>(code[g + v]) * y[v];
      f(g, y);
    }
  }
}

#if defined(__CUDACC__)
// Sum of v over the `width` consecutive lanes of a warp that share a group
// (width a power of two <= 32, groups aligned to width).
template <typename F>
__device__ __forceinline__ F group_sum(F v, int width) {
  for (int o = width / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o, width);
  return v;
}
#endif

}  // namespace cuda
}  // namespace kvcomm
