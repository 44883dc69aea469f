// The host side of every CUDA op: argument checks (shared with the CPU path,
// op_checks.h), output allocation, the choice between the vector and the
// strided path, anchor chunking and launch shapes. Written once, generic over
// an executor `Exec` that runs the kernels:
//   - CudaExec (cuda_exec.cuh) launches them on the current CUDA stream;
//   - HostExec (host_emulation.cuh) runs the same per-thread code in loops on
//     the CPU, so this file and the kernel bodies are tested without a GPU.
// Nothing here reads device memory back: no host syncs.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>

#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include "dispatch.h"
#include "matching_kernels.cuh"
#include "offset_kernel.cuh"
#include "op_checks.h"
#include "spread.h"
#include "spread_kernels.cuh"
#include "weight_kernels.cuh"

namespace kvcomm {
namespace cuda {

// 0 for a dimension of size 1 (its index is always 0, so its stride never
// moves a pointer), else the tensor's stride. torch keeps any stride for such
// a dimension, contiguous() included (a head dim of 1 sliced from a wider
// buffer, an MQA scale [L, 1, 1, D] made by as_strided); an odd one must not
// send the op to the strided path.
inline int64_t stride_used(const at::Tensor& t, int64_t d) {
  return t.size(d) == 1 ? 0 : t.stride(d);
}

inline Strides4 strides_of(const at::Tensor& t) {
  return {stride_used(t, 0), stride_used(t, 1), stride_used(t, 2), stride_used(t, 3)};
}

// A view of t starting at token `first`.
inline KVRef ref_of(const at::Tensor& t, int64_t first = 0) {
  const char* p = static_cast<const char*>(t.data_ptr());
  return {p + first * t.stride(2) * static_cast<int64_t>(t.element_size()), strides_of(t)};
}

// Whether a [L,H,T,D] view can be read in 16-byte vectors over spans of
// `span` channels: unit channel stride, all other strides and the span whole
// vectors, and a 16-byte aligned start.
inline bool vectorizable(const KVRef& r, int64_t element_size, int64_t span) {
  const int64_t w = 16 / element_size;
  return r.s.dim == 1 && span % w == 0 && r.s.layer % w == 0 && r.s.head % w == 0 &&
         r.s.token % w == 0 && reinterpret_cast<uintptr_t>(r.ptr) % 16 == 0;
}

// The scales of compact anchors (checks::anchor_codes), made contiguous
// (small: float32 [L, H, 1, D]) and held while the op runs; none for plain
// anchors.
struct Scales {
  std::vector<at::Tensor> keep;
  std::vector<ScaleRef> refs;
};
inline Scales scales_of(Codes codes, const c10::optional<at::TensorList>& scales) {
  Scales out;
  if (codes == Codes::kPlain) return out;
  out.keep.reserve(scales->size());
  for (const at::Tensor& s : *scales) {
    out.keep.push_back(s.contiguous());
    const at::Tensor& c = out.keep.back();
    out.refs.push_back({c.data_ptr<float>(), stride_used(c, 0), stride_used(c, 1)});
  }
  return out;
}

// Whether anchors read as `codes` (and their scales) allow the vector path
// over spans of `span` channels: 16-byte vectors of the anchors' dtype, or of
// 16 codes with float4-aligned scales (a span of whole 16-code vectors, which
// the content's check alone does not ensure for float16 / bfloat16).
inline bool anchors_vectorizable(const std::vector<KVRef>& refs, const Scales& scales,
                                 Codes codes, int64_t element_size, int64_t span) {
  const bool plain = codes == Codes::kPlain;
  for (const KVRef& r : refs)
    if (!vectorizable(r, plain ? element_size : 1, span)) return false;
  for (const ScaleRef& s : scales.refs)
    if (reinterpret_cast<uintptr_t>(s.ptr) % 16 != 0 || s.layer % 4 != 0 || s.head % 4 != 0)
      return false;
  return true;
}

// Vectors per span of `span` channels: Lanes (kernel_common.cuh) elements each.
inline int64_t lanes_of(Codes codes, bool vec, int64_t element_size, int64_t span) {
  if (!vec) return span;
  return span / (codes == Codes::kPlain ? 16 / element_size : 16);
}

// f(std::integral_constant<Codes, C>) for the run-time `codes`.
template <typename F>
void dispatch_codes(Codes codes, F&& f) {
  switch (codes) {
    case Codes::kPlain: f(std::integral_constant<Codes, Codes::kPlain>{}); return;
    case Codes::kInt8: f(std::integral_constant<Codes, Codes::kInt8>{}); return;
    case Codes::kFp8: f(std::integral_constant<Codes, Codes::kFp8>{}); return;
  }
  TORCH_CHECK(false, "unknown anchor codes ", static_cast<int>(codes));
}

// Runs f(first, count, table, scales) for the anchors in chunks of `chunk`
// (at most kMaxParamRefs, the tables' size); `scales` is empty for plain
// anchors.
template <typename F>
void for_ref_chunks(const std::vector<KVRef>& refs, const std::vector<ScaleRef>& scales,
                    int64_t chunk, F&& f) {
  const int64_t n = static_cast<int64_t>(refs.size());
  for (int64_t first = 0; first < n; first += chunk) {
    const int64_t count = n - first < chunk ? n - first : chunk;
    RefTable table{};
    ScaleTable scale_table{};
    for (int64_t u = 0; u < count; ++u) {
      table.r[u] = refs[first + u];
      if (!scales.empty()) scale_table.r[u] = scales[first + u];
    }
    f(first, count, table, scale_table);
  }
}

// A device table of `entries` (KVRef or ScaleRef), written chunk by chunk
// from kernel parameters (offset_kernel.cuh: store_ref); stream order makes it
// ready before the kernels that read it.
template <class Exec, typename R, typename Table>
R* device_table(Exec& ex, const std::vector<R>& entries, const at::Tensor& like,
                at::Tensor& keepalive) {
  R* table = ex.template alloc_table<R>(static_cast<int64_t>(entries.size()), like, keepalive);
  const int64_t n = static_cast<int64_t>(entries.size());
  for (int64_t first = 0; first < n; first += kMaxParamRefs) {
    const int64_t count = n - first < kMaxParamRefs ? n - first : kMaxParamRefs;
    Table chunk{};
    for (int64_t u = 0; u < count; ++u) chunk.r[u] = entries[first + u];
    ex.store_refs(chunk, count, table + first);
  }
  return table;
}

// ---- fused offset / RoPE move -------------------------------------------

template <class Exec>
void offset_into(const char* op, const at::Tensor& dst, const at::Tensor& base,
                 at::TensorList deltas, const at::Tensor& weights, const at::Tensor& shift,
                 const c10::optional<at::Tensor>& inv_freq,
                 const c10::optional<at::TensorList>& delta_scales = c10::nullopt) {
  const checks::OffsetPlan plan =
      checks::offset(op, dst, base, deltas, weights, shift, inv_freq, delta_scales);
  const checks::KVShape& s = plan.shape;
  if (dst.numel() == 0) return;
  Exec ex(op, base);
  const at::Tensor w = weights.contiguous();
  const at::Tensor sh = shift.reshape({-1}).contiguous();
  const at::Tensor f = plan.rotate ? inv_freq->contiguous() : at::Tensor();
  const Scales scales = scales_of(plan.codes, delta_scales);

  const int64_t span = plan.rotate ? s.dim / 2 : s.dim;
  const int64_t esize = base.element_size();
  std::vector<KVRef> refs;
  for (const at::Tensor& d : deltas) refs.push_back(ref_of(d));
  const KVRef dref = ref_of(dst), bref = ref_of(base);
  const bool vec = vectorizable(dref, esize, span) &&
                   vectorizable(bref, esize, span) &&
                   anchors_vectorizable(refs, scales, plan.codes, esize, span);

  OffsetArgs a{};
  a.dst = dst.data_ptr();
  a.ds = dref.s;
  a.base = bref.ptr;
  a.bs = bref.s;
  a.layers = s.layers;
  a.heads = s.heads;
  a.tokens = s.tokens;
  a.dim = s.dim;
  a.half = s.dim / 2;
  a.lanes = lanes_of(plan.codes, vec, esize, span);
  a.num_deltas = plan.num_deltas;
  a.weights = w.data_ptr<float>();
  a.per_token_weights = plan.per_token_weights;
  a.weights_vec4 = reinterpret_cast<uintptr_t>(a.weights) % 16 == 0;
  a.shift = sh.data_ptr<int64_t>();
  a.per_token_shift = plan.per_token_shift;
  a.inv_freq = plan.rotate ? f.data_ptr<float>() : nullptr;

  RefTable small{};
  ScaleTable small_scales{};
  at::Tensor table_keepalive, scale_keepalive;
  a.delta_table = nullptr;
  a.scale_table = nullptr;
  if (plan.num_deltas <= kMaxParamRefs) {
    for (size_t u = 0; u < refs.size(); ++u) small.r[u] = refs[u];
    for (size_t u = 0; u < scales.refs.size(); ++u) small_scales.r[u] = scales.refs[u];
  } else {
    a.delta_table = device_table<Exec, KVRef, RefTable>(ex, refs, base, table_keepalive);
    if (!scales.refs.empty())
      a.scale_table =
          device_table<Exec, ScaleRef, ScaleTable>(ex, scales.refs, base, scale_keepalive);
  }
  const Launch g = plan_offset(s.layers, s.heads, s.tokens, a.lanes, ex.sm_count(),
                               &a.rows_per_group);
  KVCOMM_DISPATCH_KV_TYPES(base.scalar_type(), "kvcomm.fused_offset", [&] {
    dispatch_codes(plan.codes, [&](auto codes) {
      constexpr Codes C = decltype(codes)::value;
      if (vec) {
        if (plan.rotate) ex.template offset<scalar_t, C, true, true>(g, a, small, small_scales);
        else ex.template offset<scalar_t, C, true, false>(g, a, small, small_scales);
      } else {
        if (plan.rotate) ex.template offset<scalar_t, C, false, true>(g, a, small, small_scales);
        else ex.template offset<scalar_t, C, false, false>(g, a, small, small_scales);
      }
    });
  });
}

inline at::Tensor no_weights(const at::Tensor& keys) {
  return at::empty({0, keys.dim() == 4 ? keys.size(2) : 0}, keys.options().dtype(at::kFloat));
}

template <class Exec>
at::Tensor fused_offset(const at::Tensor& base, at::TensorList deltas, const at::Tensor& weights,
                        const at::Tensor& shift, const c10::optional<at::Tensor>& inv_freq,
                        const c10::optional<at::TensorList>& delta_scales) {
  checks::kv4("kvcomm.fused_offset", "base", base);
  at::Tensor out = at::empty_like(base, at::MemoryFormat::Contiguous);
  offset_into<Exec>("kvcomm.fused_offset", out, base, deltas, weights, shift, inv_freq,
                    delta_scales);
  return out;
}

template <class Exec>
void rope_move_(const at::Tensor& keys, const at::Tensor& inv_freq, const at::Tensor& shift) {
  checks::kv4("kvcomm.rope_move_", "keys", keys);
  offset_into<Exec>("kvcomm.rope_move_", keys, keys, {}, no_weights(keys), shift, inv_freq);
}

template <class Exec>
at::Tensor rope_move(const at::Tensor& keys, const at::Tensor& inv_freq, const at::Tensor& shift) {
  checks::kv4("kvcomm.rope_move", "keys", keys);
  at::Tensor out = at::empty_like(keys, at::MemoryFormat::Contiguous);
  offset_into<Exec>("kvcomm.rope_move", out, keys, {}, no_weights(keys), shift, inv_freq);
  return out;
}

// ---- matching -------------------------------------------------------------

// The launches over anchor chunks of one score kernel (distances, token
// scores): plain anchors up to kMaxParamRefs per launch (NMAX 8 or 32),
// compact ones kCompactChunk. Calls launch(C, kVec, NMAX, first, count,
// table, scales), the first three as std::integral_constant tags.
template <typename F>
void score_chunks(Codes codes, const std::vector<KVRef>& refs, const Scales& scales, bool vec,
                  F&& launch) {
  using std::integral_constant;
  dispatch_codes(codes, [&](auto tag) {
    constexpr Codes C = decltype(tag)::value;
    const int64_t chunk = C == Codes::kPlain ? kMaxParamRefs : kCompactChunk;
    for_ref_chunks(refs, scales.refs, chunk,
                   [&](int64_t first, int64_t count, const RefTable& t, const ScaleTable& st) {
      auto run = [&](auto kvec, auto nmax) { launch(tag, kvec, nmax, first, count, t, st); };
      using Vec = std::true_type;
      using Scalar = std::false_type;
      if constexpr (C == Codes::kPlain) {
        if (count <= 8) {
          if (vec) run(Vec{}, integral_constant<int, 8>{});
          else run(Scalar{}, integral_constant<int, 8>{});
        } else {
          if (vec) run(Vec{}, integral_constant<int, kMaxParamRefs>{});
          else run(Scalar{}, integral_constant<int, kMaxParamRefs>{});
        }
      } else {
        if (vec) run(Vec{}, integral_constant<int, kCompactChunk>{});
        else run(Scalar{}, integral_constant<int, kCompactChunk>{});
      }
    });
  });
}

template <class Exec>
at::Tensor value_distances(const at::Tensor& content, at::TensorList anchors, bool rms,
                           const c10::optional<at::TensorList>& anchor_scales = c10::nullopt) {
  const char* op = "kvcomm.value_distances";
  const checks::KVShape s = checks::kv4(op, "content", content);
  const Codes codes = checks::anchor_codes(op, "anchors", content, s, anchors, anchor_scales);
  const int64_t n = static_cast<int64_t>(anchors.size());
  const auto fopts = content.options().dtype(at::kFloat);
  if (n == 0) return at::empty({0}, fopts);
  if (content.numel() == 0) return at::zeros({n}, fopts);
  Exec ex(op, content);
  const Scales scales = scales_of(codes, anchor_scales);
  std::vector<KVRef> refs;
  for (const at::Tensor& a : anchors) refs.push_back(ref_of(a));
  const int64_t esize = content.element_size();
  const KVRef cref = ref_of(content);
  const bool vec = vectorizable(cref, esize, s.dim) &&
                   anchors_vectorizable(refs, scales, codes, esize, s.dim);

  DistanceArgs a{};
  a.content = cref.ptr;
  a.cs = cref.s;
  a.heads = s.heads;
  a.tokens = s.tokens;
  a.lanes = lanes_of(codes, vec, esize, s.dim);
  a.total = s.layers * s.heads * s.tokens * a.lanes;
  a.n_total = n;
  const Launch g = plan_distances(a.total, ex.sm_count());
  at::Tensor partial = at::empty({static_cast<int64_t>(g.grid_x), n}, fopts);
  a.partial = partial.data_ptr<float>();
  KVCOMM_DISPATCH_KV_TYPES(content.scalar_type(), "kvcomm.value_distances", [&] {
    score_chunks(codes, refs, scales, vec,
                 [&](auto c, auto kvec, auto nmax, int64_t first, int64_t count,
                     const RefTable& t, const ScaleTable& st) {
                   a.first = first;
                   a.num_refs = count;
                   ex.template distances<scalar_t, decltype(c)::value, decltype(kvec)::value,
                                         decltype(nmax)::value>(g, a, t, st);
                 });
  });
  at::Tensor out = at::empty({n}, fopts);
  DistanceFinishArgs fa{partial.data_ptr<float>(), g.grid_x, n,
                        static_cast<double>(content.numel()), rms, out.data_ptr<float>()};
  ex.distances_finish(fa);
  return out;
}

template <class Exec>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> match_decide(
    const at::Tensor& distances, double tau, double gamma, double top_p) {
  const char* op = "kvcomm.match_decide";
  checks::distances(op, distances);
  checks::decide_params(op, tau, gamma, top_p);
  Exec ex(op, distances);
  const int64_t n = distances.size(0);
  const auto opts = distances.options();
  at::Tensor probs = at::empty({n}, opts);
  at::Tensor entropy = at::empty({}, opts);
  at::Tensor share = at::empty({}, opts.dtype(at::kBool));
  at::Tensor credit = at::empty({n}, opts.dtype(at::kBool));
  at::Tensor order = at::empty({n}, opts.dtype(at::kLong));
  DecideArgs a{distances.data_ptr<float>(), distances.stride(0), n,
               static_cast<float>(tau), static_cast<float>(gamma), static_cast<float>(top_p),
               probs.data_ptr<float>(), entropy.data_ptr<float>(), share.data_ptr<bool>(),
               credit.data_ptr<bool>(), order.data_ptr<int64_t>()};
  ex.decide(a);
  return {probs, entropy, share, credit};
}

// ---- weights --------------------------------------------------------------

template <class Exec>
at::Tensor token_weights(const at::Tensor& base, at::TensorList anchors, double tau,
                         const c10::optional<at::TensorList>& anchor_scales = c10::nullopt) {
  const char* op = "kvcomm.token_weights";
  const checks::KVShape s = checks::kv4(op, "base", base);
  const Codes codes = checks::anchor_codes(op, "anchors", base, s, anchors, anchor_scales);
  checks::tau(op, tau);
  const int64_t n = static_cast<int64_t>(anchors.size());
  const auto fopts = base.options().dtype(at::kFloat);
  at::Tensor out = at::empty({n, s.tokens}, fopts);
  if (n == 0 || s.tokens == 0) return out;
  Exec ex(op, base);
  const int64_t rows = s.layers * s.heads;
  int64_t groups = 0;
  at::Tensor partial;
  if (rows * s.dim > 0) {
    const Scales scales = scales_of(codes, anchor_scales);
    std::vector<KVRef> refs;
    for (const at::Tensor& a : anchors) refs.push_back(ref_of(a));
    const int64_t esize = base.element_size();
    const KVRef bref = ref_of(base);
    const bool vec = vectorizable(bref, esize, s.dim) &&
                     anchors_vectorizable(refs, scales, codes, esize, s.dim);
    TokenArgs a{};
    a.base = bref.ptr;
    a.bs = bref.s;
    a.heads = s.heads;
    a.tokens = s.tokens;
    a.rows = rows;
    a.lanes = lanes_of(codes, vec, esize, s.dim);
    a.n_total = n;
    const Launch g = plan_token_scores(rows, s.tokens, a.lanes, ex.sm_count(), &a.rows_per_group);
    groups = g.grid_y;
    partial = at::empty({groups, n, s.tokens}, fopts);
    a.partial = partial.data_ptr<float>();
    KVCOMM_DISPATCH_KV_TYPES(base.scalar_type(), "kvcomm.token_weights", [&] {
      score_chunks(codes, refs, scales, vec,
                   [&](auto c, auto kvec, auto nmax, int64_t first, int64_t count,
                       const RefTable& t, const ScaleTable& st) {
                     a.first = first;
                     a.num_refs = count;
                     ex.template token_scores<scalar_t, decltype(c)::value,
                                              decltype(kvec)::value, decltype(nmax)::value>(
                         g, a, t, st);
                   });
    });
  }
  TokenFinishArgs fa{partial.defined() ? partial.data_ptr<float>() : nullptr, groups, n,
                     s.tokens, static_cast<double>(rows * s.dim), static_cast<float>(tau),
                     out.data_ptr<float>()};
  ex.token_finish(fa);
  return out;
}

template <class Exec>
at::Tensor segment_weights(const at::Tensor& base, at::TensorList anchors, double tau,
                           const c10::optional<at::TensorList>& anchor_scales = c10::nullopt) {
  const char* op = "kvcomm.segment_weights";
  const checks::KVShape s = checks::kv4(op, "base", base);
  const Codes codes = checks::anchor_codes(op, "anchors", base, s, anchors, anchor_scales);
  checks::tau(op, tau);
  const int64_t n = static_cast<int64_t>(anchors.size());
  const int64_t channels = s.layers * s.heads * s.dim;
  at::Tensor out = at::empty({n, s.layers, s.heads, s.dim}, base.options().dtype(at::kFloat));
  if (n == 0 || channels == 0) return out;
  Exec ex(op, base);
  int64_t chunks = 0;
  at::Tensor partial;
  if (s.tokens > 0) {
    const Scales scales = scales_of(codes, anchor_scales);
    std::vector<KVRef> refs;
    // The anchor's last T tokens line up with the content's tokens.
    for (const at::Tensor& a : anchors) refs.push_back(ref_of(a, a.size(2) - s.tokens));
    const KVRef bref = ref_of(base);
    SegmentArgs a{};
    a.base = bref.ptr;
    a.bs = bref.s;
    a.heads = s.heads;
    a.tokens = s.tokens;
    a.dim = s.dim;
    a.channels = channels;
    a.n_total = n;
    const Launch g = plan_segment_scores(channels, s.tokens, ex.sm_count(), &a.tokens_per_chunk);
    chunks = g.grid_y;
    partial = at::empty({chunks, n, channels}, base.options().dtype(at::kFloat));
    a.partial = partial.data_ptr<float>();
    KVCOMM_DISPATCH_KV_TYPES(base.scalar_type(), "kvcomm.segment_weights", [&] {
      dispatch_codes(codes, [&](auto tag) {
        constexpr Codes C = decltype(tag)::value;
        const int64_t chunk = C == Codes::kPlain ? kSegmentChunk : kCompactChunk;
        for_ref_chunks(refs, scales.refs, chunk,
                       [&](int64_t first, int64_t count, const RefTable& t, const ScaleTable& st) {
          a.first = first;
          a.num_refs = count;
          if constexpr (C == Codes::kPlain) {
            if (count <= 8) ex.template segment_scores<scalar_t, C, 8>(g, a, t, st);
            else ex.template segment_scores<scalar_t, C, kSegmentChunk>(g, a, t, st);
          } else {
            ex.template segment_scores<scalar_t, C, kCompactChunk>(g, a, t, st);
          }
        });
      });
    });
  }
  SegmentFinishArgs fa{partial.defined() ? partial.data_ptr<float>() : nullptr, chunks, n,
                       channels, static_cast<float>(tau), out.data_ptr<float>()};
  ex.segment_finish(fa);
  return out;
}

// ---- per-token spread ----------------------------------------------------

template <class Exec>
at::Tensor token_spread(at::TensorList deltas, const at::Tensor& weights) {
  const char* op = "kvcomm.token_spread";
  const checks::SpreadPlan p = checks::token_spread(op, deltas, weights);
  at::Tensor out = at::zeros({p.tokens}, weights.options());
  // As on the CPU: fewer than two anchors, or no layer that carries an
  // offset, leave nothing to disagree about.
  if (p.num_deltas < 2 || p.layers < 2 || p.tokens == 0 || p.heads * p.dim == 0) return out;
  Exec ex(op, weights);
  const at::Tensor w = weights.contiguous();
  std::vector<KVRef> refs;
  for (const at::Tensor& d : deltas) refs.push_back(ref_of(d));
  SpreadArgs a{};
  a.weights = w.data_ptr<float>();
  a.num_deltas = p.num_deltas;
  a.heads = p.heads;
  a.tokens = p.tokens;
  a.dim = p.dim;
  a.elements = (p.layers - 1) * p.heads * p.dim;
  a.out = out.data_ptr<float>();
  RefTable small{};
  at::Tensor table_keepalive;
  if (p.num_deltas <= kMaxParamRefs) {
    for (size_t u = 0; u < refs.size(); ++u) small.r[u] = refs[u];
  } else {  // the device table, as the fused offset builds it
    a.table = device_table<Exec, KVRef, RefTable>(ex, refs, weights, table_keepalive);
  }
  const Launch g = plan_spread(p.tokens);
  KVCOMM_DISPATCH_KV_TYPES(deltas[0].scalar_type(), "kvcomm.token_spread", [&] {
    if (a.table != nullptr) ex.template spread<scalar_t, true>(g, a, small);
    else ex.template spread<scalar_t, false>(g, a, small);
  });
  return out;
}

}  // namespace cuda
}  // namespace kvcomm
