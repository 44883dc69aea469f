// A CPU model of the CUDA kernels, for testing them on machines without a
// GPU. HostExec has the interface of CudaExec (cuda_exec.cuh) but runs every
// launch as loops over blocks and threads on the host, calling the very same
// per-thread bodies (offset_thread, distance_accumulate, token_accumulate,
// segment_accumulate, the finalize functions) with the launch shapes that
// launchers.cuh planned. What it checks: the launchers (checks, vector/strided
// choice, anchor chunking, the device table for many deltas, launch shapes)
// and all index arithmetic. What it cannot check: warp shuffles, shared
// memory, real alignment faults and timing; those need a GPU
// (tests/test_cuda_ops.py runs the real kernels when one is present).
//
// Not part of the extension: tests/test_cuda_ops.py compiles it with the
// host compiler into a throwaway library that registers torch.ops.kvcomm_emu.
#pragma once

#include <ATen/ATen.h>

#include <cstring>
#include <tuple>
#include <vector>

#include "launchers.cuh"

namespace kvcomm {
namespace cuda {

class HostExec {
 public:
  // The SM count the launch planner assumes: small values make every thread
  // walk many rows / tokens, large ones give many blocks.
  static int& assumed_sms() {
    static int n = 132;
    return n;
  }

  explicit HostExec(const at::Tensor&) {}
  int sm_count() const { return assumed_sms(); }

  const KVRef* upload(const std::vector<KVRef>& refs, const at::Tensor&, at::Tensor& keep) {
    const int64_t bytes = static_cast<int64_t>(refs.size() * sizeof(KVRef));
    keep = at::empty({bytes}, at::TensorOptions().dtype(at::kByte));
    std::memcpy(keep.data_ptr(), refs.data(), bytes);
    return static_cast<const KVRef*>(keep.data_ptr());
  }

  template <typename T, bool kVec, bool kRotate>
  void offset(const Launch& g, const OffsetArgs& a, const RefTable& table) {
    for (unsigned by = 0; by < g.grid_y; ++by)
      for (unsigned bx = 0; bx < g.grid_x; ++bx)
        for (unsigned ty = 0; ty < g.block_y; ++ty) {
          const int64_t t = static_cast<int64_t>(bx) * g.block_y + ty;
          if (t >= a.tokens) continue;
          for (unsigned tx = 0; tx < g.block_x; ++tx)
            for (int64_t k = tx; k < a.lanes; k += g.block_x)
              offset_thread<T, kVec, kRotate>(a, table, t, k, by);
        }
  }

  template <typename T, bool kVec, int NMAX>
  void distances(const Launch& g, const DistanceArgs& a, const RefTable& table) {
    const int64_t step = static_cast<int64_t>(g.grid_x) * g.block_x;
    for (unsigned bx = 0; bx < g.grid_x; ++bx) {
      float block[NMAX] = {};
      for (unsigned tx = 0; tx < g.block_x; ++tx) {
        float acc[NMAX] = {};
        for (int64_t i = static_cast<int64_t>(bx) * g.block_x + tx; i < a.total; i += step)
          distance_accumulate<T, kVec, NMAX>(a, table, i, acc);
        for (int u = 0; u < NMAX; ++u) block[u] += acc[u];
      }
      for (int64_t u = 0; u < a.num_refs; ++u) a.partial[bx * a.n_total + a.first + u] = block[u];
    }
  }

  void distances_finish(const DistanceFinishArgs& a) {
    for (int64_t u = 0; u < a.n; ++u) {
      double s = 0.0;
      for (int64_t b = 0; b < a.blocks; ++b) s += a.partial[b * a.n + u];
      a.out[u] = finish_distance(s, a.numel, a.rms);
    }
  }

  void decide(const DecideArgs& a) { decide_thread(a); }

