// A CPU model of the CUDA kernels, for testing them on machines without a
// GPU. HostExec has the interface of CudaExec (cuda_exec.cuh) but runs every
// launch as loops over blocks and threads on the host, calling the very same
// per-thread bodies (offset_thread, distance_accumulate, token_accumulate,
// segment_accumulate, the finalize functions, the compact-code decode) with the launch shapes that
// launchers.cuh planned. What it checks: the launchers (checks, vector/strided
// choice, anchor chunking, the device table for many deltas, launch shapes)
// and all index arithmetic. It also checks, on every launch, what a GPU
// would refuse or get wrong silently: CUDA's grid and block limits, the
// kernels' __launch_bounds__ (256 threads), the block shapes their shuffles
// and shared-memory reductions assume, no zero-size grids, and that every
// 16-byte vector access is 16-byte aligned (a host memcpy would not care).
// What it cannot check: the shuffles and shared memory themselves, races
// between threads (they run one after another here), the device branch of
// the 16-byte accesses (PTX on the GPU, memcpy here; .ci/sass_check.py reads
// their machine code) and timing; those need a GPU (the cuda backend of tests/ops runs the real kernels when one is
// present).
//
// Not part of the extension: tests/ops/backends.py compiles it with the host
// compiler into a throwaway library that registers torch.ops.kvcomm_emu.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

// Must come before the kernel headers, which default it to a no-op.
#ifdef KVCOMM_KERNEL_COMMON_INCLUDED
#error "include host_emulation.cuh before any kvcomm kernel header"
#endif
#define KVCOMM_HOST_CHECK_VECTOR_ALIGNED(p)                                            \
  TORCH_INTERNAL_ASSERT(reinterpret_cast<uintptr_t>(p) % 16 == 0,                      \
                        "kvcomm emulation: 16-byte vector access at a misaligned address ", \
                        static_cast<const void*>(p))

#include "launchers.cuh"

namespace kvcomm {
namespace cuda {

// CUDA's limits for a launch of grid (gx, gy) x block (bx, by), and the
// kernel's __launch_bounds__ (more threads than that fail to launch).
inline void check_launch(const char* kernel, const Launch& g, unsigned max_threads) {
  TORCH_INTERNAL_ASSERT(g.grid_x >= 1 && g.grid_x <= 2147483647u, kernel, ": gridDim.x = ",
                        g.grid_x, " outside [1, 2^31-1]");
  TORCH_INTERNAL_ASSERT(g.grid_y >= 1 && g.grid_y <= 65535u, kernel, ": gridDim.y = ", g.grid_y,
                        " outside [1, 65535]");
  TORCH_INTERNAL_ASSERT(g.block_x >= 1 && g.block_y >= 1 && g.block_x <= 1024 &&
                            g.block_y <= 1024 &&
                            static_cast<uint64_t>(g.block_x) * g.block_y <= max_threads,
                        kernel, ": block ", g.block_x, " x ", g.block_y, " over ", max_threads,
                        " threads (__launch_bounds__)");
}

// The kernel variants launched since the last take_launch_log() call, as
// "offset_kernel:vector" / ":strided" (distance and token scores too): what
// tests read to tell which path a launcher chose.
inline std::vector<std::string>& launch_log() {
  static std::vector<std::string> log;
  return log;
}
template <bool kVec>
void log_launch(const char* kernel) {
  launch_log().push_back(std::string(kernel) + (kVec ? ":vector" : ":strided"));
}

class HostExec {
 public:
  // The SM count the launch planner assumes: small values make every thread
  // walk many rows / tokens, large ones give many blocks.
  static int& assumed_sms() {
    static int n = 132;
    return n;
  }

  HostExec(const char*, const at::Tensor&) {}
  int sm_count() const { return assumed_sms(); }

  template <typename R>
  R* alloc_table(int64_t n, const at::Tensor&, at::Tensor& keep) {
    keep = at::empty({n * static_cast<int64_t>(sizeof(R))}, at::TensorOptions().dtype(at::kByte));
    return static_cast<R*>(keep.data_ptr());
  }

