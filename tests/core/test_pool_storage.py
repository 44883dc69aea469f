"""Compact anchor storage (PoolConfig.storage; docs/method.md, "Compact anchors"): what the pool holds
against the pure-torch reference, what decisions and estimates read, bytes, the byte budget,
save/load (exact for the compact form, conversion between storages, version-1 files) and
bad configurations."""
from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kvcomm
from kvcomm import reference as ref

STORAGES = ["model", "bf16", "int8", "fp8"]
L, H, D = 3, 2, 16


def kv(tokens: int, dtype=torch.float32, scale: float = 1.0, seed: int = 0, dim: int = D) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(L, H, tokens, dim, generator=g) * scale
    x[:, :, :, 3] *= 20  # an outlier channel, as real keys have
    return x.to(dtype)


def filled_pool(storage: str, dtype=torch.float32, anchors: int = 3, n: int = 12, seg: int = 5,
                dim: int = D, grow: int = 0, **cfg) -> tuple[kvcomm.AnchorPool, list[dict]]:
    """A pool with `anchors` anchors of slot 'q' (the i-th n + grow * i tokens long), each with
    deltas of agent 'a' (and a segment); returns the inputs given, for comparison."""
    pool = kvcomm.AnchorPool(kvcomm.PoolConfig(storage=storage, **cfg))
    given = []
    for i in range(anchors):
        t = dict(base_k=kv(n + grow * i, dtype, seed=10 * i, dim=dim), base_v=kv(n + grow * i, dtype, seed=10 * i + 1, dim=dim),
                 ph_k=kv(n + grow * i, dtype, 0.05, seed=10 * i + 2, dim=dim),
                 ph_v=kv(n + grow * i, dtype, 0.05, seed=10 * i + 3, dim=dim),
                 seg_k=kv(seg, dtype, 0.05, seed=10 * i + 4, dim=dim),
                 seg_v=kv(seg, dtype, 0.05, seed=10 * i + 5, dim=dim))
        aid = pool.add_anchor("q", t["base_k"], t["base_v"])
        pool.record_deltas("q", aid, "a", t["ph_k"], t["ph_v"], t["seg_k"], t["seg_v"])
        given.append(dict(t, id=aid))
    return pool, given


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == torch.float8_e4m3fn:
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return torch.equal(a, b)


STORED_NAMES = {"base_k": "base_k", "base_v": "base_v", "a/ph_k": "ph_k", "a/ph_v": "ph_v",
                "a/seg_k": "seg_k", "a/seg_v": "seg_v"}


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pool_holds_what_the_reference_compacts(storage, dtype):
    pool, given = filled_pool(storage, dtype)
    for t in given:
        stored = pool.anchor_stored("q", t["id"])
        assert set(stored) == set(STORED_NAMES)
        for name, key in STORED_NAMES.items():
            data, scale = stored[name]
            want_data, want_scale = ref.compact_anchor(t[key], storage)
            assert same_bits(data, want_data), (storage, dtype, name)
            if want_scale is None:
                assert scale is None
            else:
                assert scale.dtype == torch.float32 and scale.shape == (L, H, 1, D)
                torch.testing.assert_close(scale, want_scale, rtol=0, atol=0)
        # What callers read back is the decoded form, in the model's dtype.
        k, v = pool.anchor_base("q", t["id"])
        assert k.dtype == dtype
        want = ref.expand_anchor(*ref.compact_anchor(t["base_k"], storage), dtype)
        torch.testing.assert_close(k, want, rtol=0, atol=0)
        d = pool.anchor_deltas("q", t["id"], "a")
        want = ref.expand_anchor(*ref.compact_anchor(t["seg_v"], storage), dtype)
        torch.testing.assert_close(d["seg_v"], want, rtol=0, atol=0)


@pytest.mark.parametrize("storage,tol", [("bf16", 0.01), ("int8", 0.01), ("fp8", 0.07)])
def test_compact_error_is_bounded_by_the_format(storage, tol):
    # int8: half a step of amax/127 per channel; fp8 e4m3: 3 mantissa bits (1/16 relative).
    x = kv(40, scale=3.0)
    back = ref.expand_anchor(*ref.compact_anchor(x, storage), torch.float32)
    amax = x.abs().amax(dim=2, keepdim=True)
    assert ((back - x).abs() <= tol * amax + 1e-6).all()
    assert not torch.equal(back, x)  # something was actually lost


