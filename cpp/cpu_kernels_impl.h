// The inner loops of the CPU ops, written once on ATen's at::vec::Vectorized
// and compiled once per instruction set: each translation unit that includes
// this defines KVCOMM_ISA (the namespace of its copy) and, for a vector ISA,
// CPU_CAPABILITY / CPU_CAPABILITY_<ISA> exactly as ATen's own per-ISA kernels
// are built, so Vectorized<float> is 8 AVX2 lanes in one copy and 8 portable
// lanes (which the compiler maps onto SSE2) in the other.
//
// Every loop streams rows of D contiguous channels: two float vectors of
// kLanes at a time (one Vectorized of a 16-bit type), accumulating in float
// registers, with bf16/fp16 converted in the vector lanes; channels left over
// when D is not a multiple of kChunk go through a scalar tail with the same
// arithmetic.
#ifndef KVCOMM_ISA
#error "define KVCOMM_ISA (and the ATen CPU_CAPABILITY macros) before including cpu_kernels_impl.h"
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/Float8_e4m3fn.h>

#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu_kernels.h"
#include "kvcomm/math.h"

namespace kvcomm {
namespace cpu {
namespace KVCOMM_ISA {
namespace {

// Every call inside a task function is inlined: they are large after
// inlining the loaders and lane helpers, and GCC's size limits would
// otherwise leave one-instruction ATen helpers (a zero vector, a load) as
// calls inside the innermost loops.
#if defined(__GNUC__)
#define KVCOMM_FLATTEN __attribute__((flatten))
#else
#define KVCOMM_FLATTEN
#endif

using VecF = at::vec::Vectorized<float>;
constexpr int64_t kLanes = VecF::size();
constexpr int64_t kChunk = 2 * kLanes;
// Float partial sums are moved into a double every this many tokens, so a
// lane never sums more than kFlushTokens * D / kChunk terms.
constexpr int64_t kFlushTokens = 16;

// kChunk channels of a stored type as two float vectors, and back.
template <typename T>
struct Lanes {  // c10::Half, c10::BFloat16: converted in the vector lanes
  static void load(const T* p, VecF& a, VecF& b) { at::vec::load_to_float<T>(p, a, b); }
  static void store(T* p, const VecF& a, const VecF& b) {
    at::vec::convert_from_float<T>(a, b).store(p);
  }
};
template <>
struct Lanes<float> {
  static void load(const float* p, VecF& a, VecF& b) {
    a = VecF::loadu(p);
    b = VecF::loadu(p + kLanes);
  }
  static void store(float* p, const VecF& a, const VecF& b) {
    a.store(p);
    b.store(p + kLanes);
  }
};

// ---- Loaders -----------------------------------------------------------------
// The kernels read anchors and deltas only through a row source: row(l, h, t)
// gives a loader of that row's D channels as float lanes (load) or one float
// (scalar). Compact anchors (int8 or fp8 e4m3 with per-channel scales,
// ScaledSource below) are another source whose loader dequantizes in
// registers; the loops take either as their Src parameter unchanged.

template <typename T>
struct DenseRow {
  const T* p;
  void load(int64_t d, VecF& a, VecF& b) const { Lanes<T>::load(p + d, a, b); }
  float scalar(int64_t d) const { return static_cast<float>(p[d]); }
};

template <typename T>
struct DenseSource {
  const T* data;
  int64_t layer, head, token;
  explicit DenseSource(const RowsIn& r)
      : data(static_cast<const T*>(r.data)), layer(r.layer), head(r.head), token(r.token) {}
  DenseRow<T> row(int64_t l, int64_t h, int64_t t) const {
    return {data + l * layer + h * head + t * token};
  }
};

// Compact rows (int8 or fp8 e4m3 codes, StoreForm): kChunk codes decoded to
// floats in registers, times the row's per-channel scales.
struct Int8Codes {
  using Code = int8_t;
  static float decode(Code c) { return static_cast<float>(c); }
  static void load(const Code* p, VecF& a, VecF& b) {
#if defined(CPU_CAPABILITY_AVX2)
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    a = VecF(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)));
    b = VecF(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8))));
#else
    alignas(64) float buf[kChunk];
    for (int64_t i = 0; i < kChunk; ++i) buf[i] = decode(p[i]);
    a = VecF::loadu(buf);
    b = VecF::loadu(buf + kLanes);
#endif
  }
};

