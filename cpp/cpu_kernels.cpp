// Picks the build of the CPU inner loops for this machine, once.
#include "cpu_kernels.h"

#include <ATen/Version.h>

#include <algorithm>
#include <string>

namespace kvcomm {
namespace cpu {

int64_t row_chunks(int64_t rows) {
  // Enough chunks for the thread counts a CPU host gives one process, few
  // enough that the per-chunk partial sums stay small; fixed by the row
  // count alone so the sums never depend on the thread count.
  return std::max<int64_t>(1, std::min<int64_t>(rows, 32));
}

const KernelTable& kernels() {
  // ATen's capability ("DEFAULT", "AVX2", "AVX512", ...): what its own
  // kernels use on this machine, lowered by ATEN_CPU_CAPABILITY=default (how
  // the tests run the portable build). AVX-512 machines take the AVX2 build:
  // these loops are bound by memory, not by vector width.
  static const KernelTable table = [] {
    const std::string cap = at::get_cpu_capability();
    const bool avx2 = cap == "AVX2" || cap == "AVX512";
    return have_kernels_avx2() && avx2 ? kernels_avx2() : kernels_default();
  }();
  return table;
}

}  // namespace cpu
}  // namespace kvcomm