  // store_refs_kernel / store_scale_refs_kernel: one block of kMaxParamRefs threads.
  void store_refs(const RefTable& chunk, int64_t count, KVRef* out) {
    TORCH_INTERNAL_ASSERT(count >= 1 && count <= kMaxParamRefs, "store_refs: count ", count);
    for (int64_t i = 0; i < count; ++i) store_ref(chunk, i, out);
  }
  void store_refs(const ScaleTable& chunk, int64_t count, ScaleRef* out) {
    TORCH_INTERNAL_ASSERT(count >= 1 && count <= kMaxParamRefs, "store_scale_refs: count ", count);
    for (int64_t i = 0; i < count; ++i) store_scale_ref(chunk, i, out);
  }

  template <typename T, Codes C, bool kVec, bool kRotate>
  void offset(const Launch& g, const OffsetArgs& a, const RefTable& table,
              const ScaleTable& scales) {
    check_launch("offset_kernel", g, 256);
    log_launch<kVec>("offset_kernel");
    TORCH_INTERNAL_ASSERT(static_cast<int64_t>(g.grid_x) * g.block_y >= a.tokens &&
                          static_cast<int64_t>(g.grid_y) * a.rows_per_group >= a.layers * a.heads);
    TORCH_INTERNAL_ASSERT(a.delta_table != nullptr || a.num_deltas <= kMaxParamRefs);
    TORCH_INTERNAL_ASSERT(C == Codes::kPlain || a.delta_table == nullptr || a.scale_table != nullptr,
                          "compact deltas in a device table without their scales");
    for (unsigned by = 0; by < g.grid_y; ++by)
      for (unsigned bx = 0; bx < g.grid_x; ++bx)
        for (unsigned ty = 0; ty < g.block_y; ++ty) {
          const int64_t t = static_cast<int64_t>(bx) * g.block_y + ty;
          if (t >= a.tokens) continue;
          for (unsigned tx = 0; tx < g.block_x; ++tx)
            for (int64_t k = tx; k < a.lanes; k += g.block_x)
              offset_thread<T, C, kVec, kRotate>(a, table, scales, t, k, by);
        }
  }

  template <typename T, Codes C, bool kVec, int NMAX>
  void distances(const Launch& g, const DistanceArgs& a, const RefTable& table,
                 const ScaleTable& scales) {
    check_launch("distance_kernel", g, 256);
    log_launch<kVec>("distance_kernel");
    // The block reduction: 8 full warps in x (warp_sums[8][NMAX]); thread u
    // < num_refs writes anchor u.
    TORCH_INTERNAL_ASSERT(g.block_x == 256 && g.block_y == 1 && g.grid_y == 1);
    TORCH_INTERNAL_ASSERT(a.num_refs >= 1 && a.num_refs <= NMAX);
    const int64_t step = static_cast<int64_t>(g.grid_x) * g.block_x;
    for (unsigned bx = 0; bx < g.grid_x; ++bx) {
      float block[NMAX] = {};
      for (unsigned tx = 0; tx < g.block_x; ++tx) {
        float acc[NMAX] = {};
        for (int64_t i = static_cast<int64_t>(bx) * g.block_x + tx; i < a.total; i += step)
          distance_accumulate<T, C, kVec, NMAX>(a, table, scales, i, acc);
        for (int u = 0; u < NMAX; ++u) block[u] += acc[u];
      }
      for (int64_t u = 0; u < a.num_refs; ++u) a.partial[bx * a.n_total + a.first + u] = block[u];
    }
  }

  void distances_finish(const DistanceFinishArgs& a) {
    const Launch g = plan_distance_finish(a.n);
    check_launch("distance_finish_kernel", g, 256);
    TORCH_INTERNAL_ASSERT(g.block_x % 32 == 0 && g.block_x <= 256);  // warp_sums[8]
    TORCH_INTERNAL_ASSERT(static_cast<int64_t>(g.grid_x) == a.n);
    for (int64_t u = 0; u < a.n; ++u) {
      double s = 0.0;
      for (int64_t b = 0; b < a.blocks; ++b) s += a.partial[b * a.n + u];
      a.out[u] = finish_distance(s, a.numel, a.rms);
    }
  }