  template <typename T, bool kVec, int NMAX>
  void token_scores(const Launch& g, const TokenArgs& a, const RefTable& table) {
    for (unsigned by = 0; by < g.grid_y; ++by)
      for (unsigned bx = 0; bx < g.grid_x; ++bx)
        for (unsigned ty = 0; ty < g.block_y; ++ty) {
          const int64_t t = static_cast<int64_t>(bx) * g.block_y + ty;
          if (t >= a.tokens) continue;
          float group[NMAX] = {};  // the shuffle sum over the token's lanes
          for (unsigned tx = 0; tx < g.block_x; ++tx) {
            float acc[NMAX] = {};
            for (int64_t k = tx; k < a.lanes; k += g.block_x)
              token_accumulate<T, kVec, NMAX>(a, table, t, k, by, acc);
            for (int u = 0; u < NMAX; ++u) group[u] += acc[u];
          }
          for (int64_t u = 0; u < a.num_refs; ++u)
            a.partial[(by * a.n_total + a.first + u) * a.tokens + t] = group[u];
        }
  }

  void token_finish(const TokenFinishArgs& a) {
    for (int64_t t = 0; t < a.tokens; ++t) cuda::token_finish(a, t);
  }

  template <typename T, int NMAX>
  void segment_scores(const Launch& g, const SegmentArgs& a, const RefTable& table) {
    for (unsigned by = 0; by < g.grid_y; ++by)
      for (int64_t ch = 0; ch < static_cast<int64_t>(g.grid_x) * g.block_x; ++ch) {
        if (ch >= a.channels) continue;
        float acc[NMAX] = {};
        segment_accumulate<T, NMAX>(a, table, ch, by, acc);
        for (int64_t u = 0; u < a.num_refs; ++u)
          a.partial[(by * a.n_total + a.first + u) * a.channels + ch] = acc[u];
      }
  }

  void segment_finish(const SegmentFinishArgs& a) {
    for (int64_t ch = 0; ch < a.channels; ++ch) cuda::segment_finish(a, ch);
  }
};

// The ops, run through the CUDA launchers on the CPU model.
namespace emu {

inline void set_assumed_sms(int64_t n) { HostExec::assumed_sms() = static_cast<int>(n); }

inline at::Tensor rope_move(const at::Tensor& keys, const at::Tensor& inv_freq,
                            const at::Tensor& shift) {
  return cuda::rope_move<HostExec>(keys, inv_freq, shift);
}
inline void rope_move_(const at::Tensor& keys, const at::Tensor& inv_freq,
                       const at::Tensor& shift) {
  cuda::rope_move_<HostExec>(keys, inv_freq, shift);
}
inline at::Tensor value_distances(const at::Tensor& content, at::TensorList anchors, bool rms) {
  return cuda::value_distances<HostExec>(content, anchors, rms);
}
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> match_decide(
    const at::Tensor& distances, double tau, double gamma, double top_p) {
  return cuda::match_decide<HostExec>(distances, tau, gamma, top_p);
}
inline at::Tensor token_weights(const at::Tensor& base, at::TensorList anchors, double tau) {
  return cuda::token_weights<HostExec>(base, anchors, tau);
}
inline at::Tensor segment_weights(const at::Tensor& base, at::TensorList anchors, double tau) {
  return cuda::segment_weights<HostExec>(base, anchors, tau);
}
inline at::Tensor fused_offset(const at::Tensor& base, at::TensorList deltas,
                               const at::Tensor& weights, const at::Tensor& shift,
                               const c10::optional<at::Tensor>& inv_freq) {
  return cuda::fused_offset<HostExec>(base, deltas, weights, shift, inv_freq);
}
inline void fused_offset_into(const at::Tensor& dst, const at::Tensor& base,
                              at::TensorList deltas, const at::Tensor& weights,
                              const at::Tensor& shift,
                              const c10::optional<at::Tensor>& inv_freq) {
  cuda::offset_into<HostExec>("kvcomm.fused_offset_into", dst, base, deltas, weights, shift,
                              inv_freq);
}

}  // namespace emu
}  // namespace cuda
}  // namespace kvcomm
