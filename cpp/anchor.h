// The anchor record behind AnchorPool (internal; shared by anchor_pool.cpp
// and pool_file.cpp).
#pragma once

#include <atomic>
#include <map>
#include <memory>
#include <string>

#include "compact.h"
#include "kvcomm/anchor_pool.h"

namespace kvcomm {

// One agent's deltas as the pool holds them (AgentDeltas in the pool's storage).
struct StoredDeltas {
  CompactTensor ph_k, ph_v, seg_k, seg_v;

  int64_t bytes() const { return ph_k.bytes() + ph_v.bytes() + seg_k.bytes() + seg_v.bytes(); }
  AgentDeltas expand() const {
    return {ph_k.expand(), ph_v.expand(), seg_k.expand(), seg_v.expand()};
  }
};

using DeltaMap = std::map<std::string, StoredDeltas>;

struct AnchorPool::Anchor {
  int64_t id = 0;
  int64_t seq = 0;     // insertion order, pool-wide
  int64_t length = 0;  // tokens
  CompactTensor base_k, base_v;
  std::atomic<int64_t> activations{0};
  // Copy-on-write: record_deltas publishes a new map under the pool's unique
  // lock, readers copy the pointer under the shared lock.
  std::shared_ptr<const DeltaMap> deltas = std::make_shared<DeltaMap>();

  int64_t bytes() const {
    int64_t b = base_k.bytes() + base_v.bytes();
    for (const auto& kv : *deltas) b += kv.second.bytes();
    return b;
  }
};

inline int64_t tensor_bytes(const at::Tensor& t) {
  return t.defined() ? static_cast<int64_t>(t.nbytes()) : 0;
}

}  // namespace kvcomm
