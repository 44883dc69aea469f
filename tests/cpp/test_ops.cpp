// The kvcomm ops driven from C++ through the dispatcher, no Python.
#include <gtest/gtest.h>

#include <ATen/Context.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/allclose.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/full.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/pow.h>
#include <ATen/ops/rand.h>
#include <ATen/ops/randint.h>
#include <ATen/ops/randn.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros.h>

#include "kvcomm/ops.h"

namespace {

at::Tensor inv_freq(int64_t dim) {
  return 1.0 / at::pow(10000.0, at::arange(0, dim, 2, at::kFloat) / dim);
}

// Rotate-half RoPE by `shift` in plain ATen, the reference here.
at::Tensor rotate(const at::Tensor& x, const at::Tensor& f, int64_t shift) {
  const int64_t half = x.size(-1) / 2;
  const at::Tensor angle = f * static_cast<float>(shift);
  const at::Tensor c = angle.cos(), s = angle.sin();
  const at::Tensor x1 = x.narrow(-1, 0, half), x2 = x.narrow(-1, half, half);
  return at::cat({x1 * c - x2 * s, x2 * c + x1 * s}, -1);
}

TEST(Ops, RopeMoveMatchesRotation) {
  at::manual_seed(0);
  const at::Tensor k = at::randn({2, 3, 7, 64});
  const at::Tensor f = inv_freq(64);
  const at::Tensor moved = kvcomm::rope_move(k, f, at::scalar_tensor(42, at::kLong));
  EXPECT_TRUE(at::allclose(moved, rotate(k, f, 42), 1e-5, 1e-5));
}

TEST(Ops, RopeMoveRoundTrip) {
  at::manual_seed(1);
  const at::Tensor k = at::randn({2, 1, 5, 128}).to(at::kBFloat16);
  const at::Tensor f = inv_freq(128);
  at::Tensor buf = k.clone();
  kvcomm::rope_move_(buf, f, at::scalar_tensor(100, at::kLong));
  EXPECT_FALSE(at::allclose(buf.to(at::kFloat), k.to(at::kFloat), 1e-2, 1e-2));
  kvcomm::rope_move_(buf, f, at::scalar_tensor(-100, at::kLong));
  EXPECT_TRUE(at::allclose(buf.to(at::kFloat), k.to(at::kFloat), 5e-2, 5e-2));
}

TEST(Ops, DistancesAndDecision) {
  at::manual_seed(2);
  const at::Tensor c = at::randn({2, 2, 4, 64});
  const at::Tensor near = at::cat({c, at::randn({2, 2, 2, 64})}, 2);
  const at::Tensor far = at::randn({2, 2, 4, 64}) * 5;
  const at::Tensor d = kvcomm::value_distances(c, {near, far}, false);
  EXPECT_FLOAT_EQ(d[0].item<float>(), 0.f);
  EXPECT_NEAR(d[1].item<float>(), (c - far).pow(2).sum().sqrt().item<float>(), 1e-2);
  auto [probs, entropy, share, credit] = kvcomm::match_decide(d, 1.0, 0.3, 0.9);
  EXPECT_TRUE(share.item<bool>());
  EXPECT_TRUE(credit[0].item<bool>());
  EXPECT_FALSE(credit[1].item<bool>());
  EXPECT_NEAR(probs.sum().item<float>(), 1.f, 1e-6);
}

TEST(Ops, WeightsSumToOne) {
  at::manual_seed(3);
  const at::Tensor b = at::randn({3, 2, 5, 64});
  std::vector<at::Tensor> anchors{at::randn({3, 2, 5, 64}), at::randn({3, 2, 8, 64}),
                                  at::randn({3, 2, 6, 64})};
  const at::Tensor tw = kvcomm::token_weights(b, anchors, 1.0);
  const at::Tensor sw = kvcomm::segment_weights(b, anchors, 1.0);
  EXPECT_EQ(tw.sizes(), (at::IntArrayRef{3, 5}));
  EXPECT_EQ(sw.sizes(), (at::IntArrayRef{3, 3, 2, 64}));
  EXPECT_TRUE(at::allclose(tw.sum(0), at::ones({5}), 1e-5, 1e-5));
  EXPECT_TRUE(at::allclose(sw.sum(0), at::ones({3, 2, 64}), 1e-5, 1e-5));
}

TEST(Ops, FusedOffsetIntoBufferSlice) {
  at::manual_seed(4);
  const at::Tensor base = at::randn({3, 2, 4, 64});
  const at::Tensor delta = at::randn({3, 2, 4, 64});
  const at::Tensor w = at::full({1, 4}, 0.5f);
  const at::Tensor f = inv_freq(64);
  at::Tensor buf = at::zeros({3, 2, 10, 64});
  kvcomm::fused_offset_into(buf.narrow(2, 3, 4), base, {delta}, w,
                            at::scalar_tensor(7, at::kLong), f);
  at::Tensor expected = base.clone();
  expected.narrow(0, 1, 2).add_(delta.narrow(0, 1, 2) * 0.5);
  EXPECT_TRUE(at::allclose(buf.narrow(2, 3, 4), rotate(expected, f, 7), 1e-5, 1e-5));
  EXPECT_EQ(buf.narrow(2, 0, 3).abs().sum().item<float>(), 0.f);
  EXPECT_EQ(buf.narrow(2, 7, 3).abs().sum().item<float>(), 0.f);
}

// Compact anchors and deltas through the C++ API: int8 codes with float32
// scales [L, H, 1, D] read exactly as the dense values code * scale.
TEST(Ops, Int8CodesWithScalesReadAsTheirValues) {
  at::manual_seed(6);
  const at::Tensor content = at::randn({2, 2, 5, 64});
  const at::Tensor codes = at::randint(-127, 128, {2, 2, 7, 64}).to(at::kChar);
  const at::Tensor scale = at::rand({2, 2, 1, 64}) * 0.05 + 0.01;
  const at::Tensor values = codes.to(at::kFloat) * scale;
  const std::vector<at::Tensor> scales{scale};
  const at::Tensor d = kvcomm::value_distances(content, {codes}, false, at::TensorList(scales));
  EXPECT_TRUE(at::allclose(d, kvcomm::value_distances(content, {values}, false), 1e-5, 1e-6));
  const at::Tensor tw = kvcomm::token_weights(content, {codes, codes}, 1.0, at::TensorList({scale, scale}));
  EXPECT_TRUE(at::allclose(tw, kvcomm::token_weights(content, {values, values}, 1.0), 1e-5, 1e-6));
  const at::Tensor w = at::full({1, 5}, 0.5f);
  const at::Tensor shift = at::scalar_tensor(3, at::kLong);
  const at::Tensor moved = kvcomm::fused_offset(content, {codes}, w, shift, inv_freq(64), at::TensorList(scales));
  EXPECT_TRUE(at::allclose(moved, kvcomm::fused_offset(content, {values}, w, shift, inv_freq(64)), 1e-5, 1e-5));
  // Codes without their scales are refused, naming the argument.
  try {
    kvcomm::value_distances(content, {codes}, false);
    FAIL() << "int8 anchors without scales were accepted";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("kvcomm.value_distances: anchors[0]"), std::string::npos) << e.what();
  }
}

