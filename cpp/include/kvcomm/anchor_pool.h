// AnchorPool: per-slot anchors of the KVCOMM method (docs/method.md, "Deciding" to "The two paths").
//
// An anchor is one content that was computed densely: its base K/V in the
// position-neutral frame (content starts at position 0) and, for each agent
// that consumed it, the recorded deltas
//   placeholder: real - base           over the content's tokens
//   segment:     real - template       over the segment right after it
// with key deltas de-rotated to the neutral frame, so they can be moved to
// wherever the slot sits in a later prompt.
//
// Thread safety: every method may be called from any number of threads. An
// anchor's tensors are immutable once inserted (inputs are copied), and
// readers work on a snapshot of tensor handles taken under a shared lock, so
// no estimate can see a half-written anchor.
#pragma once

#include <ATen/core/Tensor.h>

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <vector>

namespace kvcomm {

enum class DistanceMode { kFrobenius = 0, kRms = 1 };

// How anchors (bases and deltas) are held in memory (docs/method.md, "Compact anchors").
//   kModel: the model's dtype, as recorded.
//   kBf16:  bfloat16 (no scales).
//   kInt8:  int8 with a float32 scale per layer, head and channel (amax over
//           the tensor's tokens / 127), chosen for each base and each delta
//           tensor from its own values.
//   kFp8:   float8 e4m3 with the same per-channel scales (amax / 448).
// Estimates and decisions see the stored values: what is lost in storage is
// lost for good. Codes are part of the pool file format; never renumber.
enum class Storage : int8_t { kModel = 0, kBf16 = 1, kInt8 = 2, kFp8 = 3 };

const char* storage_name(Storage s);

struct PoolConfig {
  double gamma = 0.3;            // entropy gate: share when H <= gamma*log2(N)
  double tau = 1.0;              // softmax temperature of matching and weights
  double top_p = 0.9;            // activation credit mass on share
  int64_t capacity = 20;         // anchors per slot (V)
  int64_t window = 5;            // eviction looks at the W oldest anchors
  int64_t byte_budget = 0;       // whole pool, bytes; 0 = unlimited
  // Coverage: a content becomes an anchor while its slot has fewer than this
  // many long-enough candidates (>= 2; 2 is the method as published). Estimates
  // from more anchors agree with dense prefill more often.
  int64_t min_anchors = 2;
  DistanceMode distance = DistanceMode::kFrobenius;
  Storage storage = Storage::kModel;
  // Expected content layout; 0 = taken from the first anchor. Every anchor
  // and every loaded file must match it.
  int64_t layers = 0, kv_heads = 0, head_dim = 0;
};

// What one agent recorded for one anchor. seg_* are undefined when the slot
// is not followed by a segment.
struct AgentDeltas {
  at::Tensor ph_k, ph_v;    // [L, H, m, D], m = anchor length
  at::Tensor seg_k, seg_v;  // [L, H, S, D], S = segment length
  int64_t bytes() const;
};

struct AnchorInfo {
  int64_t id;
  int64_t length;
  int64_t activations;
  int64_t inserted;  // insertion sequence number, pool-wide
  std::vector<std::string> agents;
  int64_t bytes;
};

struct Decision {
  bool share = false;
  std::string reason;              // why: "share", "too_few_candidates", "entropy_above_gate"
  std::vector<int64_t> candidates;  // anchor ids with length >= n, in pool order
  std::vector<float> distances;
  std::vector<float> probs;
  float entropy = 0.f;
  float threshold = 0.f;           // gamma * log2(#candidates)
  std::vector<int64_t> credited;   // ids whose activation was incremented
};

// The anchor weights of one estimate (docs/method.md, "Estimating the offset"):
// they depend on the content's base and the anchors' bases only, not on the
// agent, so every agent that estimates the same content from the same anchors
// can take them instead of reading every anchor base again.
struct EstimateWeights {
  std::vector<int64_t> anchors;     // the anchor ids they weight, in pool order
  at::Tensor token_k, token_v;      // float32 [N, n]: the placeholder's per-token weights
  at::Tensor segment_k, segment_v;  // float32 [N, L, H, D]: the following segment's weights
  bool defined() const { return token_k.defined(); }
};

// Where the estimate for one agent goes and where its pieces sit.
struct EstimateRequest {
  at::Tensor base_k, base_v;        // content, neutral frame [L, H, n, D]
  at::Tensor inv_freq;              // float32 [D/2]
  int64_t position = 0;             // first token of the placeholder
  at::Tensor dst_k, dst_v;          // [L, H, n, D] destinations
  // Optional following segment (undefined to skip).
  at::Tensor seg_template_k, seg_template_v;  // neutral frame [L, H, S, D]
  int64_t seg_position = 0;
  at::Tensor seg_dst_k, seg_dst_v;  // [L, H, S, D]
  bool want_spread = false;         // also return the per-token spread
  // At most `limit` anchors (0: every usable one), taken in the order of
  // `nearest` (anchor ids, nearest to the content first: the decision's
  // distances); usable anchors missing from it come after, in pool order. The
  // chosen ones are summed in pool order, so a limit of at least the number of
  // usable anchors writes exactly what no limit writes. Why a limit: the
  // estimate reads every anchor it uses (base and deltas), so without one its
  // cost grows with the pool.
  std::vector<int64_t> nearest;
  int64_t limit = 0;
  // An earlier estimate's weights (EstimateResult::weights) for this content:
  // taken when they weight exactly the anchors this estimate uses and this
  // many tokens, else computed anew. Either way the same numbers are written.
  EstimateWeights weights;
};

struct EstimateResult {
  std::vector<int64_t> anchors;  // ids whose deltas were used
  // float32 [n] when the request asked for it: how much the anchors disagree
  // on each placeholder token's offset (token_spread of the K deltas plus that
  // of the V deltas, under their token weights). Undefined otherwise.
  at::Tensor spread;
  EstimateWeights weights;  // the weights this estimate used (for the next agent's)
  bool ok() const { return !anchors.empty(); }
};

struct StoredDeltas;  // an agent's deltas as the pool stores them (cpp/anchor.h)

class AnchorPool {
 public:
  explicit AnchorPool(PoolConfig config = {});

