// Launches of the fused offset / RoPE move kernel (offset_kernel.cuh), for
// every storage type and path. Torch-free but for the two 16-bit float types.
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

template <typename T, bool kVec, bool kRotate>
cudaError_t launch_offset(const Launch& g, const OffsetArgs& a, const RefTable& table,
                          cudaStream_t stream) {
  offset_kernel<T, kVec, kRotate>
      <<<dim3(g.grid_x, g.grid_y), dim3(g.block_x, g.block_y), 0, stream>>>(a, table);
  return cudaGetLastError();
}

#define KVCOMM_INSTANTIATE_OFFSET(T)                                                        \
  template cudaError_t launch_offset<T, false, false>(const Launch&, const OffsetArgs&,     \
                                                      const RefTable&, cudaStream_t);       \
  template cudaError_t launch_offset<T, false, true>(const Launch&, const OffsetArgs&,      \
                                                     const RefTable&, cudaStream_t);        \
  template cudaError_t launch_offset<T, true, false>(const Launch&, const OffsetArgs&,      \
                                                     const RefTable&, cudaStream_t);        \
  template cudaError_t launch_offset<T, true, true>(const Launch&, const OffsetArgs&,       \
                                                    const RefTable&, cudaStream_t);

KVCOMM_INSTANTIATE_OFFSET(float)
KVCOMM_INSTANTIATE_OFFSET(c10::Half)
KVCOMM_INSTANTIATE_OFFSET(c10::BFloat16)

}  // namespace cuda
}  // namespace kvcomm
