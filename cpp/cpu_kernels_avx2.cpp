// The CPU inner loops built for AVX2 + FMA + F16C (ATen's "AVX2" capability:
// 8 float lanes, fused multiply-add, fp16 converted in hardware), picked at
// run time by kernels() on machines that have them.
//
// setup.py builds every source with one set of flags, so the instruction set
// is raised for this file's code only, with GCC's target pragma, the way
// ATen builds its *_AVX2 kernel files with -mavx2. The pragma applies to the
// functions defined after it, so everything that is not vector code (the
// standard library, c10's Half/BFloat16 conversions, ATen's scalar math) is
// included before it and stays at the baseline: an inline function another
// file also uses must never be compiled for AVX2 here, or the linker could
// keep this copy for both. Everything defined after the pragma lives in
// at::vec::AVX2 (ATen's CPU_CAPABILITY namespace) or in this file's anonymous
// namespace. tests/ops/test_cpu_kernels.py checks the built library for it.
#include "cpu_kernels.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define KVCOMM_BUILD_AVX2 1
#endif

#ifdef KVCOMM_BUILD_AVX2
// Baseline-target prelude: every header the vector headers include that
// defines code outside the CPU_CAPABILITY namespace.
#include <ATen/NumericUtils.h>
#include <ATen/native/Math.h>
#include <ATen/native/cpu/zmath.h>
#include <ATen/native/quantized/AffineQuantizerBase.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>
#include <c10/util/Load.h>
#include <c10/util/TypeCast.h>
#include <c10/util/complex.h>
#include <c10/util/copysign.h>
#include <c10/util/irange.h>
#include <c10/util/qint32.h>
#include <c10/util/qint8.h>
#include <c10/util/quint8.h>

#include <algorithm>
#include <array>
#include <cassert>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <ostream>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <immintrin.h>

#include "kvcomm/math.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
// ATen's AVX2 headers define lambdas returning __m256, which GCC reports as
// an ABI change when it parses them; they are compiled for AVX2 all the same
// and never cross into baseline code.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
// The pragma does not define the ISA macros (GCC 12), and SLEEF declares the
// 8-lane functions that ATen's AVX2 Vectorized<float> refers to only under
// __AVX__: define it for that one header, declarations only.
#ifndef __AVX__
#define __AVX__ 1
#define KVCOMM_DEFINED_AVX_FOR_SLEEF
#endif
#include <sleef.h>
#ifdef KVCOMM_DEFINED_AVX_FOR_SLEEF
#undef __AVX__
#undef KVCOMM_DEFINED_AVX_FOR_SLEEF
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define KVCOMM_ISA isa_avx2
#include "cpu_kernels_impl.h"
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif  // KVCOMM_BUILD_AVX2

namespace kvcomm {
namespace cpu {

// Baseline code again: safe to call on any machine.
#ifdef KVCOMM_BUILD_AVX2
bool have_kernels_avx2() { return true; }
KernelTable kernels_avx2() {
  return {"avx2", &isa_avx2::distances_entry, &isa_avx2::weights_entry,
          &isa_avx2::offset_entry};
}
#else
bool have_kernels_avx2() { return false; }
KernelTable kernels_avx2() { return kernels_default(); }
#endif

}  // namespace cpu
}  // namespace kvcomm