  const PoolConfig& config() const { return config_; }
  // The dtype anchors stand for (the model's); Undefined until the first anchor or load.
  at::ScalarType dtype() const;

  // docs/method.md, "Deciding" for new content values [L,H,n,D] against the slot's pool.
  // On share, credits one activation to the top-p anchors (unless credit is
  // false). An unknown slot has no candidates and so decides "anchor".
  Decision decide(const std::string& slot, const at::Tensor& content_v,
                  bool credit = true);

  // decide() in two steps, for callers that combine distances from several
  // places first (tensor-parallel ranks each hold some KV heads of every
  // anchor: they sum their squared Frobenius distances, then decide on the
  // totals, so every rank takes the same decision by the same rule).
  //
  // candidate_distances: the slot's anchors with length >= n, in pool order,
  // and the distance of content_v [L,H,n,D] to each (Frobenius, or
  // per-element RMS when rms), on content_v's device.
  struct Candidates {
    std::vector<int64_t> ids;
    at::Tensor distances;  // float32 [ids.size()]
  };
  Candidates candidate_distances(const std::string& slot, const at::Tensor& content_v,
                                 bool rms) const;
  // The decision from distances to candidates `ids` (as candidate_distances
  // gave them; any device): the entropy gate, coverage (min_anchors) and,
  // when sharing and `credit`, activation credit to the top-p anchors still
  // in the pool. decide(slot, v, credit) is exactly
  // decide_from_distances(slot, c.ids, c.distances, credit) with
  // c = candidate_distances(slot, v, config().distance == kRms).
  Decision decide_from_distances(const std::string& slot, const std::vector<int64_t>& ids,
                                 const at::Tensor& distances, bool credit = true);

  // New anchor for `slot` from neutral-frame base K/V [L,H,n,D] (copied).
  // Evicts per the capacity and byte budget; returns the new anchor's id.
  int64_t add_anchor(const std::string& slot, const at::Tensor& base_k,
                     const at::Tensor& base_v);

  // Records (replaces) `agent`'s deltas for anchor `id` (copied).
  void record_deltas(const std::string& slot, int64_t id,
                     const std::string& agent, const AgentDeltas& deltas);

