// Launches of every kernel for plain anchors / deltas (the content's dtype).
#include "launch_defs.cuh"

KVCOMM_INSTANTIATE_PLAIN_DTYPES()
