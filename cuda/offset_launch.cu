// Launches of the fused offset / RoPE move kernel (offset_kernel.cuh), for
// every storage type, delta form (plain or compact codes) and path. Torch-free but for the two 16-bit float types.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "kernel_launch.cuh"

namespace kvcomm {
namespace cuda {

// Entry i of a delta table chunk (offset_kernel.cuh: store_ref). Defined
// here, not in the header, because a non-template kernel may be defined in
// only one translation unit.
__global__ void __launch_bounds__(kMaxParamRefs)
    store_refs_kernel(const KVCOMM_GRID_CONSTANT RefTable chunk, int count, KVRef* out) {
  if (static_cast<int>(threadIdx.x) < count) store_ref(chunk, threadIdx.x, out);
}

cudaError_t launch_store_refs(const RefTable& chunk, int64_t count, KVRef* out,
                              cudaStream_t stream) {
  store_refs_kernel<<<1, kMaxParamRefs, 0, stream>>>(chunk, static_cast<int>(count), out);
  return cudaGetLastError();
}

__global__ void __launch_bounds__(kMaxParamRefs)
    store_scale_refs_kernel(const KVCOMM_GRID_CONSTANT ScaleTable chunk, int count,
                            ScaleRef* out) {
  if (static_cast<int>(threadIdx.x) < count) store_scale_ref(chunk, threadIdx.x, out);
}

cudaError_t launch_store_scale_refs(const ScaleTable& chunk, int64_t count, ScaleRef* out,
                                    cudaStream_t stream) {
  store_scale_refs_kernel<<<1, kMaxParamRefs, 0, stream>>>(chunk, static_cast<int>(count), out);
  return cudaGetLastError();
}

template <typename T, Codes C, bool kVec, bool kRotate>
cudaError_t launch_offset(const Launch& g, const OffsetArgs& a, const RefTable& table,
                          const ScaleTable& scales, cudaStream_t stream) {
  offset_kernel<T, C, kVec, kRotate>
      <<<dim3(g.grid_x, g.grid_y), dim3(g.block_x, g.block_y), 0, stream>>>(a, table, scales);
  return cudaGetLastError();
}

#define KVCOMM_INSTANTIATE_OFFSET(T, C, VEC, ROT)                                           \
  template cudaError_t launch_offset<T, C, VEC, ROT>(const Launch&, const OffsetArgs&,      \
                                                     const RefTable&, const ScaleTable&,    \
                                                     cudaStream_t);
#define KVCOMM_INSTANTIATE_OFFSET_PATHS(T, C) \
  KVCOMM_INSTANTIATE_OFFSET(T, C, false, false) \
  KVCOMM_INSTANTIATE_OFFSET(T, C, false, true)  \
  KVCOMM_INSTANTIATE_OFFSET(T, C, true, false)  \
  KVCOMM_INSTANTIATE_OFFSET(T, C, true, true)
#define KVCOMM_INSTANTIATE_OFFSET_ALL(T)                \
  KVCOMM_INSTANTIATE_OFFSET_PATHS(T, Codes::kPlain) \
  KVCOMM_INSTANTIATE_OFFSET_PATHS(T, Codes::kInt8)  \
  KVCOMM_INSTANTIATE_OFFSET_PATHS(T, Codes::kFp8)

KVCOMM_INSTANTIATE_OFFSET_ALL(float)
KVCOMM_INSTANTIATE_OFFSET_ALL(c10::Half)
KVCOMM_INSTANTIATE_OFFSET_ALL(c10::BFloat16)

}  // namespace cuda
}  // namespace kvcomm
