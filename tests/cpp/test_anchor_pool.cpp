// AnchorPool driven from C++: decide, add, record, estimate, evict, save/load,
// concurrent use.
#include <gtest/gtest.h>

#include <ATen/Context.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/allclose.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/equal.h>
#include <ATen/ops/pow.h>
#include <ATen/ops/randn.h>
#include <ATen/ops/zeros_like.h>

#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include "kvcomm/anchor_pool.h"
#include "kvcomm/ops.h"

namespace {

constexpr int64_t L = 3, H = 2, D = 64;

at::Tensor kv(int64_t tokens, int64_t seed, double scale = 1.0) {
  at::manual_seed(seed);
  return at::randn({L, H, tokens, D}) * scale;
}

at::Tensor inv_freq() { return 1.0 / at::pow(10000.0, at::arange(0, D, 2, at::kFloat) / D); }

TEST(AnchorPool, ColdStartThenShare) {
  kvcomm::AnchorPool pool;
  const at::Tensor c = kv(6, 1);
  EXPECT_EQ(pool.decide("q", c).reason, "too_few_candidates");
  const int64_t a = pool.add_anchor("q", c, c);
  pool.add_anchor("q", kv(6, 2), kv(6, 2));
  const kvcomm::Decision d = pool.decide("q", c + 1e-3);
  EXPECT_TRUE(d.share);
  ASSERT_EQ(d.credited.size(), 1u);
  EXPECT_EQ(d.credited[0], a);
  EXPECT_EQ(pool.anchors("q")[0].activations, 1);
}

// min_anchors = 4: the slot keeps collecting anchors (too_few_candidates) until 4
// long-enough candidates exist, although 2 would already decide; shorter anchors
// do not count.
TEST(AnchorPool, MinAnchorsCoverageBeforeSharing) {
  kvcomm::PoolConfig cfg;
  cfg.min_anchors = 4;
  kvcomm::AnchorPool pool(cfg);
  const at::Tensor c = kv(6, 1);
  for (int64_t i = 0; i < 3; ++i) {
    EXPECT_EQ(pool.decide("q", c).reason, "too_few_candidates") << "with " << i << " anchors";
    pool.add_anchor("q", kv(6, 10 + i), kv(6, 10 + i));
  }
  pool.add_anchor("q", kv(4, 20), kv(4, 20));  // too short for a 6-token content
  EXPECT_EQ(pool.decide("q", c).reason, "too_few_candidates");
  pool.add_anchor("q", c, c);
  const kvcomm::Decision d = pool.decide("q", c + 1e-3);
  EXPECT_NE(d.reason, "too_few_candidates");
  EXPECT_TRUE(d.share);
}

TEST(AnchorPool, MinAnchorsBelowTwoIsRejected) {
  kvcomm::PoolConfig cfg;
  cfg.min_anchors = 1;
  EXPECT_THROW(kvcomm::AnchorPool pool(cfg), c10::Error);
}

TEST(AnchorPool, EstimateUsesRecordedDeltas) {
  kvcomm::AnchorPool pool;
  const at::Tensor base = kv(5, 3);
  const int64_t a = pool.add_anchor("q", base, base);
  const at::Tensor dk = kv(5, 4, 0.1), dv = kv(5, 5, 0.1);
  pool.record_deltas("q", a, "agent", {dk, dv, at::Tensor(), at::Tensor()});
  kvcomm::EstimateRequest req;
  req.base_k = base;
  req.base_v = base;
  req.inv_freq = inv_freq();
  req.position = 0;
  req.dst_k = at::zeros_like(base);
  req.dst_v = at::zeros_like(base);
  const kvcomm::EstimateResult r = pool.estimate("q", "agent", req);
  ASSERT_TRUE(r.ok());
  // One anchor, identical content: weight 1, so the estimate is base + delta
  // on layers >= 1 and base on layer 0 (shift 0 = no rotation).
  at::Tensor expected = base.clone();
  expected.narrow(0, 1, L - 1).add_(dv.narrow(0, 1, L - 1));
  EXPECT_TRUE(at::allclose(req.dst_v, expected, 1e-5, 1e-5));
  EXPECT_FALSE(pool.estimate("q", "other", req).ok());
}

TEST(AnchorPool, EstimateRejectsNegativePositions) {
  kvcomm::AnchorPool pool;
  const at::Tensor base = kv(5, 3);
  kvcomm::EstimateRequest req;
  req.base_k = base;
  req.base_v = base;
  req.inv_freq = inv_freq();
  req.dst_k = at::zeros_like(base);
  req.dst_v = at::zeros_like(base);
  for (const bool segment_position : {false, true}) {
    req.position = segment_position ? 0 : -3;
    req.seg_position = segment_position ? -1 : 0;
    const std::string want = segment_position ? "seg_position (the following segment's first token"
                                              : "position (the placeholder's first token";
    try {
      pool.estimate("q", "agent", req);
      FAIL() << "expected an error for a negative " << (segment_position ? "seg_position" : "position");
    } catch (const c10::Error& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find("AnchorPool.estimate: " + want), std::string::npos) << msg;
      EXPECT_NE(msg.find(segment_position ? "got -1" : "got -3"), std::string::npos) << msg;
    }
  }
}

