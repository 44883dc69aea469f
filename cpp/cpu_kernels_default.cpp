// The CPU inner loops built for the compiler's baseline instruction set (SSE2
// on x86-64): ATen's portable Vectorized, which the compiler maps onto the
// baseline's vector registers. Runs everywhere; kernels() uses it when the
// machine (or ATEN_CPU_CAPABILITY=default) rules out the AVX2 build.
#define CPU_CAPABILITY DEFAULT
#define KVCOMM_ISA isa_default
#include "cpu_kernels_impl.h"

namespace kvcomm {
namespace cpu {

KernelTable kernels_default() {
  return {"default", &isa_default::distances_entry, &isa_default::weights_entry,
          &isa_default::offset_entry};
}

}  // namespace cpu
}  // namespace kvcomm