def test_model_storage_is_exact():
    pool, given = filled_pool("model")
    k, _ = pool.anchor_base("q", given[0]["id"])
    assert torch.equal(k, given[0]["base_k"])


def estimate_into(pool: kvcomm.AnchorPool, n: int = 10, seg: int = 5, dtype=torch.float32, dim: int = D,
                  spread: bool = False):
    base_k, base_v = kv(n, dtype, seed=99, dim=dim), kv(n, dtype, seed=98, dim=dim)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    out = [torch.zeros(L, H, n, dim, dtype=dtype), torch.zeros(L, H, n, dim, dtype=dtype),
           torch.zeros(L, H, seg, dim, dtype=dtype), torch.zeros(L, H, seg, dim, dtype=dtype)]
    res = pool.estimate("q", "a", base_k, base_v, inv_freq, 7, out[0], out[1],
                        kv(seg, dtype, seed=97, dim=dim), kv(seg, dtype, seed=96, dim=dim), 20, out[2], out[3],
                        want_spread=spread)
    assert res.ok
    if spread:
        out.append(res.spread)
    return out, pool.decide("q", base_v, credit=False)


def decoded_twin(pool: kvcomm.AnchorPool, given: list[dict]) -> kvcomm.AnchorPool:
    """A full-precision pool holding the decoded values of `pool`'s anchors."""
    twin = kvcomm.AnchorPool(kvcomm.PoolConfig())
    for t in given:
        aid = twin.add_anchor("q", *pool.anchor_base("q", t["id"]))
        d = pool.anchor_deltas("q", t["id"], "a")
        twin.record_deltas("q", aid, "a", d["ph_k"], d["ph_v"], d["seg_k"], d["seg_v"])
    return twin


# Head dims: 8 (less than a chunk: scalar loads only), 40 (two chunks and a scalar tail), 64.
COMPACT_DIMS = [8, 40, 64]


def check_compact_kernels() -> None:
    """int8 / fp8 anchors (and bf16 anchors under a float32 / fp16 model) decoded in the CPU
    kernels' registers give what the dense kernels give on the decoded values (float32 exactly up to summation order; half types within their
    rounding, since the dense twin holds decoded values rounded to the half type)."""
    for storage in ("int8", "fp8", "bf16"):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for dim in COMPACT_DIMS:
                pool, given = filled_pool(storage, dtype, dim=dim, grow=1)
                got, dec = estimate_into(pool, dtype=dtype, dim=dim, spread=True)
                want, dec_twin = estimate_into(decoded_twin(pool, given), dtype=dtype, dim=dim, spread=True)
                tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
                for a, b in zip(got, want):
                    torch.testing.assert_close(a, b, **tol, msg=f"{storage} {dtype} D{dim}")
                assert dec.distances == pytest.approx(dec_twin.distances, rel=1e-5 if dtype == torch.float32
                                                      else 2e-2), (storage, dtype, dim)


def check_every_fp8_code() -> None:
    """Every finite e4m3 value, stored with scale 1 (each channel's amax is 448), comes out of the
    kernels' decoding exactly: subnormals, both signs, the largest value, in chunks and tails."""
    codes = torch.tensor([c for c in range(256) if c not in (0x7F, 0xFF)], dtype=torch.uint8)
    values = codes.view(torch.float8_e4m3fn).to(torch.float32)
    assert values.abs().max() == 448
    t, dim = values.numel(), 40
    delta = values.view(1, 1, t, 1).expand(2, 1, t, dim).contiguous()
    pool = kvcomm.AnchorPool(kvcomm.PoolConfig(storage="fp8"))
    aid = pool.add_anchor("q", torch.zeros(2, 1, t, dim), torch.zeros(2, 1, t, dim))
    pool.record_deltas("q", aid, "a", delta, delta)
    assert torch.equal(pool.anchor_stored("q", aid)["a/ph_v"][0].view(torch.uint8)[1, 0, :, 0], codes)
    zeros = torch.zeros(2, 1, t, dim)
    dst_k, dst_v = torch.empty_like(zeros), torch.empty_like(zeros)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    assert pool.estimate("q", "a", zeros, zeros, inv_freq, 0, dst_k, dst_v).ok
    assert torch.equal(dst_v[1], delta[1]), "layer 1 takes the one anchor's delta with weight 1"
    assert torch.equal(dst_v[0], zeros[0]), "layer 0 takes no offset"