TEST(AnchorPool, CapacityEviction) {
  kvcomm::PoolConfig cfg;
  cfg.capacity = 3;
  cfg.window = 2;
  kvcomm::AnchorPool pool(cfg);
  for (int64_t s = 0; s < 5; ++s) pool.add_anchor("q", kv(4, s), kv(4, s));
  EXPECT_EQ(pool.size("q"), 3);
  EXPECT_EQ(pool.evictions(), 2);
  EXPECT_EQ(pool.anchors("q")[0].id, 2);  // ties evict the oldest
}

TEST(AnchorPool, SaveLoadRoundTrip) {
  kvcomm::AnchorPool pool;
  const int64_t a = pool.add_anchor("q", kv(4, 1), kv(4, 2));
  pool.record_deltas("q", a, "x", {kv(4, 3), kv(4, 4), kv(2, 5), kv(2, 6)});
  const std::string path = ::testing::TempDir() + "kvcomm_pool_test.kvc";
  pool.save(path);
  kvcomm::AnchorPool loaded;
  loaded.load(path);
  EXPECT_EQ(loaded.memory_bytes(), pool.memory_bytes());
  EXPECT_TRUE(at::equal(loaded.anchor_base("q", a).first, pool.anchor_base("q", a).first));
  EXPECT_TRUE(at::equal(loaded.anchor_deltas("q", a, "x").seg_v,
                        pool.anchor_deltas("q", a, "x").seg_v));
  std::remove(path.c_str());
}

// int8 storage: a quarter of the float32 bytes plus one scale per channel, values
// within half a quantization step, and a save/load round trip that keeps the
// compact form bit for bit.
TEST(AnchorPool, Int8StorageIsCompactAndRoundTrips) {
  kvcomm::PoolConfig cfg;
  cfg.storage = kvcomm::Storage::kInt8;
  kvcomm::AnchorPool pool(cfg);
  const at::Tensor base = kv(32, 7);
  const int64_t a = pool.add_anchor("q", base, base);
  EXPECT_EQ(pool.memory_bytes(), 2 * (L * H * 32 * D + L * H * D * 4));
  const at::Tensor back = pool.anchor_base("q", a).first;
  const at::Tensor step = base.abs().amax({2}, true) / 127.0;
  EXPECT_TRUE((back - base).abs().le(step * 0.5 + 1e-6).all().item<bool>());
  EXPECT_FALSE(at::equal(back, base));
  const std::string path = ::testing::TempDir() + "kvcomm_pool_int8.kvc";
  pool.save(path);
  kvcomm::AnchorPool loaded(cfg);
  loaded.load(path);
  const auto before = pool.anchor_stored("q", a), after = loaded.anchor_stored("q", a);
  ASSERT_EQ(before.size(), after.size());
  for (size_t i = 0; i < before.size(); ++i) {
    EXPECT_EQ(after[i].data.scalar_type(), at::kChar);
    EXPECT_TRUE(at::equal(before[i].data, after[i].data));
    EXPECT_TRUE(at::equal(before[i].scale, after[i].scale));
  }
  std::remove(path.c_str());
}

TEST(AnchorPool, ConcurrentThreads) {
  kvcomm::PoolConfig cfg;
  cfg.capacity = 5;
  kvcomm::AnchorPool pool(cfg);
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&pool, t] {
      for (int i = 0; i < 20; ++i) {
        const at::Tensor b = kv(4, t * 100 + i);
        const std::string slot = "s" + std::to_string(i % 2);
        pool.add_anchor(slot, b, b);
        pool.decide(slot, b);
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(pool.size() + pool.evictions(), 160);
  EXPECT_LE(pool.size("s0"), 5);
  EXPECT_LE(pool.size("s1"), 5);
}

}  // namespace