// fp8 e4m3 through a 256-entry table (every code's float value).
struct Fp8Table {
  float value[256];
  Fp8Table() {
    for (int c = 0; c < 256; ++c)
      value[c] = static_cast<float>(c10::Float8_e4m3fn(static_cast<uint8_t>(c), c10::Float8_e4m3fn::from_bits()));
  }
};
inline const float* fp8_table() {
  static const Fp8Table table;
  return table.value;
}

#if defined(CPU_CAPABILITY_AVX2)
// Sixteen e4m3 codes as floats through F16C: a code's sign, exponent and
// mantissa bits moved into a half's fields (sign to bit 15, exponent and
// mantissa shifted up by 7) make a half worth the code's value times 2^-8
// (half's exponent bias is 15, e4m3's 7), subnormal codes included (half
// subnormals convert exactly); times 256 it is the code's value. The NaN
// codes (magnitude bits 0x7f; e4m3fn has no infinities) become half NaNs.
inline void fp8x16_to_float(const uint8_t* p, VecF& a, VecF& b) {
  const __m256i c = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i sign = _mm256_slli_epi16(_mm256_and_si256(c, _mm256_set1_epi16(0x80)), 8);
  const __m256i mag = _mm256_and_si256(c, _mm256_set1_epi16(0x7F));
  const __m256i nan = _mm256_cmpeq_epi16(mag, _mm256_set1_epi16(0x7F));
  const __m256i value = _mm256_or_si256(sign, _mm256_slli_epi16(mag, 7));
  const __m256i half = _mm256_blendv_epi8(value, _mm256_set1_epi16(0x7E00), nan);
  const __m256 k = _mm256_set1_ps(256.f);
  a = VecF(_mm256_mul_ps(_mm256_cvtph_ps(_mm256_castsi256_si128(half)), k));
  b = VecF(_mm256_mul_ps(_mm256_cvtph_ps(_mm256_extracti128_si256(half, 1)), k));
}
#endif

struct Fp8Codes {
  using Code = uint8_t;
  static float decode(Code c) { return fp8_table()[c]; }
  static void load(const Code* p, VecF& a, VecF& b) {
#if defined(CPU_CAPABILITY_AVX2)
    fp8x16_to_float(p, a, b);
#else
    const float* t = fp8_table();
    alignas(64) float buf[kChunk];
    for (int64_t i = 0; i < kChunk; ++i) buf[i] = t[p[i]];
    a = VecF::loadu(buf);
    b = VecF::loadu(buf + kLanes);
#endif
  }
};

template <typename Codes>
struct ScaledRow {
  const typename Codes::Code* p;
  const float* s;
  void load(int64_t d, VecF& a, VecF& b) const {
    Codes::load(p + d, a, b);
    a = a * VecF::loadu(s + d);
    b = b * VecF::loadu(s + d + kLanes);
  }
  float scalar(int64_t d) const { return Codes::decode(p[d]) * s[d]; }
};

template <typename Codes>
struct ScaledSource {
  const typename Codes::Code* data;
  int64_t layer, head, token;
  const float* scale;
  int64_t scale_layer, scale_head;
  explicit ScaledSource(const RowsIn& r)
      : data(static_cast<const typename Codes::Code*>(r.data)), layer(r.layer), head(r.head),
        token(r.token), scale(r.scale), scale_layer(r.scale_layer), scale_head(r.scale_head) {}
  ScaledRow<Codes> row(int64_t l, int64_t h, int64_t t) const {
    return {data + l * layer + h * head + t * token, scale + l * scale_layer + h * scale_head};
  }
};

template <typename Src>
std::vector<Src> sources(const RowsIn* rows, int64_t n) {
  std::vector<Src> out;
  out.reserve(n);
  for (int64_t u = 0; u < n; ++u) out.emplace_back(rows[u]);
  return out;
}