  void decide(const DecideArgs& a) { decide_thread(a); }

  template <typename T, Codes C, bool kVec, int NMAX>
  void token_scores(const Launch& g, const TokenArgs& a, const RefTable& table,
                    const ScaleTable& scales) {
    check_launch("token_score_kernel", g, 256);
    log_launch<kVec>("token_score_kernel");
    // Full-mask shuffles over groups of block_x lanes: block_x a power of two
    // <= 32 and every warp full.
    TORCH_INTERNAL_ASSERT(g.block_x <= 32 && (g.block_x & (g.block_x - 1)) == 0 &&
                          (g.block_x * g.block_y) % 32 == 0);
    TORCH_INTERNAL_ASSERT(a.num_refs >= 1 && a.num_refs <= NMAX);
    TORCH_INTERNAL_ASSERT(static_cast<int64_t>(g.grid_x) * g.block_y >= a.tokens &&
                          static_cast<int64_t>(g.grid_y) * a.rows_per_group >= a.rows);
    for (unsigned by = 0; by < g.grid_y; ++by)
      for (unsigned bx = 0; bx < g.grid_x; ++bx)
        for (unsigned ty = 0; ty < g.block_y; ++ty) {
          const int64_t t = static_cast<int64_t>(bx) * g.block_y + ty;
          if (t >= a.tokens) continue;
          float group[NMAX] = {};  // the shuffle sum over the token's lanes
          for (unsigned tx = 0; tx < g.block_x; ++tx) {
            float acc[NMAX] = {};
            for (int64_t k = tx; k < a.lanes; k += g.block_x)
              token_accumulate<T, C, kVec, NMAX>(a, table, scales, t, k, by, acc);
            for (int u = 0; u < NMAX; ++u) group[u] += acc[u];
          }
          for (int64_t u = 0; u < a.num_refs; ++u)
            a.partial[(by * a.n_total + a.first + u) * a.tokens + t] = group[u];
        }
  }

  void token_finish(const TokenFinishArgs& a) {
    finish_threads("token_finish_kernel", a.tokens, [&](int64_t t) { cuda::token_finish(a, t); });
  }

  template <typename T, Codes C, int NMAX>
  void segment_scores(const Launch& g, const SegmentArgs& a, const RefTable& table,
                      const ScaleTable& scales) {
    check_launch("segment_score_kernel", g, 256);
    TORCH_INTERNAL_ASSERT(g.block_y == 1 && a.num_refs >= 1 && a.num_refs <= NMAX);
    TORCH_INTERNAL_ASSERT(static_cast<int64_t>(g.grid_x) * g.block_x >= a.channels &&
                          static_cast<int64_t>(g.grid_y) * a.tokens_per_chunk >= a.tokens);
    for (unsigned by = 0; by < g.grid_y; ++by)
      for (int64_t ch = 0; ch < static_cast<int64_t>(g.grid_x) * g.block_x; ++ch) {
        if (ch >= a.channels) continue;
        float acc[NMAX] = {};
        segment_accumulate<T, C, NMAX>(a, table, scales, ch, by, acc);
        for (int64_t u = 0; u < a.num_refs; ++u)
          a.partial[(by * a.n_total + a.first + u) * a.channels + ch] = acc[u];
      }
  }

  void segment_finish(const SegmentFinishArgs& a) {
    finish_threads("segment_finish_kernel", a.channels, [&](int64_t ch) { cuda::segment_finish(a, ch); });
  }

  // spread_kernel: one block per token; each thread's share, then the block sum.
  template <typename T, bool kTable>
  void spread(const Launch& g, const SpreadArgs& a, const RefTable& table) {
    check_launch("spread_kernel", g, kSpreadThreads);
    TORCH_INTERNAL_ASSERT(g.block_x == kSpreadThreads && g.block_y == 1 && g.grid_y == 1 &&
                          static_cast<int64_t>(g.grid_x) == a.tokens);
    TORCH_INTERNAL_ASSERT(kTable == (a.table != nullptr) && (kTable || a.num_deltas <= kMaxParamRefs));
    for (unsigned bx = 0; bx < g.grid_x; ++bx) {
      double total = 0.0;
      for (unsigned tx = 0; tx < g.block_x; ++tx)
        total += kTable ? spread_thread<T>(a, DeviceRefs{a.table}, bx, tx, g.block_x)
                        : spread_thread<T>(a, ParamRefs{table}, bx, tx, g.block_x);
      a.out[bx] = math::spread_from_sum(total, a.elements);
    }
  }

