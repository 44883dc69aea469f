// How an anchor tensor is held in the pool: the model's dtype, bf16, or int8 /
// fp8 e4m3 with per-(layer, head, channel) float32 scales (Storage in
// kvcomm/anchor_pool.h; docs/method.md, "Compact anchors").
#pragma once

#include <ATen/core/Tensor.h>

#include "kvcomm/anchor_pool.h"

namespace kvcomm {

// One stored [L, H, T, D] tensor.
struct CompactTensor {
  at::Tensor data;   // model dtype, bfloat16, int8 or float8_e4m3fn; contiguous
  at::Tensor scale;  // float32 [L, H, 1, D] for int8 / fp8, undefined otherwise
  at::ScalarType dtype = at::ScalarType::Undefined;  // the dtype it stands for

  bool defined() const { return data.defined(); }
  int64_t bytes() const;
  int64_t size(int64_t dim) const { return data.size(dim); }
  at::IntArrayRef sizes() const { return data.sizes(); }
  at::Device device() const { return data.device(); }
  // The values in `dtype` on the tensor's device. No copy when stored as is.
  at::Tensor expand() const;
};

// The data dtype a storage uses for a tensor of `model` dtype.
at::ScalarType storage_dtype(Storage s, at::ScalarType model);
bool storage_has_scale(Storage s);

// An owned copy of `t` ([L, H, T, D], any device) in storage `s`. Scales are
// amax over T per (layer, head, channel) / the format's largest value; an
// all-zero channel gets scale 1. Non-finite values are an error (they cannot
// be represented in int8 and would poison a whole channel's scale in fp8).
CompactTensor compact(const char* op, const char* what, const at::Tensor& t, Storage s);

// `t` moved to storage `s` (decoded to its dtype first when the storage
// differs; shared, not copied, when it is already in `s`).
CompactTensor restore(const char* op, const char* what, const CompactTensor& t, Storage s);

// restore() to storage `s`, standing for `dtype` afterwards (Undefined: t's own):
// model-dtype storage is cast; bf16, int8 and fp8 codes are kept as they are.
CompactTensor restore_as(const char* op, const char* what, const CompactTensor& t, Storage s,
                         at::ScalarType dtype);

}  // namespace kvcomm