// Sum of the lanes, in a fixed order: pairwise, so the adds are a tree of
// depth log2(kLanes), not one chain.
inline float lane_sum(const VecF& v) {
  alignas(64) float buf[kLanes];
  v.store(buf);
  for (int64_t w = kLanes / 2; w > 0; w /= 2)
    for (int64_t i = 0; i < w; ++i) buf[i] += buf[i + w];
  return buf[0];
}

// Calls body(d, slot) for every full chunk of a row, slot alternating 0 and 1
// (a compile-time constant), and returns where the scalar tail starts. A
// caller keeps one accumulator pair per slot: a row's sum is then two
// independent chains of adds, not one, whose latency would otherwise bound
// the loop before memory does.
template <typename F>
inline int64_t for_chunks(int64_t dim, F&& body) {
  using Slot0 = std::integral_constant<int, 0>;
  using Slot1 = std::integral_constant<int, 1>;
  int64_t d = 0;
  for (; d + 2 * kChunk <= dim; d += 2 * kChunk) {
    body(d, Slot0{});
    body(d + kChunk, Slot1{});
  }
  if (d + kChunk <= dim) {
    body(d, Slot0{});
    d += kChunk;
  }
  return d;
}

// Two accumulator pairs (see for_chunks).
struct Sums {
  VecF v[2][2] = {{VecF(0.f), VecF(0.f)}, {VecF(0.f), VecF(0.f)}};
  float total() const { return lane_sum((v[0][0] + v[0][1]) + (v[1][0] + v[1][1])); }
};

// ---- value distances -------------------------------------------------------------

// Adds sum over tokens and channels of (x - y)^2 for row (l, h) to *total.
template <typename X, typename Y>
void add_row_sq_diff(const X& x, const Y& y, int64_t l, int64_t h, int64_t t0, int64_t tokens,
                     int64_t dim, double* total) {
  Sums acc;
  float tail = 0.f;
  for (int64_t t = t0; t < tokens; ++t) {
    const auto xr = x.row(l, h, t);
    const auto yr = y.row(l, h, t);
    int64_t d = for_chunks(dim, [&](int64_t c, auto slot) {
      VecF x0, x1, y0, y1;
      xr.load(c, x0, x1);
      yr.load(c, y0, y1);
      const VecF e0 = x0 - y0, e1 = x1 - y1;
      VecF* a = acc.v[decltype(slot)::value];
      a[0] = at::vec::fmadd(e0, e0, a[0]);
      a[1] = at::vec::fmadd(e1, e1, a[1]);
    });
    for (; d < dim; ++d) {
      const float e = xr.scalar(d) - yr.scalar(d);
      tail += e * e;
    }
    if ((t + 1) % kFlushTokens == 0 || t + 1 == tokens) {
      *total += static_cast<double>(acc.total()) + tail;
      acc = Sums();
      tail = 0.f;
    }
  }
}

template <typename T, typename Src>
KVCOMM_FLATTEN void distances_tasks(const DistancePlan& p, int64_t begin, int64_t end) {
  const Dims& s = p.dims;
  const int64_t n = p.num_anchors;
  const DenseSource<T> content(p.content);
  const std::vector<Src> anchors = sources<Src>(p.anchors, n);
  for (int64_t c = begin; c < end; ++c) {
    double* out = p.partial + c * n;
    for (int64_t u = 0; u < n; ++u) out[u] = 0.0;
    // Rows outer, anchors inner: the content row stays in cache while every
    // anchor's row streams past it once.
    const int64_t TB = p.token_block > 0 ? p.token_block : s.tokens;
    for (int64_t r = chunk_begin(c, p.chunks, s.rows()); r < chunk_begin(c + 1, p.chunks, s.rows()); ++r) {
      for (int64_t t0 = 0; t0 < s.tokens; t0 += TB) {
        for (int64_t u = 0; u < n; ++u)
          add_row_sq_diff(content, anchors[u], r / s.heads, r % s.heads, t0,
                          std::min(s.tokens, t0 + TB), s.dim, out + u);
      }
    }
  }
}

// ---- token and segment weights ---------------------------------------------------

