// Registers the CPU implementations under the schemas of schemas.cpp.
#include <torch/library.h>

#include "cpu_ops.h"

TORCH_LIBRARY_IMPL(kvcomm, CPU, m) {
  m.impl("rope_move", &kvcomm::cpu::rope_move);
  m.impl("rope_move_", &kvcomm::cpu::rope_move_);
  m.impl("value_distances", &kvcomm::cpu::value_distances);
  m.impl("match_decide", &kvcomm::cpu::match_decide);
  m.impl("token_weights", &kvcomm::cpu::token_weights);
  m.impl("segment_weights", &kvcomm::cpu::segment_weights);
  m.impl("fused_offset", &kvcomm::cpu::fused_offset);
  m.impl("fused_offset_into", &kvcomm::cpu::fused_offset_into);
}
