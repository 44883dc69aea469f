"""Reading and writing token KV in vLLM's paged cache, through vLLM's own cache-write op.

Where a token's key and value sit inside a block depends on the attention back end
and, on CPU, on the instruction path: the CPU back end's "amx" path packs bf16 key
pairs for the AMX tiles and the fp32 "vec" path stores keys transposed per block. So
nothing here indexes a block by assumption:

- writes go through the op the back end itself uses to store new tokens
  (torch.ops._C.cpu_attn_reshape_and_cache on CPU, reshape_and_cache_flash on CUDA);
- reads use a gather map found once per layout by writing known codes (token, head and
  channel numbers) through that same op into a one-block scratch cache and reading
  where each code landed. The map is checked to be a permutation, so a layout the
  probe does not understand is an error, never a silent mis-read.

Token KV is exchanged as [tokens, kv_heads, head_dim] per layer (the op's own input
layout). Only unquantised caches ("auto" cache dtype) are supported: an estimate
written into an fp8 cache would be re-quantised with scales it was not made for.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

_BASE = 16  # digits of the codes; 1..16 are exact in fp32, bf16 and fp16


@dataclass
class _Backend:
    name: str
    block_dim: int          # which dimension of a layer's cache tensor indexes blocks

    def split(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(key_cache, value_cache) views, each [num_blocks, ...], as the back end splits them."""
        if self.name == "cpu":
            nb, h, bs, two_d = kv.shape
            k, v = kv.view(nb, h, 2 * bs, two_d // 2).chunk(2, dim=2)
            return k, v
        return kv.unbind(0)   # flash layout: [2, num_blocks, block_size, heads, head_dim]

    def scratch(self, kv: torch.Tensor) -> torch.Tensor:
        shape = list(kv.shape)
        shape[self.block_dim] = 1
        return torch.zeros(shape, dtype=kv.dtype, device=kv.device)

    def heads_dim(self, kv: torch.Tensor) -> tuple[int, int, int]:
        """(block_size, kv_heads, head_dim) of a layer's cache."""
        if self.name == "cpu":
            _, h, bs, two_d = kv.shape
            return bs, h, two_d // 2
        _, _, bs, h, d = kv.shape
        return bs, h, d


class PagedKV:
    """Token-level access to the paged KV cache of one vLLM worker.

    kv_caches: {layer_name: cache tensor} as vLLM registers them with the connector;
    layers: {layer_name: attention layer} (for the CPU instruction path and KV scales);
    cache_dtype: vLLM's cache dtype setting."""

    def __init__(self, kv_caches: dict, layers: dict, cache_dtype: str = "auto"):
        if cache_dtype != "auto":
            raise ValueError(f"kvcomm connector: KV cache dtype {cache_dtype!r} is not supported (only 'auto', "
                             "the model's dtype): estimates cannot be re-quantised with scales they were not made for")
        self.names = sorted(kv_caches, key=_layer_index)
        self.caches = [kv_caches[n] for n in self.names]
        self.layers = [layers.get(n) for n in self.names]
        first = self.caches[0]
        self.backend = _Backend("cpu", 0) if first.device.type == "cpu" else _Backend("flash", 1)
        if self.backend.name == "flash" and (first.dim() != 5 or first.shape[0] != 2):
            raise ValueError(f"kvcomm connector: unsupported CUDA KV cache layout {tuple(first.shape)} (expected the "
                             "flash-attention layout [2, blocks, block_size, kv_heads, head_dim])")
        self.block_size, self.kv_heads, self.head_dim = self.backend.heads_dim(first)
        self.dtype, self.device = first.dtype, first.device
        self._maps: dict = {}
        self._offsets: dict = {}   # (layout, K/V, view) -> _storage_offsets

    @property
    def num_layers(self) -> int:
        return len(self.caches)

    # ------------------------------------------------------------------ writing

    def slot_mapping(self, block_ids: list[int], start: int, stop: int) -> torch.Tensor:
        """Cache slots (block * block_size + offset) of prompt positions [start, stop)."""
        pos = torch.arange(start, stop)
        table = torch.tensor(block_ids, dtype=torch.long)
        if stop > len(block_ids) * self.block_size:
            raise ValueError(f"kvcomm connector: positions up to {stop} need {-(-stop // self.block_size)} blocks, "
                             f"the request has {len(block_ids)}")
        return (table[pos // self.block_size] * self.block_size + pos % self.block_size).to(self.device)

    def _write_layer(self, i: int, kv: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        key_cache, value_cache = self.backend.split(kv)
        layer = self.layers[i]
        k = k.to(self.dtype).contiguous()
        v = v.to(self.dtype).contiguous()
        if self.backend.name == "cpu":
            isa = getattr(layer, "isa", None)
            if isa is None:
                raise RuntimeError(f"kvcomm connector: layer {self.names[i]} has no CPU attention isa yet")
            torch.ops._C.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, isa,
                                                    float(getattr(layer, "_k_scale_float", 1.0)),
                                                    float(getattr(layer, "_v_scale_float", 1.0)), "auto")
        else:
            torch.ops._C_cache_ops.reshape_and_cache_flash(k, v, key_cache, value_cache, slots, "auto",
                                                           layer._k_scale, layer._v_scale)

    def write(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """k, v [L, H, n, D] (all layers) into the cache slots [n]."""
        if k.shape[0] != self.num_layers or k.shape[1] != self.kv_heads or k.shape[3] != self.head_dim:
            raise ValueError(f"kvcomm connector: KV of shape {tuple(k.shape)} does not fit the cache "
                             f"({self.num_layers} layers, {self.kv_heads} KV heads, head_dim {self.head_dim})")
        for i, kv in enumerate(self.caches):
            self._write_layer(i, kv, k[i].transpose(0, 1), v[i].transpose(0, 1), slots)

    # ------------------------------------------------------------------ reading

    def _map(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather maps (key, value), each long [block_size, heads, head_dim]: the element
        of a block (in its row-major flattening) holding that token offset, head, channel."""
        layer = self.layers[i]
        key = (getattr(layer, "isa", None), self.dtype)
        if key in self._maps:
            return self._maps[key]
        bs, h, d = self.block_size, self.kv_heads, self.head_dim
        scratch = self.backend.scratch(self.caches[i])
        slots = torch.arange(bs, dtype=torch.long, device=self.device)
        fields = {"token": torch.arange(bs).view(bs, 1, 1).expand(bs, h, d),
                  "head": torch.arange(h).view(1, h, 1).expand(bs, h, d),
                  "dim": torch.arange(d).view(1, 1, d).expand(bs, h, d)}
        decoded = [{}, {}]   # per K/V: field -> value at each element of the block
        for name, values in fields.items():
            top = int(values.max()) + 1
            acc = [None, None]
            scale = 1
            while scale < top or scale == 1:
                digit = (values // scale) % _BASE + 1
                scratch.zero_()
                code = digit.to(torch.float32)
                self._write_layer(i, scratch, code, code, slots)
                for which, cache in enumerate(self.backend.split(scratch)):
                    got = cache[0].reshape(-1).float().round().long() - 1
                    acc[which] = got * scale if acc[which] is None else acc[which] + got * scale
                scale *= _BASE
            for which in (0, 1):
                decoded[which][name] = acc[which]
        maps = []
        for which in (0, 1):
            t, hh, dd = decoded[which]["token"], decoded[which]["head"], decoded[which]["dim"]
            n = bs * h * d
            ok = (t.numel() == n and bool(((t >= 0) & (t < bs) & (hh >= 0) & (hh < h) & (dd >= 0) & (dd < d)).all()))
            m = torch.full((bs, h, d), -1, dtype=torch.long)
            if ok:
                m[t.cpu(), hh.cpu(), dd.cpu()] = torch.arange(n)
                ok = bool((m >= 0).all()) and m.unique().numel() == n
            if not ok:
                raise RuntimeError(f"kvcomm connector: could not map the {'key' if which == 0 else 'value'} layout of "
                                   f"{self.names[i]} (isa {key[0]}, {self.dtype}): the cache-write op did not place "
                                   "every token, head and channel exactly once in a block")
            maps.append(m.to(self.device))
        self._maps[key] = tuple(maps)
        return self._maps[key]

    def read(self, block_ids: list[int], start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [L, H, n, D] of prompt positions [start, stop) (new tensors)."""
        n = stop - start
        pos = torch.arange(start, stop)
        table = torch.tensor(block_ids, dtype=torch.long)
        blocks = table[pos // self.block_size].to(self.device)
        offs = (pos % self.block_size).to(self.device)
        h, d = self.kv_heads, self.head_dim
        out_k = torch.empty(self.num_layers, h, n, d, dtype=self.dtype, device=self.device)
        out_v = torch.empty_like(out_k)
        # One index_select per layer and K/V straight out of the layer's cache storage: where
        # each output element [H, n, D] sits there (its block's start plus its place in the
        # block, _storage_offsets), built once per layout and call. A layer cache that is not
        # one contiguous tensor is read from its request's blocks copied one after another.
        index: dict = {}
        gathered = None   # (unique blocks, each token's place among them), for such caches
        for i, kv in enumerate(self.caches):
            contiguous = kv.is_contiguous()
            if not contiguous and gathered is None:
                gathered = torch.unique(blocks, return_inverse=True)
            for which, (cache, out) in enumerate(zip(self.backend.split(kv), (out_k, out_v))):
                key = (id(self._map(i)), which, contiguous, cache.stride(), cache.storage_offset() - kv.storage_offset())
                if key not in index:
                    if contiguous:
                        inner, start = self._storage_offsets(i, which, cache, kv), blocks * cache.stride(0)
                    else:
                        inner, start = self._map(i)[which], gathered[1] * (self.block_size * h * d)
                    index[key] = (start[:, None] + inner[offs].reshape(n, h * d)).view(n, h, d).transpose(0, 1).reshape(-1)
                src = kv.view(-1) if contiguous else cache[gathered[0]].reshape(-1)
                torch.index_select(src, 0, index[key], out=out[i].view(-1))
        return out_k, out_v

    def _storage_offsets(self, i: int, which: int, cache: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """[block_size, heads, head_dim]: where (token offset, head, channel) of block 0 of
        `cache` (a K or V view of layer cache `kv`) sits in kv's storage, in elements (once per
        layout and view)."""
        key = (id(self._map(i)), which, cache.shape[1:], cache.stride(), cache.storage_offset() - kv.storage_offset())
        if key not in self._offsets:
            pos = self._map(i)[which]   # row-major position in the block's view
            off = torch.full_like(pos, key[-1])
            for size, stride in reversed(list(zip(cache.shape[1:], cache.stride()[1:]))):
                off += (pos % size) * stride
                pos = pos // size
            self._offsets[key] = off
        return self._offsets[key]


def _layer_index(name: str) -> tuple:
    """Sort key of 'model.layers.12.self_attn.attn': by the layer number."""
    nums = [int(p) for p in name.split(".") if p.isdigit()]
    return (nums[0] if nums else -1, name)
