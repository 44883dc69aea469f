// Launch of the per-token spread kernel (spread_kernels.cuh).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "kernel_launch.cuh"

namespace kvcomm {
namespace cuda {

template <typename T, bool kTable>
cudaError_t launch_spread(const Launch& g, const SpreadArgs& a, const RefTable& table,
                          cudaStream_t stream) {
  spread_kernel<T, kTable><<<g.grid_x, g.block_x, 0, stream>>>(a, table);
  return cudaGetLastError();
}

#define KVCOMM_INSTANTIATE_SPREAD(T)                                                        \
  template cudaError_t launch_spread<T, false>(const Launch&, const SpreadArgs&,            \
                                               const RefTable&, cudaStream_t);              \
  template cudaError_t launch_spread<T, true>(const Launch&, const SpreadArgs&,             \
                                              const RefTable&, cudaStream_t);

KVCOMM_INSTANTIATE_SPREAD(float)
KVCOMM_INSTANTIATE_SPREAD(c10::Half)
KVCOMM_INSTANTIATE_SPREAD(c10::BFloat16)

}  // namespace cuda
}  // namespace kvcomm
