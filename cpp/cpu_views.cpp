#include "cpu_views.h"

#include <algorithm>

#include "dispatch.h"

namespace kvcomm {
namespace cpu {

namespace {

template <typename T>
struct KVTypeOf;
template <>
struct KVTypeOf<float> {
  static constexpr KVType value = KVType::kFloat;
};
template <>
struct KVTypeOf<c10::Half> {
  static constexpr KVType value = KVType::kHalf;
};
template <>
struct KVTypeOf<c10::BFloat16> {
  static constexpr KVType value = KVType::kBFloat16;
};

}  // namespace

KVType kv_type(const at::Tensor& t, const char* op) {
  KVType out = KVType::kFloat;
  KVCOMM_DISPATCH_KV_TYPES(t.scalar_type(), "kvcomm CPU kernel", [&] { out = KVTypeOf<scalar_t>::value; });
  return out;
}

Dims dims_of(const at::Tensor& t) {
  return {t.size(0), t.size(1), t.size(2), t.size(3)};
}

bool unit_channels(const at::Tensor& t) {
  // An empty tensor has nothing to read or write, whatever its strides say
  // (and contiguous() would return it unchanged).
  return t.numel() == 0 || t.size(3) <= 1 || t.stride(3) == 1;
}

RowsIn Inputs::rows(const at::Tensor& t) {
  const at::Tensor* v = &t;
  if (!unit_channels(t)) {
    copies_.push_back(t.contiguous());
    v = &copies_.back();
  }
  return {v->const_data_ptr(), v->stride(0), v->stride(1), v->stride(2)};
}

std::vector<RowsIn> Inputs::rows(at::TensorList ts) {
  std::vector<RowsIn> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(rows(t));
  return out;
}

std::vector<RowsIn> Inputs::rows(at::TensorList codes, at::TensorList scales) {
  std::vector<RowsIn> out = rows(codes);
  if (scales.empty()) return out;
  TORCH_INTERNAL_ASSERT(scales.size() == codes.size(), "compact rows without a scale each");
  for (size_t u = 0; u < out.size(); ++u) {
    const at::Tensor* s = &scales[u];
    if (!unit_channels(*s)) {
      copies_.push_back(s->contiguous());
      s = &copies_.back();
    }
    out[u].scale = s->const_data_ptr<float>();
    out[u].scale_layer = s->stride(0);
    out[u].scale_head = s->stride(1);
  }
  return out;
}

RowsOut rows_out(const at::Tensor& t) {
  TORCH_INTERNAL_ASSERT(unit_channels(t), "kernel destination with strided channels");
  return {t.mutable_data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

int64_t grain(int64_t elements_per_task) {
  // ~64K elements (a quarter MB of fp32) per thread at least: well above the
  // cost of an OpenMP fork/join.
  constexpr int64_t kMinElements = int64_t{1} << 16;
  return std::max<int64_t>(1, kMinElements / std::max<int64_t>(1, elements_per_task));
}

}  // namespace cpu
}  // namespace kvcomm