  // The anchor weights an estimate of this content would compute (every
  // agent's, where each anchor holds every agent's deltas), ahead of the
  // first call that needs them: pass them as EstimateRequest::weights. The
  // anchors are the slot's long enough ones, chosen as EstimateRequest's
  // nearest and limit choose; empty weights when there are none.
  EstimateWeights estimate_weights(const std::string& slot, const at::Tensor& base_k,
                                   const at::Tensor& base_v, const std::vector<int64_t>& nearest,
                                   int64_t limit) const;

  // docs/method.md, "Estimating the offset": writes the estimated placeholder (and segment) KV for
  // `agent` into the request's destinations. Uses every anchor of the slot
  // with length >= n and deltas recorded for `agent` (and, for the segment,
  // of the same segment length). Returns the ids used; when none qualifies
  // (an unknown slot included) nothing is written and the result is empty
  // (the caller runs dense).
  EstimateResult estimate(const std::string& slot, const std::string& agent,
                          const EstimateRequest& req) const;

  bool has_slot(const std::string& slot) const;
  std::vector<std::string> slots() const;
  std::vector<AnchorInfo> anchors(const std::string& slot) const;
  // Anchor base tensors (for inspection and tests).
  std::pair<at::Tensor, at::Tensor> anchor_base(const std::string& slot,
                                                int64_t id) const;
  AgentDeltas anchor_deltas(const std::string& slot, int64_t id,
                            const std::string& agent) const;
  bool has_deltas(const std::string& slot, int64_t id,
                  const std::string& agent) const;
  int64_t size() const;
  int64_t size(const std::string& slot) const;
  int64_t memory_bytes() const;
  int64_t evictions() const { return evictions_.load(); }
  void clear();

  // Whole pool to/from a file. save writes a temp file and renames it, so a
  // crash never leaves a half-written pool. load validates everything
  // (magic, version, checksums, shapes) before replacing the live contents;
  // on any error the live pool is unchanged and a c10::Error says why.
  void save(const std::string& path) const;
  // `device` empty: CPU. `dtype` Undefined: anchors keep the file's dtype;
  // otherwise they are converted to it (a pool saved by a float32 server
  // loaded into a bfloat16 one): model-dtype storage is cast, bf16 / int8 /
  // fp8 codes are kept as they are and stand for the new dtype.
  void load(const std::string& path, const std::string& device = "",
            at::ScalarType dtype = at::ScalarType::Undefined);

  // The stored (possibly compact) tensors of one anchor, for inspection and
  // tests: (name, data, scale) with name "base_k", "base_v" or
  // "<agent>/ph_k" ... "<agent>/seg_v"; scale undefined without scales.
  struct StoredTensor {
    std::string name;
    at::Tensor data, scale;
  };
  std::vector<StoredTensor> anchor_stored(const std::string& slot, int64_t id) const;

  struct Anchor;  // defined in anchor.h
  struct Slot {
    std::vector<std::shared_ptr<Anchor>> anchors;  // insertion order
  };

 private:
  std::shared_ptr<Anchor> find_locked(const std::string& slot, int64_t id) const;
  // The anchors an estimate of n tokens uses (EstimateRequest's nearest and
  // limit): long enough and, with `agent`, holding its deltas (and segment
  // deltas of seg_len tokens, when >= 0); in pool order.
  std::vector<std::pair<const Anchor*, const StoredDeltas*>> usable_locked(
      const Slot& slot, int64_t n, const std::string* agent, int64_t seg_len,
      const std::vector<int64_t>& nearest, int64_t limit) const;
  void evict_for_capacity_locked(Slot& slot);
  void enforce_budget_locked(const Anchor* keep, int64_t extra_bytes);
  void check_layout_locked(const char* what, const at::Tensor& t) const;
  int64_t bytes_locked() const;

  PoolConfig config_;
  mutable std::shared_mutex mutex_;
  std::map<std::string, Slot> slots_;
  int64_t next_id_ = 0;
  int64_t next_seq_ = 0;
  std::atomic<int64_t> evictions_{0};
  // Layout every anchor shares once the first one is in (or from config).
  int64_t layers_ = 0, heads_ = 0, dim_ = 0;
  at::ScalarType dtype_ = at::ScalarType::Undefined;
  friend struct PoolFile;
};

}  // namespace kvcomm
