"""What only a real GPU can show (each test skips with the reason without one):
no host synchronisation, the current stream, CUDA graph capture and replay
(with the device table of >32 deltas), grids at CUDA's limits, an 8B-model
shape against the reference on the device, a second device, mixed-device
errors, and kvcomm.AnchorPool end to end on CUDA tensors. Per-op correctness on
CUDA is the `cuda` backend of test_ops.py."""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import kvcomm
from backends import HAS_CUDA, NO_CUDA
from kvcomm import ops
from kvcomm import reference as ref
from op_cases import BF16, DTYPES, F16, SCORE_TOL, anchors, captured, gen, inv_freq, kv, tol

pytestmark = pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)


def _cuda(x):
    if isinstance(x, torch.Tensor):
        return x.cuda()
    if isinstance(x, (list, tuple)):
        return type(x)(_cuda(v) for v in x)
    return x


def test_ops_do_not_sync_the_host():
    g = gen(21)
    shape = (3, 2, 9, 64)
    base, deltas = _cuda(kv(shape, BF16, g)), _cuda(anchors(shape, BF16, 5, g))
    many = _cuda(anchors(shape, BF16, 40, g))
    f = inv_freq(64).cuda()
    shift = torch.tensor(5, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        d = ops.value_distances(base, deltas)
        ops.match_decide(d)
        tw = ops.token_weights(base, deltas)
        cw = ops.segment_weights(base, deltas)
        ops.fused_offset(base, deltas, tw, shift, f)
        ops.fused_offset(base, deltas, cw, shift, None)
        ops.fused_offset(base, many, ops.token_weights(base, many), shift, f)  # the device table
        ops.rope_move(base, f, shift)
        ops.rope_move_(base.clone(), f, shift)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_fused_offset_in_a_cuda_graph():
    g = gen(22)
    shape = (3, 2, 9, 64)
    base, deltas = _cuda(kv(shape, F16, g)), _cuda(anchors(shape, F16, 4, g))
    w = torch.softmax(torch.randn(4, 9, generator=g), 0).cuda()
    f, shift = inv_freq(64).cuda(), torch.tensor(17, device="cuda")
    dst = torch.empty_like(base)
    graph = captured(lambda: ops.fused_offset_into(dst, base, deltas, w, shift, f))
    dst.zero_()
    base.mul_(2)  # replay reads the live inputs
    graph.replay()
    torch.cuda.synchronize()
    assert_close(dst.cpu(), ops.fused_offset(base.cpu(), [d.cpu() for d in deltas], w.cpu(), 17, f.cpu()),
                 **tol(F16))


def test_many_deltas_replayed_from_a_cuda_graph():
    # 40 deltas: the table goes to device memory (store_refs kernel). A graph
    # replays that after the host has reused any pinned memory of the capture.
    g = gen(32)
    shape = (3, 2, 9, 64)
    base = kv(shape, BF16, g).cuda()
    deltas = [d.cuda() for d in anchors(shape, BF16, 40, g)]
    w = torch.softmax(torch.randn(40, 9, generator=g), 0).cuda()
    f, shift = inv_freq(64).cuda(), torch.tensor(19, device="cuda")
    dst = torch.empty_like(base)
    graph = captured(lambda: ops.fused_offset_into(dst, base, deltas, w, shift, f))
    for _ in range(8):  # churn the pinned host allocator
        torch.full((4096,), 255, dtype=torch.uint8).pin_memory().cuda(non_blocking=True)
    dst.zero_()
    graph.replay()
    torch.cuda.synchronize()
    expected = ops.fused_offset(base.cpu(), [d.cpu() for d in deltas], w.cpu(), 19, f.cpu())
    assert_close(dst.cpu(), expected, **tol(BF16))


def test_ops_run_on_the_current_stream():
    base = kv((2, 2, 33, 128), torch.float32, gen(23)).cuda()
    f = inv_freq(128).cuda()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        out = ops.rope_move(base, f, 9)
    stream.synchronize()
    assert_close(out.cpu(), ops.rope_move(base.cpu(), f.cpu(), 9))


def test_rejects_mixed_devices():
    k = torch.randn(2, 2, 3, 64, device="cuda")
    with pytest.raises(RuntimeError, match="inv_freq"):
        ops.rope_move(k, inv_freq(64), 1)  # inv_freq on the CPU
    with pytest.raises(RuntimeError, match=r"anchors\[0\]"):
        ops.value_distances(k, [torch.randn(2, 2, 3, 64)])


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_shapes_match_cpu(dtype):
    # Many blocks and row groups: 4 layers x 8 heads x 777 tokens x 128.
    g = gen(20)
    shape = (4, 8, 777, 128)
    base, deltas = kv(shape, dtype, g), anchors(shape, dtype, 6, g)
    f, shift = inv_freq(128), torch.tensor(2049)
    tw = ops.token_weights(base, deltas, 1.0)
    cw = ops.segment_weights(base, deltas, 1.0)
    for args in [(base, deltas, tw, shift, f), (base, deltas, cw, shift, None)]:
        assert_close(ops.fused_offset(*_cuda(args)).cpu(), ops.fused_offset(*args), **tol(dtype))
    assert_close(ops.value_distances(*_cuda((base, deltas))).cpu(), ops.value_distances(base, deltas),
                 atol=1e-3, rtol=1e-4)
    assert_close(ops.token_weights(*_cuda((base, deltas))).cpu(), tw, **SCORE_TOL)
    assert_close(ops.segment_weights(*_cuda((base, deltas))).cpu(), cw, **SCORE_TOL)


def test_grids_at_the_limits():
    # 600000 (layer, head) rows of one token: grid_y clamps at 65535 with
    # several rows per thread; 100000 tokens of one row: a long grid_x.
    g = gen(33)
    for shape in [(75_000, 8, 1, 64), (1, 1, 100_001, 128)]:
        base = kv(shape, BF16, g).cuda()
        deltas = [d.cuda() for d in anchors(shape, BF16, 2, g, max_extra=0)]
        f = inv_freq(shape[3]).cuda()
        shift = torch.tensor(1000, device="cuda")
        assert_close(ops.rope_move(base, f, shift), ref.rope_move(base, f, shift), **tol(BF16))
        tw = ops.token_weights(base, deltas, 1.0)
        assert_close(tw, ref.token_weights(base, deltas, 1.0), **SCORE_TOL)
        cw = ops.segment_weights(base, deltas, 1.0)
        assert_close(cw, ref.segment_weights(base, deltas, 1.0), **SCORE_TOL)
        assert_close(ops.value_distances(base, deltas), ref.value_distances(base, deltas), atol=1e-3, rtol=1e-4)
        for w in (tw, cw):
            assert_close(ops.fused_offset(base, deltas, w, shift, f),
                         ref.fused_offset(base, deltas, w, shift, f), **tol(BF16))
        del base, deltas
    torch.cuda.synchronize()


def test_8b_shape_against_the_reference_on_device():
    # 32 layers x 8 KV heads x 3072 tokens x 128, bf16, 20 anchors (~4.5 GB).
    torch.manual_seed(34)
    shape, n = (32, 8, 3072, 128), 20
    base = torch.randn(shape, device="cuda").to(BF16)
    deltas = [torch.randn(shape, device="cuda").to(BF16) for _ in range(n)]
    f = inv_freq(128).cuda()
    shift = torch.tensor(3000, device="cuda")
    d = ops.value_distances(base, deltas)
    assert_close(d, ref.value_distances(base, deltas), atol=1e-2, rtol=1e-4)
    tw = ops.token_weights(base, deltas, 1.0)
    assert_close(tw, ref.token_weights(base, deltas, 1.0), atol=1e-5, rtol=1e-3)
    cw = ops.segment_weights(base, deltas, 1.0)
    assert_close(cw, ref.segment_weights(base, deltas, 1.0), atol=1e-5, rtol=1e-3)
    for w, rot in ((tw, f), (cw, None)):
        out = ops.fused_offset(base, deltas, w, shift, rot)
        assert_close(out, ref.fused_offset(base, deltas, w, shift, rot), **tol(BF16))
        del out
    torch.cuda.synchronize()


@pytest.mark.skipif(torch.cuda.device_count() < 2 if HAS_CUDA else True, reason="needs two GPUs")
def test_second_device_while_current_is_first():
    g = gen(35)
    shape = (2, 2, 9, 128)
    base, deltas = kv(shape, F16, g), anchors(shape, F16, 3, g)
    f, w = inv_freq(128), torch.softmax(torch.randn(3, 9, generator=g), 0)
    dev = torch.device("cuda:1")
    with torch.cuda.device(0):
        out = ops.fused_offset(base.to(dev), [d.to(dev) for d in deltas], w.to(dev),
                               torch.tensor(5, device=dev), f.to(dev))
        tw = ops.token_weights(base.to(dev), [d.to(dev) for d in deltas], 1.0)
    assert out.device == dev and tw.device == dev
    assert_close(out.cpu(), ops.fused_offset(base, deltas, w, torch.tensor(5), f), **tol(F16))
    assert_close(tw.cpu(), ops.token_weights(base, deltas, 1.0), **SCORE_TOL)


# ---- kvcomm.AnchorPool end to end on CUDA ----------------------------------

PL, PH, PD = 3, 2, 64


def _pkv(tokens, seed, scale=1.0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(PL, PH, tokens, PD, generator=g) * scale).to(device)


def _run_pool(device):
    """The same sequence of pool calls on one device; returns what it saw."""
    pool = kvcomm.AnchorPool(kvcomm.PoolConfig(gamma=0.9, capacity=4, window=2))
    seen = {"decisions": [], "estimates": []}
    for seed in range(5):
        base = _pkv(7, seed, device=device)
        aid = pool.add_anchor("q", base, base * 0.5)
        pool.record_deltas("q", aid, "agent", _pkv(7, seed + 100, 0.1, device), _pkv(7, seed + 200, 0.1, device),
                           _pkv(5, seed + 300, 0.1, device), _pkv(5, seed + 400, 0.1, device))
        d = pool.decide("q", (_pkv(6, 0, device=device) + 1e-3))
        seen["decisions"].append((d.share, d.reason, d.candidates, d.distances, d.probs, d.entropy,
                                  d.credited))
    f = inv_freq(PD).to(device)
    base_k, base_v = _pkv(6, 50, device=device), _pkv(6, 51, device=device)
    tk, tv = _pkv(5, 52, device=device), _pkv(5, 53, device=device)
    dst_k, dst_v = torch.zeros(PL, PH, 20, PD, device=device), torch.zeros(PL, PH, 20, PD, device=device)
    res = pool.estimate("q", "agent", base_k, base_v, f, 4, dst_k[:, :, 4:10], dst_v[:, :, 4:10],
                        tk, tv, 10, dst_k[:, :, 10:15], dst_v[:, :, 10:15])
    seen["estimates"] = (list(res.anchors), dst_k.cpu(), dst_v.cpu())
    seen["anchors"] = [(a.id, a.length, a.activations) for a in pool.anchors("q")]
    seen["bytes"] = pool.memory_bytes()
    return pool, seen, pool.anchors("q")


def test_anchor_pool_end_to_end_equals_cpu():
    _, cpu, _ = _run_pool("cpu")
    _, gpu, _ = _run_pool("cuda")
    for a, b in zip(cpu["decisions"], gpu["decisions"]):
        assert a[0] == b[0] and a[1] == b[1] and a[2] == b[2] and a[6] == b[6]
        assert_close(torch.tensor(a[3]), torch.tensor(b[3]), atol=1e-4, rtol=1e-4)
        assert_close(torch.tensor(a[4]), torch.tensor(b[4]), atol=1e-5, rtol=1e-4)
    assert any(d[0] for d in gpu["decisions"]), "no decision shared: the share branch did not run"
    assert cpu["anchors"] == gpu["anchors"] and cpu["bytes"] == gpu["bytes"]
    assert cpu["estimates"][0] == gpu["estimates"][0] and cpu["estimates"][0]
    assert_close(gpu["estimates"][1], cpu["estimates"][1], atol=1e-5, rtol=1e-5)
    assert_close(gpu["estimates"][2], cpu["estimates"][2], atol=1e-5, rtol=1e-5)
    assert gpu["estimates"][1][:, :, 4:15].abs().sum() > 0  # something was written


def test_anchor_pool_keeps_tensors_on_the_device(tmp_path):
    pool, seen, stored = _run_pool("cuda")
    assert stored
    for info in stored:
        k, v = pool.anchor_base("q", info.id)
        assert k.device.type == "cuda" and v.device.type == "cuda"
    # Content on another device than the anchors is an error, not a copy.
    with pytest.raises(RuntimeError):
        pool.decide("q", _pkv(6, 0))
    # A saved CUDA pool loads back onto CUDA and estimates the same.
    pool.save(str(tmp_path / "pool.bin"))
    again = kvcomm.AnchorPool(kvcomm.PoolConfig(gamma=0.9, capacity=4, window=2))
    again.load(str(tmp_path / "pool.bin"), device="cuda")
    for info in again.anchors("q"):
        assert again.anchor_base("q", info.id)[0].device.type == "cuda"
    f = inv_freq(PD).cuda()
    dst = [torch.zeros(PL, PH, 6, PD, device="cuda") for _ in range(4)]
    for p, (k, v) in ((pool, dst[:2]), (again, dst[2:])):
        p.estimate("q", "agent", _pkv(6, 50, device="cuda"), _pkv(6, 51, device="cuda"), f, 4, k, v)
    assert torch.equal(dst[0], dst[2]) and torch.equal(dst[1], dst[3])


@pytest.mark.parametrize("storage", ["int8", "fp8", "bf16"])
def test_compact_pool_on_cuda_matches_the_cpu(storage):
    # int8 / fp8: the CUDA and CPU kernels both decode the stored codes in registers;
    # bf16 under this float32 model: decoded before the ops on CUDA, read as stored on the CPU.
    out = {}
    for device in ("cpu", "cuda"):
        pool = kvcomm.AnchorPool(kvcomm.PoolConfig(storage=storage))
        for i in range(3):
            aid = pool.add_anchor("q", _pkv(8 + i, 10 * i, device=device), _pkv(8 + i, 10 * i + 1, device=device))
            pool.record_deltas("q", aid, "agent", 0.05 * _pkv(8 + i, 10 * i + 2, device=device),
                               0.05 * _pkv(8 + i, 10 * i + 3, device=device))
        f = inv_freq(PD).to(device)
        k, v = torch.zeros(PL, PH, 6, PD, device=device), torch.zeros(PL, PH, 6, PD, device=device)
        assert pool.estimate("q", "agent", _pkv(6, 50, device=device), _pkv(6, 51, device=device), f, 4, k, v).ok
        out[device] = (k.cpu(), v.cpu(), pool.decide("q", _pkv(6, 51, device=device), credit=False).distances)
    assert_close(out["cuda"][0], out["cpu"][0], atol=1e-5, rtol=1e-5)
    assert_close(out["cuda"][1], out["cpu"][1], atol=1e-5, rtol=1e-5)
    assert_close(torch.tensor(out["cuda"][2]), torch.tensor(out["cpu"][2]), atol=1e-4, rtol=1e-4)