// sum_d |x - y| of one row.
template <typename X, typename Y>
float row_abs_diff(const X& x, const Y& y, int64_t dim) {
  Sums acc;
  int64_t d = for_chunks(dim, [&](int64_t c, auto slot) {
    VecF x0, x1, y0, y1;
    x.load(c, x0, x1);
    y.load(c, y0, y1);
    VecF* a = acc.v[decltype(slot)::value];
    a[0] = a[0] + (x0 - y0).abs();
    a[1] = a[1] + (x1 - y1).abs();
  });
  float tail = 0.f;
  for (; d < dim; ++d) tail += std::fabs(x.scalar(d) - y.scalar(d));
  return acc.total() + tail;
}

// sq[d] += (x - y)^2, and (when abs_sum) returns sum_d |x - y| of the same
// differences: one load of the anchor row serves both weightings.
template <bool kAbs, typename X, typename Y>
float row_sq_acc(const X& x, const Y& y, float* sq, int64_t dim) {
  Sums acc;
  int64_t d = for_chunks(dim, [&](int64_t c, auto slot) {
    VecF x0, x1, y0, y1;
    x.load(c, x0, x1);
    y.load(c, y0, y1);
    const VecF e0 = x0 - y0, e1 = x1 - y1;
    at::vec::fmadd(e0, e0, VecF::loadu(sq + c)).store(sq + c);
    at::vec::fmadd(e1, e1, VecF::loadu(sq + c + kLanes)).store(sq + c + kLanes);
    if (kAbs) {
      VecF* a = acc.v[decltype(slot)::value];
      a[0] = a[0] + e0.abs();
      a[1] = a[1] + e1.abs();
    }
  });
  float tail = 0.f;
  for (; d < dim; ++d) {
    const float e = x.scalar(d) - y.scalar(d);
    sq[d] += e * e;
    if (kAbs) tail += std::fabs(e);
  }
  return kAbs ? acc.total() + tail : 0.f;
}

template <typename T, typename Src>
KVCOMM_FLATTEN void weights_tasks(const WeightsPlan& p, int64_t begin, int64_t end) {
  const Dims& s = p.dims;
  const int64_t n = p.num_anchors, T_ = s.tokens, D = s.dim, rows = s.rows();
  const int64_t TB = p.token_block;
  const bool tok = p.token_partial != nullptr, seg = p.segment_out != nullptr;
  const DenseSource<T> base(p.base);
  const std::vector<Src> anchors = sources<Src>(p.anchors, n);
  // Per anchor: squared sums of the current row in float, moved into double
  // every kFlushTokens tokens.
  std::vector<float> sq(seg ? n * D : 0);
  std::vector<double> sq_total(seg ? n * D : 0);
  std::vector<int64_t> seen(n);
  int64_t span = 0;  // anchor tokens any window reaches
  for (int64_t u = 0; u < n; ++u) span = std::max(span, seg ? p.anchor_tokens[u] : T_);
  for (int64_t c = begin; c < end; ++c) {
    double* tp = tok ? p.token_partial + c * n * T_ : nullptr;
    if (tok) std::fill(tp, tp + n * T_, 0.0);
    for (int64_t r = chunk_begin(c, p.chunks, rows); r < chunk_begin(c + 1, p.chunks, rows); ++r) {
      const int64_t l = r / s.heads, h = r % s.heads;
      std::fill(sq.begin(), sq.end(), 0.f);
      std::fill(sq_total.begin(), sq_total.end(), 0.0);
      std::fill(seen.begin(), seen.end(), 0);
      // Token weights compare an anchor's first T tokens with the content,
      // segment weights its last T tokens. Walking anchor tokens j in blocks,
      // all anchors per block, loads each anchor token once and keeps the
      // content rows a block needs in the L1 cache.
      for (int64_t j0 = 0; j0 < span; j0 += TB) {
        for (int64_t u = 0; u < n; ++u) {
          const Src& a = anchors[u];
          const int64_t m = p.anchor_tokens[u], off = m - T_;
          const int64_t lo = std::max(j0, tok ? int64_t{0} : off);
          const int64_t hi = std::min(j0 + TB, seg ? m : T_);
          float* squ = seg ? sq.data() + u * D : nullptr;
          for (int64_t j = lo; j < hi; ++j) {
            const bool in_tok = tok && j < T_, in_seg = seg && j >= off;
            if (!in_tok && !in_seg) continue;  // between the two windows
            const auto ar = a.row(l, h, j);
            if (in_tok && in_seg && off == 0) {
              tp[u * T_ + j] += row_sq_acc<true>(base.row(l, h, j), ar, squ, D);
            } else {
              if (in_tok) tp[u * T_ + j] += row_abs_diff(base.row(l, h, j), ar, D);
              if (in_seg) row_sq_acc<false>(base.row(l, h, j - off), ar, squ, D);
            }
            if (in_seg && ++seen[u] % kFlushTokens == 0) {
              double* tot = sq_total.data() + u * D;
              for (int64_t d = 0; d < D; ++d) {
                tot[d] += squ[d];
                squ[d] = 0.f;
              }
            }
          }
        }
      }
      if (seg) {
        for (int64_t u = 0; u < n; ++u) {
          float* out = p.segment_out + (u * rows + r) * D;
          for (int64_t d = 0; d < D; ++d)
            out[d] = static_cast<float>(std::sqrt(sq_total[u * D + d] + sq[u * D + d]));
        }
        for (int64_t d = 0; d < D; ++d)
          math::softmax_neg_over_tau_strided(p.segment_out + r * D + d, n, rows * D, p.tau);
      }
    }
  }
}

