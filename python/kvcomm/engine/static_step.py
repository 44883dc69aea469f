"""The reuse path's last-token forward over a fixed KV buffer, CUDA-graph captured on GPU.

On the reuse path only the prompt's last token runs through the model (docs/method.md,
"The two paths"), so its time to first token is one token's forward plus the offset work. Run
eagerly through transformers, that forward is dominated by Python and kernel-launch
overhead on a GPU (for an 8B model on an H100, about 35 ms eager against about 10 ms
captured, where a dense prefill of 3.5K tokens takes about 110 ms). This module runs it
as a replayed CUDA graph:

- one KV buffer [layers, kv_heads, capacity, head_dim] (a KVBufferCache) lives as long
  as the step; the engine assembles the reuse path's cache (exact S0 + estimated slots
  and segments) straight into it, so nothing is copied for the graph;
- the token id and its position are static device tensors copied in before a replay;
  each layer writes the token's K/V at that position with `index_copy_`, and attention
  covers a fixed window of the buffer under a boolean mask `key position <= position`;
- windows come in buckets of `bucket` tokens, one graph each, so attention over a short
  prompt does not pay for the whole capacity.

`capture=False` runs the same static computation eagerly: the CPU tests use it to check
that the static path computes what the engine's ordinary forward does. The graph capture
itself needs CUDA and is not exercised by the CPU test suite.
"""
from __future__ import annotations

import torch
from ..hf.cache import KVBufferCache
from .window_cache import PositionedCache


class StaticOneTokenStep:
    """The last-token forward of the reuse path over one persistent buffer.

    Use through KVCommEngine.use_static_step(...). `capacity` bounds prompt + reply;
    a call that needs more falls back to the engine's ordinary path.
    """

    def __init__(self, model, spec, capacity: int, *, bucket: int = 512, capture: bool | None = None,
                 warmup: int = 2):
        if capacity < 2:
            raise ValueError(f"StaticOneTokenStep: capacity must be at least 2, got {capacity}")
        if bucket < 1:
            raise ValueError(f"StaticOneTokenStep: bucket must be at least 1, got {bucket}")
        self.model = model
        self.spec = spec
        self.capacity = int(capacity)
        self.bucket = int(bucket)
        device = spec.device
        self.capture = (torch.device(device).type == "cuda") if capture is None else bool(capture)
        if self.capture and torch.device(device).type != "cuda":
            raise ValueError("StaticOneTokenStep: CUDA graph capture needs the model on a CUDA device")
        self.warmup = warmup
        self.buffer = KVBufferCache.for_spec(spec, self.capacity)
        # Attention covers the whole window under a mask; a masked key still enters the
        # product q.k before the -inf is added, so never-written memory must not be NaN.
        self.buffer.k.zero_()
        self.buffer.v.zero_()
        self._k_ptr = self.buffer.k.data_ptr()
        self.ids = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.arange = torch.arange(self.capacity, device=device)
        self._windows: dict[int, tuple] = {}     # window -> (cache, graph or None, static logits)
        self.replays = 0

    # -- what the engine asks --------------------------------------------------------

    def fits(self, needed: int) -> bool:
        return needed <= self.capacity and self.buffer.k.data_ptr() == self._k_ptr

    def take(self) -> KVBufferCache:
        """The buffer, emptied, for the engine to assemble a reuse-path cache into."""
        self.buffer.set_length(0)
        return self.buffer

    def owns(self, cache) -> bool:
        return cache is self.buffer

    def window_for(self, position: int) -> int:
        return min(self.capacity, -(-(position + 1) // self.bucket) * self.bucket)

    def prepare(self, max_position: int | None = None) -> None:
        """Captures the graphs of every window up to `max_position` now (with a dummy
        token at position 0), so no timed call pays for a capture."""
        top = self.capacity - 1 if max_position is None else min(max_position, self.capacity - 1)
        w = self.bucket
        while True:
            window = min(w, self.capacity)
            self._window(window)
            if window >= self.window_for(top):
                break
            w += self.bucket

    @torch.inference_mode()
    def __call__(self, cache: KVBufferCache, token_id: int, position: int) -> torch.Tensor:
        """Runs `token_id` at `position` after the `position` tokens the buffer holds;
        returns float32 logits [vocab]; the buffer then holds position + 1 tokens."""
        if cache is not self.buffer:
            raise ValueError("StaticOneTokenStep: the cache is not this step's buffer")
        if not 0 <= position < self.capacity:
            raise ValueError(f"StaticOneTokenStep: position {position} outside [0, {self.capacity})")
        if self.buffer.k.data_ptr() != self._k_ptr:
            raise RuntimeError("StaticOneTokenStep: the buffer was reallocated (grown); the captured "
                               "graphs would read stale memory")
        self.ids.fill_(int(token_id))
        self.pos.fill_(int(position))
        _, graph, logits = self._window(self.window_for(position))
        if graph is not None:
            graph.replay()
            out = logits
        else:
            out = self._forward(self._windows[self.window_for(position)][0])
        self.replays += 1
        self.buffer.set_length(position + 1)
        # A copy: a graph's output lives in its pool and the next replay overwrites it.
        return out.to(torch.float32, copy=True)

    # -- building and capturing ------------------------------------------------------

    def _forward(self, window_cache: PositionedCache) -> torch.Tensor:
        window = window_cache.layers[0].keys.shape[-2]
        mask = (self.arange[:window] <= self.pos).view(1, 1, 1, window)
        out = self.model(input_ids=self.ids, position_ids=self.pos.view(1, 1), attention_mask=mask,
                         past_key_values=window_cache, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1]

    @torch.inference_mode()
    def _window(self, window: int):
        found = self._windows.get(window)
        if found is not None:
            return found
        wc = PositionedCache(self.buffer, window, self.pos, compileable=True)
        graph = logits = None
        if self.capture:
            # Warm-up on a side stream (cuBLAS workspaces, lazy inits), then capture. The
            # warm-up writes one token's K/V at the current position: the engine always
            # assembles the buffer afresh before a call, and a warm-up during a call
            # computes exactly what the call itself then computes.
            stream = torch.cuda.Stream(device=self.buffer.k.device)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(max(self.warmup, 1)):
                    self._forward(wc)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = self._forward(wc)
        self._windows[window] = (wc, graph, logits)
        return self._windows[window]

    def describe(self) -> str:
        kind = "CUDA graph" if self.capture else "static eager"
        return f"{kind} one-token step, capacity {self.capacity}, buckets of {self.bucket}"