def test_every_fp8_code_decodes_exactly():
    check_every_fp8_code()


def test_compact_kernels_match_dense_kernels_on_decoded_values():
    check_compact_kernels()


def test_compact_kernels_portable_build():
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import test_pool_storage as t; "
            "from kvcomm import _C; assert _C._cpu_kernel_isa() == 'default'; t.check_compact_kernels(); t.check_every_fp8_code()")
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default", OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", code, str(Path(__file__).resolve().parent)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr


def test_compact_estimate_does_not_depend_on_threads():
    pool, _ = filled_pool("int8", n=300, dim=64)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, _ = estimate_into(pool, n=280, dim=64)
        torch.set_num_threads(2)
        two, _ = estimate_into(pool, n=280, dim=64)
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


@pytest.mark.parametrize("storage", ["bf16", "int8", "fp8"])
def test_estimate_and_decide_read_the_stored_values(storage):
    # A compact pool decides and estimates as a full-precision pool that was given the
    # decoded values: the storage changes the inputs, not the method.
    pool, given = filled_pool(storage)
    got, dec = estimate_into(pool)
    want, dec_twin = estimate_into(decoded_twin(pool, given))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert dec.distances == pytest.approx(dec_twin.distances, rel=1e-5)
    # ... and close to what full precision would give (int8: well under 1% of the values).
    exact, _ = estimate_into(filled_pool("model")[0])
    err = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, exact))
    assert err < {"bf16": 0.01, "int8": 0.01, "fp8": 0.06}[storage]


def test_bytes_count_the_compact_form():
    n, seg = 64, 16
    sizes = {}
    for storage in STORAGES:
        pool, _ = filled_pool(storage, anchors=1, n=n, seg=seg)
        stored = pool.anchor_stored("q", 0)
        want = sum(d.nbytes + (0 if s is None else s.nbytes) for d, s in stored.values())
        assert pool.memory_bytes() == want == pool.anchors("q")[0].bytes
        sizes[storage] = want
    assert sizes["model"] / sizes["bf16"] == 2
    # int8: 1 byte per value plus one float32 scale per channel of each tensor.
    values = L * H * D * (4 * n + 2 * seg)
    assert sizes["int8"] == sizes["fp8"] == values + 6 * L * H * D * 4
    assert sizes["model"] / sizes["int8"] > 3.2


def test_same_byte_budget_holds_more_compact_anchors():
    one = {s: filled_pool(s, anchors=1)[0].memory_bytes() for s in ("model", "int8")}
    budget = 3 * one["model"]
    held = {}
    for storage in ("model", "int8"):
        pool, _ = filled_pool(storage, anchors=12, byte_budget=budget)
        assert pool.memory_bytes() <= budget
        held[storage] = pool.size()
    assert held["model"] == 3
    assert held["int8"] == budget // one["int8"] > 2 * held["model"]


@pytest.mark.parametrize("storage", STORAGES)
def test_save_load_round_trip_is_exact(tmp_path, storage):
    pool, given = filled_pool(storage, dtype=torch.bfloat16)
    path = str(tmp_path / "pool.bin")
    pool.save(path)
    back = kvcomm.AnchorPool(kvcomm.PoolConfig(storage=storage))
    back.load(path)
    assert back.memory_bytes() == pool.memory_bytes()
    for t in given:
        a, b = pool.anchor_stored("q", t["id"]), back.anchor_stored("q", t["id"])
        assert set(a) == set(b)
        for name in a:
            assert same_bits(a[name][0], b[name][0]), name
            assert (a[name][1] is None) == (b[name][1] is None)
            if a[name][1] is not None:
                assert torch.equal(a[name][1], b[name][1])


@pytest.mark.parametrize("saved,loaded", [("model", "int8"), ("int8", "model"), ("int8", "fp8"),
                                          ("fp8", "bf16")])
