// The executor that runs the kernels of launchers.cuh on the GPU: the device
// guard of the op's tensors, the current stream, and one launch function per
// kernel (kernel_launch.cuh). Launches are asynchronous; the only check is
// cudaGetLastError, which does not wait for the device.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <array>
#include <atomic>
#include <cstring>
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
  explicit CudaExec(const at::Tensor& like)
      : guard_(like.device()),
        stream_(at::cuda::getCurrentCUDAStream()),
        sms_(multiprocessors(like.device().index())) {}

  int sm_count() const { return sms_; }

  // More deltas than fit in the kernel parameters: their table goes to the
  // device by an asynchronous copy from pinned memory on the op's stream
  // (the caching host allocator keeps the source alive until it is done).
  const KVRef* upload(const std::vector<KVRef>& refs, const at::Tensor& like, at::Tensor& keep) {
    const int64_t bytes = static_cast<int64_t>(refs.size() * sizeof(KVRef));
    at::Tensor host =
        at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    std::memcpy(host.data_ptr(), refs.data(), bytes);
    keep = host.to(like.device(), /*non_blocking=*/true);
    return static_cast<const KVRef*>(keep.data_ptr());
  }

  template <typename T, bool kVec, bool kRotate>
  void offset(const Launch& g, const OffsetArgs& a, const RefTable& table) {
    C10_CUDA_CHECK((launch_offset<T, kVec, kRotate>(g, a, table, stream_)));
  }

  template <typename T, bool kVec, int NMAX>
  void distances(const Launch& g, const DistanceArgs& a, const RefTable& table) {
    C10_CUDA_CHECK((launch_distances<T, kVec, NMAX>(g, a, table, stream_)));
  }
  void distances_finish(const DistanceFinishArgs& a) {
    C10_CUDA_CHECK(launch_distances_finish(a, stream_));
  }
  void decide(const DecideArgs& a) { C10_CUDA_CHECK(launch_decide(a, stream_)); }

  template <typename T, bool kVec, int NMAX>
  void token_scores(const Launch& g, const TokenArgs& a, const RefTable& table) {
    C10_CUDA_CHECK((launch_token_scores<T, kVec, NMAX>(g, a, table, stream_)));
  }
  void token_finish(const TokenFinishArgs& a) { C10_CUDA_CHECK(launch_token_finish(a, stream_)); }

  template <typename T, int NMAX>
  void segment_scores(const Launch& g, const SegmentArgs& a, const RefTable& table) {
    C10_CUDA_CHECK((launch_segment_scores<T, NMAX>(g, a, table, stream_)));
  }
  void segment_finish(const SegmentFinishArgs& a) {
    C10_CUDA_CHECK(launch_segment_finish(a, stream_));
  }

 private:
  c10::cuda::CUDAGuard guard_;
  cudaStream_t stream_;
  int sms_;
};

}  // namespace cuda
}  // namespace kvcomm
