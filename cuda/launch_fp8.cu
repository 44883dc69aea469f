// Launches of every kernel for fp8 anchors / deltas (codes with per-channel
// scales, decoded in registers).
#include "launch_defs.cuh"

KVCOMM_INSTANTIATE_COMPACT_DTYPES(Codes::kFp8)