// token_spread: zero where the anchors agree, and for one token that disagrees on
// layers >= 1 the root mean of the weighted variance (here 0.5 * 0.5 * 2^2 = 1 on
// every element, so 1).
TEST(Ops, TokenSpreadMeasuresDisagreement) {
  const at::Tensor a = at::zeros({3, 2, 4, 64});
  at::Tensor b = a.clone();
  b.narrow(0, 1, 2).narrow(2, 1, 1).fill_(2.0);
  const at::Tensor w = at::full({2, 4}, 0.5);
  const at::Tensor s = kvcomm::token_spread({a, b}, w);
  ASSERT_EQ(s.size(0), 4);
  EXPECT_FLOAT_EQ(s[0].item<float>(), 0.f);
  EXPECT_NEAR(s[1].item<float>(), 1.f, 1e-6);
  EXPECT_FLOAT_EQ(s[2].item<float>(), 0.f);
  EXPECT_THROW(kvcomm::token_spread({a, b}, at::full({3, 4}, 0.5)), c10::Error);
}

TEST(Ops, BadInputThrowsWithArgumentName) {
  const at::Tensor k = at::zeros({2, 3, 5, 64});
  try {
    kvcomm::rope_move(k, inv_freq(32), at::scalar_tensor(1, at::kLong));
    FAIL() << "expected an error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("inv_freq must be [head_dim/2]"), std::string::npos);
  }
}

}  // namespace