 private:
  // A finalize kernel: plan_finish's launch over `items`, one item per thread,
  // threads past the end idle (as the kernels' bounds check does).
  template <typename F>
  static void finish_threads(const char* kernel, int64_t items, F body) {
    const Launch g = plan_finish(items);
    check_launch(kernel, g, 256);
    for (unsigned bx = 0; bx < g.grid_x; ++bx)
      for (unsigned tx = 0; tx < g.block_x; ++tx) {
        const int64_t i = static_cast<int64_t>(bx) * g.block_x + tx;
        if (i < items) body(i);
      }
  }
};

// The ops, run through the CUDA launchers on the CPU model.
namespace emu {

inline void set_assumed_sms(int64_t n) { HostExec::assumed_sms() = static_cast<int>(n); }

inline std::vector<std::string> take_launch_log() {
  std::vector<std::string> out;
  out.swap(launch_log());
  return out;
}

inline at::Tensor rope_move(const at::Tensor& keys, const at::Tensor& inv_freq,
                            const at::Tensor& shift) {
  return cuda::rope_move<HostExec>(keys, inv_freq, shift);
}
inline void rope_move_(const at::Tensor& keys, const at::Tensor& inv_freq,
                       const at::Tensor& shift) {
  cuda::rope_move_<HostExec>(keys, inv_freq, shift);
}
using ScalesArg = c10::optional<at::TensorList>;

inline at::Tensor value_distances(const at::Tensor& content, at::TensorList anchors, bool rms,
                                  const ScalesArg& anchor_scales) {
  return cuda::value_distances<HostExec>(content, anchors, rms, anchor_scales);
}
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> match_decide(
    const at::Tensor& distances, double tau, double gamma, double top_p) {
  return cuda::match_decide<HostExec>(distances, tau, gamma, top_p);
}
inline at::Tensor token_weights(const at::Tensor& base, at::TensorList anchors, double tau,
                                const ScalesArg& anchor_scales) {
  return cuda::token_weights<HostExec>(base, anchors, tau, anchor_scales);
}
inline at::Tensor segment_weights(const at::Tensor& base, at::TensorList anchors, double tau,
                                  const ScalesArg& anchor_scales) {
  return cuda::segment_weights<HostExec>(base, anchors, tau, anchor_scales);
}
inline at::Tensor token_spread(at::TensorList deltas, const at::Tensor& weights) {
  return cuda::token_spread<HostExec>(deltas, weights);
}
inline at::Tensor fused_offset(const at::Tensor& base, at::TensorList deltas,
                               const at::Tensor& weights, const at::Tensor& shift,
                               const c10::optional<at::Tensor>& inv_freq,
                               const ScalesArg& delta_scales) {
  return cuda::fused_offset<HostExec>(base, deltas, weights, shift, inv_freq, delta_scales);
}
inline void fused_offset_into(const at::Tensor& dst, const at::Tensor& base,
                              at::TensorList deltas, const at::Tensor& weights,
                              const at::Tensor& shift,
                              const c10::optional<at::Tensor>& inv_freq,
                              const ScalesArg& delta_scales) {
  cuda::offset_into<HostExec>("kvcomm.fused_offset_into", dst, base, deltas, weights, shift,
                              inv_freq, delta_scales);
}

}  // namespace emu
}  // namespace cuda
}  // namespace kvcomm

// Beside the ops that tests/ops/backends.py registers from the schemas.
TORCH_LIBRARY_FRAGMENT(kvcomm_emu, m) {
  m.def("take_launch_log() -> str[]", &kvcomm::cuda::emu::take_launch_log);
}
