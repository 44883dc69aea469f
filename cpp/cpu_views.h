// From tensors to the raw views of the CPU kernel plans (cpu_kernels.h).
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "cpu_kernels.h"

namespace kvcomm {
namespace cpu {

// The stored type of a KV tensor the checks accepted.
KVType kv_type(const at::Tensor& t, const char* op);

Dims dims_of(const at::Tensor& t);

// Whether t's channels (last dim) are contiguous, as every plan view needs.
bool unit_channels(const at::Tensor& t);

// Read-only views of inputs. An input whose channels are strided (a
// transposed or ::2 view) is copied to a contiguous tensor first, kept alive
// here for as long as the views are used; any other strides are read in place.
class Inputs {
 public:
  RowsIn rows(const at::Tensor& t);
  std::vector<RowsIn> rows(at::TensorList ts);
  // Compact rows: codes [L, H, *, D] with their float32 scales [L, H, 1, D]
  // (scales undefined: plain rows, as above).
  std::vector<RowsIn> rows(at::TensorList codes, at::TensorList scales);

 private:
  std::vector<at::Tensor> copies_;
};

// Writable view of t, which must have contiguous channels.
RowsOut rows_out(const at::Tensor& t);

// Tasks per thread at least (at::parallel_for's grain), so a small problem
// stays on one thread instead of paying for waking the others.
int64_t grain(int64_t elements_per_task);

}  // namespace cpu
}  // namespace kvcomm