// ---- fused offset and RoPE move ----------------------------------------------------

// Writes row x (already base + offset, or just base) to out, rotated by the
// angles whose cos/sin are given (pairs i and i + D/2), or as is when cos is
// null. x may be out itself (an in-place move): each pair of chunks is fully
// loaded before it is stored.
template <typename T, typename X>
void finish_row(const X& x, T* out, const float* cos_t, const float* sin_t, int64_t dim) {
  if (cos_t == nullptr) {
    int64_t d = 0;
    for (; d + kChunk <= dim; d += kChunk) {
      VecF a, b;
      x.load(d, a, b);
      Lanes<T>::store(out + d, a, b);
    }
    for (; d < dim; ++d) out[d] = static_cast<T>(x.scalar(d));
    return;
  }
  const int64_t half = dim / 2;
  int64_t i = 0;
  for (; i + kChunk <= half; i += kChunk) {
    VecF p0, p1, q0, q1;  // channels i.. (first of each pair) and i + half..
    x.load(i, p0, p1);
    x.load(i + half, q0, q1);
    const VecF c0 = VecF::loadu(cos_t + i), c1 = VecF::loadu(cos_t + i + kLanes);
    const VecF s0 = VecF::loadu(sin_t + i), s1 = VecF::loadu(sin_t + i + kLanes);
    Lanes<T>::store(out + i, p0 * c0 - q0 * s0, p1 * c1 - q1 * s1);
    Lanes<T>::store(out + i + half, q0 * c0 + p0 * s0, q1 * c1 + p1 * s1);
  }
  for (; i < half; ++i) {
    float y1, y2;
    math::rotate_pair(x.scalar(i), x.scalar(i + half), cos_t[i], sin_t[i], &y1, &y2);
    out[i] = static_cast<T>(y1);
    out[i + half] = static_cast<T>(y2);
  }
}

// acc[0..D) += w * y (w one scalar for the row, or w_row[d] per channel).
template <typename Y>
void add_weighted(float* acc, const Y& y, float w, const float* w_row, int64_t dim) {
  const VecF ws(w);
  int64_t d = 0;
  for (; d + kChunk <= dim; d += kChunk) {
    VecF y0, y1;
    y.load(d, y0, y1);
    const VecF w0 = w_row ? VecF::loadu(w_row + d) : ws;
    const VecF w1 = w_row ? VecF::loadu(w_row + d + kLanes) : ws;
    at::vec::fmadd(w0, y0, VecF::loadu(acc + d)).store(acc + d);
    at::vec::fmadd(w1, y1, VecF::loadu(acc + d + kLanes)).store(acc + d + kLanes);
  }
  for (; d < dim; ++d) acc[d] += (w_row ? w_row[d] : w) * y.scalar(d);
}

