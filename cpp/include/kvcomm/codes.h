// Compact anchor codes, torch-free: how the ops read anchors (or deltas) held
// as int8 or fp8 e4m3 codes with one float32 scale per (layer, head, channel)
// (docs/method.md, "Compact anchors"). A value is code * scale[l, h, 0, d]. Shared by
// the argument checks and the CUDA kernels, which decode in registers.
#pragma once

#include <cstdint>
#include <cstring>

#include "kvcomm/math.h"

namespace kvcomm {

// kPlain: the anchors have the content's dtype; no scales.
enum class Codes : int { kPlain = 0, kInt8 = 1, kFp8 = 2 };

namespace math {

// The float value of an fp8 e4m3fn code (no infinities; 0x7f / 0xff are NaN),
// exact for every code. The code's exponent and mantissa bits are moved into a
// float's fields as they are; that float is the value times 2^-120 (e4m3's
// exponent bias is 7, float's 127), subnormal codes included (they become
// float subnormals), so one multiply by 2^120 finishes it. Exact as long as
// float subnormals are not flushed to zero (nvcc's default; the build does not
// use fast math).
KVCOMM_HD float fp8_e4m3_to_float(uint8_t code) {
  const uint32_t sign = static_cast<uint32_t>(code & 0x80u) << 24;
  const uint32_t mag = code & 0x7fu;
  const uint32_t bits = mag == 0x7fu ? (sign | 0x7fc00000u) : (sign | (mag << 20));
  float f;
  memcpy(&f, &bits, sizeof f);
  return f * 1.329227995784915872903807060280344576e36f;  // 2^120
}

template <Codes C>
KVCOMM_HD float decode_code(uint8_t code) {
  static_assert(C != Codes::kPlain, "plain anchors hold values, not codes");
  if constexpr (C == Codes::kInt8) {
    return static_cast<float>(static_cast<int8_t>(code));
  } else {
    return fp8_e4m3_to_float(code);
  }
}

}  // namespace math
}  // namespace kvcomm
