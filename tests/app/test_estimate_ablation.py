"""benchmarks/estimate_ablation.py: its stand-in pool must estimate exactly what the
core does for the spec variant, and exactly the moved bases without offsets."""
from __future__ import annotations

import torch
from torch.testing import assert_close

from rope_freqs import inv_freq

import kvcomm
from kvcomm import ops
from kvcomm_app.bench import estimate_ablation as ablation

L, H, D, N, S = 3, 2, 64, 6, 4


def kv(tokens, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(L, H, tokens, D, generator=g) * scale


def _pool():
    pool = kvcomm.AnchorPool(kvcomm.PoolConfig())
    for seed in (1, 2, 3):
        aid = pool.add_anchor("q", kv(N + 1, seed), kv(N + 1, seed + 10))
        pool.record_deltas("q", aid, "a", kv(N + 1, seed + 20, 0.1), kv(N + 1, seed + 30, 0.1),
                           kv(S, seed + 40, 0.1), kv(S, seed + 50, 0.1))
    # An anchor without deltas for "a" and a too-short one: neither is usable.
    pool.add_anchor("q", kv(N + 1, 7), kv(N + 1, 8))
    short = pool.add_anchor("q", kv(N - 1, 9), kv(N - 1, 10))
    pool.record_deltas("q", short, "a", kv(N - 1, 11), kv(N - 1, 12), kv(S, 13), kv(S, 14))
    return pool


def _estimate(pool):
    base_k, base_v, tk, tv = kv(N, 100), kv(N, 101), kv(S, 102), kv(S, 103)
    out = [torch.zeros(L, H, N, D), torch.zeros(L, H, N, D), torch.zeros(L, H, S, D), torch.zeros(L, H, S, D)]
    res = pool.estimate("q", "a", base_k, base_v, inv_freq(D), 9, out[0], out[1], seg_template_k=tk,
                        seg_template_v=tv, seg_position=9 + N, seg_dst_k=out[2], seg_dst_v=out[3])
    return list(res.anchors), out, (base_k, base_v, tk, tv)


def test_the_spec_variant_is_the_core_estimate():
    pool = _pool()
    core_ids, core, _ = _estimate(pool)
    ids, mine, _ = _estimate(ablation.VariantPool(pool, ablation.VARIANTS["spec"]))
    assert ids == core_ids == [0, 1, 2]
    for a, b in zip(mine, core):
        assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_no_offset_is_the_moved_base_and_template():
    pool = _pool()
    _, est, (base_k, base_v, tk, tv) = _estimate(ablation.VariantPool(pool, ablation.VARIANTS["no_offset"]))
    f = inv_freq(D)
    assert_close(est[0], ops.rope_move(base_k, f, 9), atol=1e-5, rtol=1e-5)
    assert_close(est[1], base_v)
    assert_close(est[2], ops.rope_move(tk, f, 9 + N), atol=1e-5, rtol=1e-5)
    assert_close(est[3], tv)
    # And the variants differ from the core where they should.
    _, core, _ = _estimate(pool)
    _, seg_only, _ = _estimate(ablation.VariantPool(pool, ablation.VARIANTS["segment"]))
    assert_close(seg_only[2], core[2])
    assert_close(seg_only[0], est[0])
    assert not torch.allclose(seg_only[0], core[0])