template <typename T, typename Src>
KVCOMM_FLATTEN void offset_tasks(const OffsetPlan& p, int64_t begin, int64_t end) {
  const Dims& s = p.dims;
  const int64_t n = p.num_deltas, D = s.dim, half = D / 2, TB = p.token_block;
  const int64_t blocks = (s.tokens + TB - 1) / TB;
  const DenseSource<T> base(p.base);
  const std::vector<Src> deltas = sources<Src>(p.deltas, n);
  T* const dst = static_cast<T*>(p.dst.data);
  // The block's running sums: the deltas are streamed one at a time through
  // it (one contiguous run of TB rows each), not all N side by side.
  std::vector<float> acc(n > 0 ? TB * D : 0);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t r = i / blocks, t0 = (i % blocks) * TB;
    const int64_t t1 = std::min(s.tokens, t0 + TB);
    const int64_t l = r / s.heads, h = r % s.heads;
    auto out_row = [&](int64_t t) { return dst + l * p.dst.layer + h * p.dst.head + t * p.dst.token; };
    auto angles = [&](int64_t t, const float* table) {
      return table ? table + (p.per_token_shift ? t : 0) * half : nullptr;
    };
    if (l == 0 || n == 0) {  // layer 0 takes no offset: a move (or copy) only
      for (int64_t t = t0; t < t1; ++t)
        finish_row(base.row(l, h, t), out_row(t), angles(t, p.cos_table), angles(t, p.sin_table), D);
      continue;
    }
    for (int64_t t = t0; t < t1; ++t)
      finish_row(base.row(l, h, t), acc.data() + (t - t0) * D, nullptr, nullptr, D);
    for (int64_t u = 0; u < n; ++u) {
      const float* w_row = p.per_token_weights ? nullptr : p.weights + (u * s.rows() + r) * D;
      for (int64_t t = t0; t < t1; ++t) {
        const float w = p.per_token_weights ? p.weights[u * s.tokens + t] : 0.f;
        add_weighted(acc.data() + (t - t0) * D, deltas[u].row(l, h, t), w, w_row, D);
      }
    }
    for (int64_t t = t0; t < t1; ++t)
      finish_row(DenseRow<float>{acc.data() + (t - t0) * D}, out_row(t), angles(t, p.cos_table),
                 angles(t, p.sin_table), D);
  }
}

// ---- entries: one per op, switching on the stored type and form -------------------

// FN<T, source of the anchor/delta rows> for the content type T.
#define KVCOMM_FORM_SWITCH(T, FORM, FN, ...)                                \
  switch (FORM) {                                                           \
    case StoreForm::kDense: FN<T, DenseSource<T>>(__VA_ARGS__); break;      \
    case StoreForm::kInt8: FN<T, ScaledSource<Int8Codes>>(__VA_ARGS__); break; \
    case StoreForm::kFp8: FN<T, ScaledSource<Fp8Codes>>(__VA_ARGS__); break;   \
    case StoreForm::kBf16: FN<T, DenseSource<c10::BFloat16>>(__VA_ARGS__); break; \
  }

#define KVCOMM_KV_SWITCH(TYPE, FORM, FN, ...)                                        \
  switch (TYPE) {                                                                    \
    case KVType::kFloat: KVCOMM_FORM_SWITCH(float, FORM, FN, __VA_ARGS__) break;      \
    case KVType::kHalf: KVCOMM_FORM_SWITCH(c10::Half, FORM, FN, __VA_ARGS__) break;   \
    case KVType::kBFloat16:                                                          \
      KVCOMM_FORM_SWITCH(c10::BFloat16, FORM, FN, __VA_ARGS__)                        \
      break;                                                                         \
  }

void distances_entry(const DistancePlan& p, int64_t begin, int64_t end) {
  KVCOMM_KV_SWITCH(p.type, p.anchor_form, distances_tasks, p, begin, end)
}
void weights_entry(const WeightsPlan& p, int64_t begin, int64_t end) {
  KVCOMM_KV_SWITCH(p.type, p.anchor_form, weights_tasks, p, begin, end)
}
void offset_entry(const OffsetPlan& p, int64_t begin, int64_t end) {
  KVCOMM_KV_SWITCH(p.type, p.delta_form, offset_tasks, p, begin, end)
}

#undef KVCOMM_KV_SWITCH
#undef KVCOMM_FORM_SWITCH

}  // namespace
}  // namespace KVCOMM_ISA
}  // namespace cpu
}  // namespace kvcomm
