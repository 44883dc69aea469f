#include "compact.h"

#include <ATen/ops/abs.h>
#include <ATen/ops/amax.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/round.h>
#include <ATen/ops/where.h>

namespace kvcomm {

namespace {

// Largest magnitude each scaled format represents.
constexpr double kInt8Max = 127.0;
constexpr double kFp8Max = 448.0;  // float8 e4m3fn

at::Tensor channel_scale(const char* op, const char* what, const at::Tensor& x, double top) {
  // x is float32 [L, H, T, D]; one scale per (layer, head, channel).
  if (x.size(2) == 0) return at::ones({x.size(0), x.size(1), 1, x.size(3)}, x.options());
  const at::Tensor amax = x.abs().amax({2}, /*keepdim=*/true);
  TORCH_CHECK(at::isfinite(amax).all().item<bool>(), op, ": ", what,
              " holds NaN or Inf, which int8/fp8 anchor storage cannot hold");
  return at::where(amax.gt(0), amax.div(top), at::ones({}, amax.options()));
}

}  // namespace

const char* storage_name(Storage s) {
  switch (s) {
    case Storage::kModel: return "model";
    case Storage::kBf16: return "bf16";
    case Storage::kInt8: return "int8";
    case Storage::kFp8: return "fp8";
  }
  return "unknown";
}

bool storage_has_scale(Storage s) { return s == Storage::kInt8 || s == Storage::kFp8; }

at::ScalarType storage_dtype(Storage s, at::ScalarType model) {
  switch (s) {
    case Storage::kModel: return model;
    case Storage::kBf16: return at::kBFloat16;
    case Storage::kInt8: return at::kChar;
    case Storage::kFp8: return at::kFloat8_e4m3fn;
  }
  TORCH_CHECK(false, "unknown anchor storage code ", static_cast<int>(s));
}

int64_t CompactTensor::bytes() const {
  int64_t b = data.defined() ? static_cast<int64_t>(data.nbytes()) : 0;
  if (scale.defined()) b += static_cast<int64_t>(scale.nbytes());
  return b;
}

at::Tensor CompactTensor::expand() const {
  if (!data.defined()) return data;
  if (!scale.defined()) return data.scalar_type() == dtype ? data : data.to(dtype);
  return data.to(at::kFloat).mul(scale).to(dtype);
}

CompactTensor compact(const char* op, const char* what, const at::Tensor& t, Storage s) {
  CompactTensor out;
  if (!t.defined()) return out;
  out.dtype = t.scalar_type();
  const at::ScalarType stored = storage_dtype(s, out.dtype);
  if (!storage_has_scale(s)) {
    // clone() also when the dtype changes: to() may return `t` itself.
    out.data = stored == out.dtype ? t.contiguous().clone() : t.to(stored).contiguous();
    return out;
  }
  const at::Tensor x = t.to(at::kFloat);
  const double top = s == Storage::kInt8 ? kInt8Max : kFp8Max;
  out.scale = channel_scale(op, what, x, top).contiguous();
  const at::Tensor scaled = x.div(out.scale);
  out.data = (s == Storage::kInt8 ? at::round(scaled).clamp_(-kInt8Max, kInt8Max) : scaled)
                 .to(stored)
                 .contiguous();
  return out;
}

CompactTensor restore(const char* op, const char* what, const CompactTensor& t, Storage s) {
  if (!t.defined()) return t;
  const bool same = storage_has_scale(s) == t.scale.defined() &&
                    t.data.scalar_type() == storage_dtype(s, t.dtype);
  return same ? t : compact(op, what, t.expand(), s);
}

CompactTensor restore_as(const char* op, const char* what, const CompactTensor& t, Storage s,
                         at::ScalarType dtype) {
  CompactTensor out = restore(op, what, t, s);
  if (!out.defined() || dtype == at::ScalarType::Undefined || dtype == out.dtype) return out;
  if (s == Storage::kModel) out.data = out.data.to(dtype).contiguous();
  out.dtype = dtype;
  return out;
}

}  // namespace kvcomm
