"""The CPU kernels' own guarantees, beyond test_ops.py's per-op cases:

- both builds of the inner loops (cpp/cpu_kernels_avx2.cpp, picked on machines
  with AVX2; cpp/cpu_kernels_default.cpp, the portable one) match the reference,
  on head dims that reach every loop tail (a half chunk, a scalar remainder,
  rotation pairs narrower than a vector); the portable build runs in a child
  process under ATEN_CPU_CAPABILITY=default, which is how kernels() is told
  to pick it;
- results are bit-identical at 1 and 2 threads (reductions are ordered by
  task, never by thread);
- the CPU's fused estimate of a slot (cpp/cpu_estimate.cpp) writes exactly
  what the op-by-op sequence writes;
- no code compiled for AVX2 can be reached from baseline code: every function
  of the built library that contains a VEX-encoded instruction lives in the
  AVX2 kernels' namespaces (an inline function of a shared header compiled
  under the AVX2 target pragma could otherwise be the copy the linker keeps,
  and a CPU without AVX2 would then fault outside the kernels).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

import kvcomm
from kvcomm import _C, ops
from kvcomm import reference as ref

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from op_cases import DISTANCE_TOL, SCORE_TOL, gen, inv_freq, kv, tol  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Head dims: 8 (rotation half of 4 < a vector: scalar rotation), 40 (one
# double chunk + a scalar tail of 8), 48 (one double chunk + one chunk),
# 64 and 128 (whole double chunks).
DIMS = [8, 40, 48, 64, 128]


def _slice(x: torch.Tensor) -> torch.Tensor:
    """x's values as tokens 2.. of a longer buffer (a KV-cache slice)."""
    L, H, T, D = x.shape
    buf = torch.zeros(L, H, T + 5, D, dtype=x.dtype)
    buf[:, :, 2:2 + T] = x
    return buf[:, :, 2:2 + T]


def check_against_reference(expected_isa: str) -> None:
    """Every streaming op on every dtype and head dim against the reference."""
    assert _C._cpu_kernel_isa() == expected_isa
    for dtype in DTYPES:
        for D in DIMS:
            g = gen(D)
            shape = (3, 2, 11, D)
            content = kv(shape, dtype, g)
            pool = [kv(shape, dtype, g, extra_tokens=e) for e in (0, 2, 5)]
            deltas = [kv(shape, dtype, g) * 0.1 for _ in pool]
            f = inv_freq(D)
            layouts = {"contiguous": (content, pool), "slice": (_slice(content), [_slice(a) for a in pool])}
            for name, (c, anchors) in layouts.items():
                where = f"{dtype} D{D} {name}"
                assert_close(ops.value_distances(c, anchors), ref.value_distances(content, pool),
                             **DISTANCE_TOL, msg=where)
                tw = ops.token_weights(c, anchors, 0.7)
                assert_close(tw, ref.token_weights(content, pool, 0.7), **SCORE_TOL, msg=where)
                cw = ops.segment_weights(c, anchors, 0.7)
                assert_close(cw, ref.segment_weights(content, pool, 0.7), **SCORE_TOL, msg=where)
                for w, rot in ((tw, f), (cw, None)):
                    want = ref.fused_offset(content, deltas, w, torch.tensor(29), rot)
                    assert_close(ops.fused_offset(c, deltas, w, 29, rot), want, **tol(dtype), msg=where)
                shifts = torch.arange(11) * 7 - 3
                assert_close(ops.rope_move(c, f, shifts), ref.rope_move(content, f, shifts), **tol(dtype),
                             msg=where)
                moved = c.clone()
                ops.rope_move_(moved, f, 1000)
                assert_close(moved, ref.rope_move(content, f, 1000), **tol(dtype), msg=where)


def test_this_machines_build_matches_reference():
    cap = torch.backends.cpu.get_cpu_capability()
    avx2 = cap in ("AVX2", "AVX512") and os.uname().machine == "x86_64"
    check_against_reference("avx2" if avx2 else "default")


def test_portable_build_matches_reference():
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import test_cpu_kernels as t; "
            "t.check_against_reference('default')")
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default", OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", code, str(HERE)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr


