// The executor that runs the kernels of launchers.cuh on the GPU: the device
// guard of the op's tensors, the current stream, and one launch function per
// kernel (kernel_launch.cuh). Launches are asynchronous; the only checks are
// cudaGetLastError before the first launch and after each, which do not wait
// for the device.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <array>
#include <atomic>
#include <vector>

#include "kernel_launch.cuh"

namespace kvcomm {
namespace cuda {

// Streaming multiprocessors of a device, queried once per device (an
// attribute read: no synchronisation).
inline int multiprocessors(int device) {
  static std::array<std::atomic<int>, 64> cache{};
  if (device < 0 || device >= static_cast<int>(cache.size())) return 132;
  int n = cache[device].load(std::memory_order_relaxed);
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    cache[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

class CudaExec {
 public:
  // An error already pending when the op starts was raised by earlier work
  // (another op's launch, or a fault of an earlier kernel that a runtime
  // call has since reported); it is reported as such here, not blamed on the
  // first kernel this op launches.
  CudaExec(const char* op, const at::Tensor& like)
      : op_(op),
        guard_(like.device()),
        stream_(at::cuda::getCurrentCUDAStream()),
        sms_(multiprocessors(like.device().index())) {
    const cudaError_t prior = cudaGetLastError();
    TORCH_CHECK(prior == cudaSuccess, op_,
                ": a CUDA error was pending before this op launched anything, raised by earlier "
                "work on the device: ",
                cudaGetErrorName(prior), ": ", cudaGetErrorString(prior));
  }

  int sm_count() const { return sms_; }

  // Room for n entries of R (KVRef, ScaleRef) in device memory on the op's
  // device; `keep` owns it (freed when the launcher returns: the caching
  // allocator reuses it only for work queued after this op on the same
  // stream).
  template <typename R>
  R* alloc_table(int64_t n, const at::Tensor& like, at::Tensor& keep) {
    keep = at::empty({n * static_cast<int64_t>(sizeof(R))}, like.options().dtype(at::kByte));
    return static_cast<R*>(keep.data_ptr());
  }

  // count (<= kMaxParamRefs) entries of a device table, from the kernel
  // parameters of one tiny launch (no host memory: safe in graph capture).
  void store_refs(const RefTable& chunk, int64_t count, KVRef* out) {
    check("store_refs_kernel", launch_store_refs(chunk, count, out, stream_));
  }
  void store_refs(const ScaleTable& chunk, int64_t count, ScaleRef* out) {
    check("store_scale_refs_kernel", launch_store_scale_refs(chunk, count, out, stream_));
  }

  template <typename T, Codes C, bool kVec, bool kRotate>
  void offset(const Launch& g, const OffsetArgs& a, const RefTable& table,
              const ScaleTable& scales) {
    check("offset_kernel", launch_offset<T, C, kVec, kRotate>(g, a, table, scales, stream_));
  }

  template <typename T, Codes C, bool kVec, int NMAX>
  void distances(const Launch& g, const DistanceArgs& a, const RefTable& table,
                 const ScaleTable& scales) {
    check("distance_kernel", launch_distances<T, C, kVec, NMAX>(g, a, table, scales, stream_));
  }
  void distances_finish(const DistanceFinishArgs& a) {
    check("distance_finish_kernel", launch_distances_finish(a, stream_));
  }
  void decide(const DecideArgs& a) { check("decide_kernel", launch_decide(a, stream_)); }

  template <typename T, Codes C, bool kVec, int NMAX>
  void token_scores(const Launch& g, const TokenArgs& a, const RefTable& table,
                    const ScaleTable& scales) {
    check("token_score_kernel",
          launch_token_scores<T, C, kVec, NMAX>(g, a, table, scales, stream_));
  }
  void token_finish(const TokenFinishArgs& a) {
    check("token_finish_kernel", launch_token_finish(a, stream_));
  }

  template <typename T, Codes C, int NMAX>
  void segment_scores(const Launch& g, const SegmentArgs& a, const RefTable& table,
                      const ScaleTable& scales) {
    check("segment_score_kernel", launch_segment_scores<T, C, NMAX>(g, a, table, scales, stream_));
  }
  void segment_finish(const SegmentFinishArgs& a) {
    check("segment_finish_kernel", launch_segment_finish(a, stream_));
  }

  template <typename T, bool kTable>
  void spread(const Launch& g, const SpreadArgs& a, const RefTable& table) {
    check("spread_kernel", launch_spread<T, kTable>(g, a, table, stream_));
  }

 private:
  // The result of cudaGetLastError() right after a launch: a launch error of
  // this kernel, or an asynchronous fault of work queued before it that
  // completed meanwhile (only a synchronisation could tell them apart).
  void check(const char* kernel, cudaError_t err) const {
    TORCH_CHECK(err == cudaSuccess, op_, ": CUDA error right after launching ", kernel, ": ",
                cudaGetErrorName(err), ": ", cudaGetErrorString(err),
                " (if the launch itself was fine, this is an asynchronous fault of earlier work; "
                "CUDA_LAUNCH_BLOCKING=1 pins it to its kernel)");
  }

  const char* op_;
  c10::cuda::CUDAGuard guard_;
  cudaStream_t stream_;
  int sms_;
};

}  // namespace cuda
}  // namespace kvcomm