def test_load_converts_to_the_pools_storage(tmp_path, saved, loaded):
    pool, given = filled_pool(saved)
    path = str(tmp_path / "pool.bin")
    pool.save(path)
    back = kvcomm.AnchorPool(kvcomm.PoolConfig(storage=loaded))
    back.load(path)
    for t in given:
        decoded = pool.anchor_base("q", t["id"])[0]  # what the file holds, decoded
        data, _ = back.anchor_stored("q", t["id"])["base_k"]
        want, _ = ref.compact_anchor(decoded, loaded)
        assert same_bits(data, want)


def write_version1(path, anchors: list[dict], dtype_code: int = 6) -> None:
    """A pool file in format version 1 (before anchor storage), written from its documented
    layout: plain tensors, no storage byte, FNV-1a checksum."""
    out = bytearray(b"KVCOMMPL" + struct.pack("<II", 1, 0))
    out += struct.pack("<qqqbqqQ", L, H, D, dtype_code, len(anchors), len(anchors), 1)

    def s(text: str):
        out.extend(struct.pack("<Q", len(text)) + text.encode())

    def t(x: torch.Tensor):
        out.extend(struct.pack("<bq", dtype_code, x.dim()) + struct.pack(f"<{x.dim()}q", *x.shape))
        out.extend(x.contiguous().numpy().tobytes())

    s("q")
    out += struct.pack("<Q", len(anchors))
    for i, a in enumerate(anchors):
        out += struct.pack("<qqqq", i, i, a["base_k"].shape[2], 0)
        t(a["base_k"]), t(a["base_v"])
        out += struct.pack("<Q", 1)
        s("a")
        out += struct.pack("<B", 1)
        for key in ("ph_k", "ph_v", "seg_k", "seg_v"):
            t(a[key])
    h = 1469598103934665603
    for byte in out:
        h = ((h ^ byte) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    out += struct.pack("<Q", h)
    with open(path, "wb") as f:
        f.write(out)


@pytest.mark.parametrize("storage", ["model", "int8"])
def test_version1_files_still_load(tmp_path, storage):
    _, given = filled_pool("model", anchors=2)
    path = str(tmp_path / "v1.bin")
    write_version1(path, given)  # float32 = ScalarType code 6
    pool = kvcomm.AnchorPool(kvcomm.PoolConfig(storage=storage))
    pool.load(path)
    assert pool.size() == 2
    for i, t in enumerate(given):
        data, _ = pool.anchor_stored("q", i)["a/seg_k"]
        assert same_bits(data, ref.compact_anchor(t["seg_k"], storage)[0])


def test_unknown_storage_is_refused():
    with pytest.raises(RuntimeError, match="storage must be 'model', 'bf16', 'int8' or 'fp8', got 'int4'"):
        kvcomm.PoolConfig(storage="int4")
    assert kvcomm.PoolConfig(storage="fp8").storage == "fp8"
    assert "storage='int8'" in repr(kvcomm.PoolConfig(storage="int8"))


@pytest.mark.parametrize("storage", ["int8", "fp8"])
def test_non_finite_values_cannot_be_stored_compactly(storage):
    pool = kvcomm.AnchorPool(kvcomm.PoolConfig(storage=storage))
    bad = kv(4)
    bad[1, 0, 2, 5] = float("nan")
    with pytest.raises(RuntimeError, match=r"AnchorPool.add_anchor: base_v holds NaN or Inf"):
        pool.add_anchor("q", kv(4), bad)
    assert pool.size() == 0
    aid = pool.add_anchor("q", kv(4), kv(4))
    with pytest.raises(RuntimeError, match=r"AnchorPool.record_deltas: ph_k holds NaN or Inf"):
        pool.record_deltas("q", aid, "a", bad, kv(4))


def test_corrupted_storage_code_is_reported(tmp_path):
    pool, _ = filled_pool("int8", anchors=1)
    path = tmp_path / "pool.bin"
    pool.save(str(path))
    raw = bytearray(path.read_bytes())
    storage_at = 8 + 8 + 3 * 8 + 1  # magic, version + reserved, layers/heads/dim, dtype
    assert raw[storage_at] == 2
    raw[storage_at] = 9
    h = 1469598103934665603
    for byte in raw[:-8]:
        h = ((h ^ byte) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    raw[-8:] = struct.pack("<Q", h)
    path.write_bytes(bytes(raw))
    with pytest.raises(RuntimeError, match="corrupted \\(anchor storage code 9\\)"):
        kvcomm.AnchorPool(kvcomm.PoolConfig(storage="int8")).load(str(path))
