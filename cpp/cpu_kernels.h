// Torch-free interface between the CPU ops (checks, allocation, threading) and
// their inner loops, which are compiled once per instruction set
// (cpu_kernels_default.cpp, cpu_kernels_avx2.cpp) and picked at run time.
//
// A plan holds raw pointers and element strides; every [L, H, T, D] view in a
// plan has unit channel stride (the ops make a copy of any other input), so a
// row (l, h, t) is D contiguous elements, while layer, head and token strides
// are free: a slice of a KV buffer is read and written in place. A kernel
// entry runs the tasks [begin, end) of its plan; the ops split the task range
// over threads with at::parallel_for, so threading, grain sizes and the ISA
// choice stay out of the per-ISA files, and every reduction is ordered by task
// index, never by thread: results do not depend on the thread count.
#pragma once

#include <cstdint>

#include "kvcomm/codes.h"

namespace kvcomm {
namespace cpu {

enum class KVType : int { kFloat, kHalf, kBFloat16 };

// How the anchor (or delta) rows of a plan are stored: in the content's type,
// in bfloat16 under content of another type, or as int8 / fp8 e4m3 values
// times a float32 scale per (layer, head, channel); all are converted in
// registers as they are loaded (compact anchors, docs/method.md, "Compact anchors").
enum class StoreForm : int { kDense, kInt8, kFp8, kBf16 };

inline bool form_has_scale(StoreForm f) { return f == StoreForm::kInt8 || f == StoreForm::kFp8; }
// How the kernels read anchors the op checks classified (checks::anchor_codes).
inline StoreForm form_of(Codes c) {
  return c == Codes::kInt8 ? StoreForm::kInt8 : c == Codes::kFp8 ? StoreForm::kFp8 : StoreForm::kDense;
}

struct Dims {
  int64_t layers, heads, tokens, dim;
  int64_t rows() const { return layers * heads; }
};

// A read-only [L, H, *, D] view with unit channel stride. Compact rows also
// carry their scales: D contiguous floats per (layer, head).
struct RowsIn {
  const void* data;
  int64_t layer, head, token;  // strides in elements
  const float* scale = nullptr;
  int64_t scale_layer = 0, scale_head = 0;
};

// A writable one.
struct RowsOut {
  void* data;
  int64_t layer, head, token;
};

// Row chunks: the reductions over rows (distances, token weights) give every
// chunk its own partial sums; chunk boundaries depend only on the row count.
int64_t row_chunks(int64_t rows);
inline int64_t chunk_begin(int64_t chunk, int64_t chunks, int64_t rows) {
  return chunk * rows / chunks;
}

// Squared differences between content [L,H,T,D] and the first T tokens of N
// anchors. Task = row chunk; partial[c * N + u] = chunk c's sum for anchor u.
struct DistancePlan {
  KVType type;
  Dims dims;
  RowsIn content;
  const RowsIn* anchors;
  int64_t num_anchors;
  int64_t chunks;
  double* partial;
  // Tokens per step, all anchors per step; 0: a whole row per anchor, the
  // content row (T x D, 256 KB at 1024 tokens of 64 fp32 channels) then being
  // re-read from the L2 cache for each anchor.
  int64_t token_block;
  StoreForm anchor_form = StoreForm::kDense;
};

// Both weightings of the offset estimate from one pass over the anchors'
// bases (docs/method.md, "Estimating the offset"). Task = row chunk.
//  - token sums (when token_partial is set): token_partial[(c * N + u) * T + t]
//    = chunk c's sum over its rows and channels of |base[t] - anchor_u[t]|
//    (anchor's first T tokens);
//  - segment weights (when segment_out is set): for every row and channel,
//    r_u = ||base - anchor_u[m_u - T:]||_tokens and the softmax over u of
//    -r_u / tau, written to segment_out [N, L*H, D].
// Each anchor token is loaded once even when both are wanted.
struct WeightsPlan {
  KVType type;
  Dims dims;
  RowsIn base;
  const RowsIn* anchors;
  const int64_t* anchor_tokens;  // m_u >= T
  int64_t num_anchors;
  int64_t chunks;
  double* token_partial;  // [chunks, N, T] or null
  float* segment_out;     // [N, L*H, D] or null
  float tau;
  int64_t token_block;    // anchor tokens per step, all anchors per step
  StoreForm anchor_form = StoreForm::kDense;
};

// out = rotate(base + (layer > 0) * sum_u w_u * delta_u) (docs/method.md,
// "Keys move exactly" and "Estimating the offset"); rotation only when cos/sin are given. Task = (row, block
// of kTokenBlock tokens); tasks of several plans can be concatenated.
struct OffsetPlan {
  KVType type;
  Dims dims;
  RowsOut dst;
  RowsIn base;
  const RowsIn* deltas;     // first T tokens used
  int64_t num_deltas;
  const float* weights;     // [N, T] per token or [N, L, H, D] per channel
  bool per_token_weights;
  const float* cos_table;   // [1 or T, D/2], null: no rotation
  const float* sin_table;
  bool per_token_shift;
  int64_t token_block;      // tokens per task
  StoreForm delta_form = StoreForm::kDense;
  int64_t tasks() const {
    return dims.rows() * ((dims.tokens + token_block - 1) / token_block);
  }
};

struct KernelTable {
  const char* isa;
  void (*distances)(const DistancePlan&, int64_t begin, int64_t end);
  void (*weights)(const WeightsPlan&, int64_t begin, int64_t end);
  void (*offset)(const OffsetPlan&, int64_t begin, int64_t end);
};

// Portable build (the compiler's baseline for the target, SSE2 on x86-64).
KernelTable kernels_default();
// AVX2 + FMA + F16C; only where the compiler can build it (GCC on x86-64).
bool have_kernels_avx2();
KernelTable kernels_avx2();

// The table for this machine: AVX2 when ATen's own CPU capability (which
// honours ATEN_CPU_CAPABILITY) is AVX2 or better, the portable one otherwise.
const KernelTable& kernels();

}  // namespace cpu
}  // namespace kvcomm
