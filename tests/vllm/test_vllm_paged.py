"""Token KV into and out of vLLM's paged CPU cache, through vLLM's own cache-write op."""
import types

import pytest
import torch
import vllm._custom_ops  # noqa: F401  (registers torch.ops._C)

from kvcomm.vllm.paged import PagedKV

ISAS = [(torch.float32, "vec"), (torch.bfloat16, "vec")]
if torch.cpu._is_amx_tile_supported():
    ISAS.append((torch.bfloat16, "amx"))


def paged(dtype, isa, layers=3, blocks=6, heads=3, block_size=32, head_dim=64):
    caches = {f"model.layers.{i}.self_attn.attn": torch.zeros(blocks, heads, block_size, 2 * head_dim, dtype=dtype)
              for i in reversed(range(layers))}
    attn = {n: types.SimpleNamespace(isa=isa, _k_scale_float=1.0, _v_scale_float=1.0) for n in caches}
    return PagedKV(caches, attn), caches


@pytest.mark.parametrize("dtype, isa", ISAS)
def test_write_then_read_is_exact(dtype, isa):
    p, caches = paged(dtype, isa)
    assert p.names == [f"model.layers.{i}.self_attn.attn" for i in range(3)]   # by layer number
    T = 70
    k = torch.randn(3, 3, T, 64).to(dtype)
    v = torch.randn(3, 3, T, 64).to(dtype)
    table = [4, 1, 5]
    p.write(k, v, p.slot_mapping(table, 0, T))
    rk, rv = p.read(table, 5, T)
    assert torch.equal(rk, k[:, :, 5:]) and torch.equal(rv, v[:, :, 5:])
    # the op wrote only the three blocks of the table
    untouched = [b for b in range(6) if b not in table]
    assert all(c[untouched].abs().sum() == 0 for c in caches.values())


def test_layout_is_not_assumed():
    """The fp32 "vec" path does not store a block as plain [token, channel] rows: reading
    the cache as if it did gives other numbers, while the probed map reads them back."""
    p, caches = paged(torch.float32, "vec")
    T = 32
    k = torch.randn(3, 3, T, 64)
    p.write(k, k.clone(), p.slot_mapping([2], 0, T))
    naive = caches["model.layers.0.self_attn.attn"][2, :, :, :64]          # [heads, tokens, channels]
    assert not torch.equal(naive, k[0])
    assert torch.equal(p.read([2], 0, T)[0][0], k[0])


def test_errors_name_the_problem():
    p, _ = paged(torch.float32, "vec")
    with pytest.raises(ValueError, match="need 3 blocks, the request has 1"):
        p.slot_mapping([0], 0, 70)
    with pytest.raises(ValueError, match="does not fit the cache"):
        p.write(torch.zeros(3, 2, 4, 64), torch.zeros(3, 2, 4, 64), p.slot_mapping([0], 0, 4))
    with pytest.raises(ValueError, match="fp8"):
        PagedKV({"model.layers.0.self_attn.attn": torch.zeros(1, 1, 32, 128)}, {}, "fp8")