def _all_ops(g, dtype):
    shape = (4, 4, 300, 64)  # 16 rows, enough work per row chunk for two threads
    content = kv(shape, dtype, g)
    pool = [kv(shape, dtype, g, extra_tokens=e) for e in (0, 3, 7)]
    deltas = [kv(shape, dtype, g) * 0.1 for _ in pool]
    f = inv_freq(64)
    tw = ops.token_weights(content, pool, 1.0)
    cw = ops.segment_weights(content, pool, 1.0)
    return [ops.value_distances(content, pool), tw, cw, ops.fused_offset(content, deltas, tw, 5, f),
            ops.fused_offset(content, deltas, cw, 5, None), ops.rope_move(content, f, 77)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_results_do_not_depend_on_thread_count(dtype):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _all_ops(gen(3), dtype)
        torch.set_num_threads(2)
        two = _all_ops(gen(3), dtype)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_estimate_writes_what_the_op_sequence_writes(dtype):
    L, H, D, T, S = 3, 2, 40, 9, 4
    g = gen(11)
    pool = kvcomm.AnchorPool(kvcomm.PoolConfig(tau=0.6))
    anchors = []
    for extra in (0, 3, 6):  # bases longer than the content: segment weights read their last T tokens
        a = dict(base_k=kv((L, H, T, D), dtype, g, extra_tokens=extra),
                 base_v=kv((L, H, T, D), dtype, g, extra_tokens=extra),
                 ph_k=kv((L, H, T, D), dtype, g, extra_tokens=extra) * 0.1,
                 ph_v=kv((L, H, T, D), dtype, g, extra_tokens=extra) * 0.1,
                 seg_k=kv((L, H, S, D), dtype, g) * 0.1, seg_v=kv((L, H, S, D), dtype, g) * 0.1)
        aid = pool.add_anchor("slot", a["base_k"], a["base_v"])
        pool.record_deltas("slot", aid, "agent", a["ph_k"], a["ph_v"], a["seg_k"], a["seg_v"])
        anchors.append(a)
    base_k, base_v = kv((L, H, T, D), dtype, g), kv((L, H, T, D), dtype, g)
    seg_k, seg_v = kv((L, H, S, D), dtype, g), kv((L, H, S, D), dtype, g)
    f = inv_freq(D)
    buf_k = torch.zeros(L, H, T + S + 4, D, dtype=dtype)
    buf_v = torch.zeros_like(buf_k)
    res = pool.estimate("slot", "agent", base_k, base_v, f, 50, buf_k[:, :, 2:2 + T], buf_v[:, :, 2:2 + T],
                        seg_template_k=seg_k, seg_template_v=seg_v, seg_position=50 + T,
                        seg_dst_k=buf_k[:, :, 2 + T:2 + T + S], seg_dst_v=buf_v[:, :, 2 + T:2 + T + S],
                        want_spread=True)
    assert len(res.anchors) == 3
    bk, bv = [a["base_k"] for a in anchors], [a["base_v"] for a in anchors]
    wk, wv = ops.token_weights(base_k, bk, 0.6), ops.token_weights(base_v, bv, 0.6)
    ph_k, ph_v = [a["ph_k"] for a in anchors], [a["ph_v"] for a in anchors]
    assert torch.equal(buf_k[:, :, 2:2 + T], ops.fused_offset(base_k, ph_k, wk, 50, f))
    assert torch.equal(buf_v[:, :, 2:2 + T], ops.fused_offset(base_v, ph_v, wv, 50, None))
    ck, cv = ops.segment_weights(base_k, bk, 0.6), ops.segment_weights(base_v, bv, 0.6)
    assert torch.equal(buf_k[:, :, 2 + T:2 + T + S],
                       ops.fused_offset(seg_k, [a["seg_k"] for a in anchors], ck, 50 + T, f))
    assert torch.equal(buf_v[:, :, 2 + T:2 + T + S],
                       ops.fused_offset(seg_v, [a["seg_v"] for a in anchors], cv, 50 + T, None))
    assert torch.equal(res.spread, ops.token_spread(ph_k, wk) + ops.token_spread(ph_v, wv))
    assert not buf_k[:, :, :2].any() and not buf_k[:, :, 2 + T + S:].any()


# Where AVX2 code may live: the AVX2 build's own namespace and ATen's AVX2
# CPU_CAPABILITY namespace (its Vectorized<T> for AVX2).
AVX2_HOMES = ("kvcomm::cpu::isa_avx2::", "at::vec::AVX2::")
FUNCTION = re.compile(r"^[0-9a-f]+ <(.+)>:$")


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="VEX encoding is x86-64's")
def test_avx2_code_stays_in_its_namespaces():
    objdump = shutil.which("objdump")
    assert objdump, "objdump (binutils) is needed to inspect the built library"
    lib = _C.__file__
    dump = subprocess.run([objdump, "-d", "-C", "--no-show-raw-insn", lib], capture_output=True, text=True,
                          check=True).stdout
    vex, current = set(), None
    for line in dump.splitlines():
        m = FUNCTION.match(line)
        if m:
            current = m.group(1)
            continue
        parts = line.split("\t")
        # "  addr:\tmnemonic operands": VEX-encoded SSE/AVX mnemonics start with v
        # (vmovups, vfmadd231ps, vcvtph2ps, vzeroupper ...).
        if current and len(parts) >= 2 and parts[1].startswith("v"):
            vex.add(current)
    assert vex, f"no AVX2 code found in {lib}: is the AVX2 build of the kernels in it?"
    stray = sorted(f for f in vex if not any(h in f for h in AVX2_HOMES))
    assert not stray, "AVX2 code outside the AVX2 kernels:\n" + "\n".join(stray[:20])
