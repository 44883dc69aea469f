// The anchor record behind AnchorPool (internal; shared by anchor_pool.cpp
// and pool_file.cpp).
#pragma once

#include <atomic>
#include <map>
#include <memory>
#include <string>

#include "kvcomm/anchor_pool.h"

namespace kvcomm {

using DeltaMap = std::map<std::string, AgentDeltas>;

struct AnchorPool::Anchor {
  int64_t id = 0;
  int64_t seq = 0;     // insertion order, pool-wide
  int64_t length = 0;  // tokens
  at::Tensor base_k, base_v;
  std::atomic<int64_t> activations{0};
  // Copy-on-write: record_deltas publishes a new map under the pool's unique
  // lock, readers copy the pointer under the shared lock.
  std::shared_ptr<const DeltaMap> deltas = std::make_shared<DeltaMap>();

  int64_t bytes() const {
    int64_t b = base_k.nbytes() + base_v.nbytes();
    for (const auto& kv : *deltas) b += kv.second.bytes();
    return b;
  }
};

inline int64_t tensor_bytes(const at::Tensor& t) {
  return t.defined() ? static_cast<int64_t>(t.nbytes()) : 0;
}

}  // namespace kvcomm
