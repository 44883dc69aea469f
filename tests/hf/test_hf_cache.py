"""KVBufferCache: a transformers Cache over one [L, H, T, D] buffer. Forwards in
chunks over it must equal one forward over a DynamicCache, and model.generate must
run on it exactly as on its own cache."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, GenerationConfig

import kvcomm.hf as khf
from kvcomm.hf import KVBufferCache

from conftest import ARCHS


def _enabled(tiny, arch):
    model, tok = tiny(arch)
    return model, tok, khf.enable(model)


def _ids(tok, n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, len(tok), (n,), generator=g).tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_forward_equals_one_dynamic_cache_forward(tiny, arch):
    model, tok, spec = _enabled(tiny, arch)
    ids = _ids(tok, 37)
    with torch.no_grad():
        ref_cache = DynamicCache(config=model.config)
        ref = model(input_ids=torch.tensor([ids]), past_key_values=ref_cache, use_cache=True).logits[0]
        # Start small so the buffer has to grow twice on the way.
        cache = KVBufferCache.for_spec(spec, capacity=5)
        got, pos = [], 0
        for size in (1, 6, 13, 1, 16):
            chunk = ids[pos:pos + size]
            out = model(input_ids=torch.tensor([chunk]), past_key_values=cache, use_cache=True)
            got.append(out.logits[0])
            pos += size
        assert pos == len(ids)
    assert cache.length == len(ids) == cache.get_seq_length()
    assert cache.capacity >= len(ids)
    torch.testing.assert_close(torch.cat(got), ref, atol=2e-5, rtol=2e-5)
    for layer in range(spec.num_layers):
        k_ref, v_ref = ref_cache.layers[layer].keys[0], ref_cache.layers[layer].values[0]
        k, v = cache.span(0, len(ids))
        torch.testing.assert_close(k[layer], k_ref, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(v[layer], v_ref, atol=2e-5, rtol=2e-5)
        # transformers sees views of the shared buffer, not copies.
        assert cache.layers[layer].keys.data_ptr() == cache.k[layer].data_ptr()


def test_directly_written_prefix_is_used_like_a_computed_one(tiny):
    # The engine writes KV into the buffer and declares it valid with set_length;
    # a forward after that must attend to it exactly as if it had computed it.
    model, tok, spec = _enabled(tiny, "qwen3")
    ids = _ids(tok, 20, seed=1)
    with torch.no_grad():
        full = KVBufferCache.for_spec(spec, 20)
        ref = model(input_ids=torch.tensor([ids]), past_key_values=full).logits[0, -1]
        part = KVBufferCache.for_spec(spec, 20)
        part.k[:, :, :19].copy_(full.k[:, :, :19])
        part.v[:, :, :19].copy_(full.v[:, :, :19])
        part.set_length(19)
        got = model(input_ids=torch.tensor([ids[-1:]]), past_key_values=part).logits[0, -1]
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)
    # And garbage in the prefix is not silently ignored: the output changes.
    with torch.no_grad():
        part.k[1:, :, 5:10].mul_(-1.0)
        part.set_length(19)
        bad = model(input_ids=torch.tensor([ids[-1:]]), past_key_values=part).logits[0, -1]
    assert (bad - ref).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_generate_on_buffer_cache_equals_plain_generate(tiny, arch):
    model, tok, spec = _enabled(tiny, arch)
    ids = torch.tensor([_ids(tok, 24, seed=2)])
    gc = GenerationConfig(max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        plain = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gc)
        cache = KVBufferCache.for_spec(spec, capacity=8)  # grows during generate
        ours = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                              generation_config=gc)
    assert ours.shape == (1, 24 + 12)
    assert ours.tolist() == plain.tolist()
    # Every token but the last generated one was fed back through the model.
    assert cache.length == 24 + 12 - 1


def test_generate_continues_after_a_prefilled_cache(tiny):
    # What the engine does: prefill (or assemble) the prompt in the buffer, pick the
    # first token from the last logits, then hand generate prompt + first token; only
    # the first token is uncached. (Handing generate a sequence the cache already
    # holds completely re-runs its last token - transformers does that with its own
    # DynamicCache too - so the engine never does it.)
    model, tok, spec = _enabled(tiny, "mistral")
    prompt = _ids(tok, 16, seed=3)
    gc = GenerationConfig(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        x = torch.tensor([prompt])
        plain = model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=gc)[0].tolist()
        cache = KVBufferCache.for_spec(spec, 32)
        first = int(model(input_ids=x, past_key_values=cache).logits[0, -1].argmax())
        assert cache.length == 16
        x1 = torch.tensor([prompt + [first]])
        gc.max_new_tokens = 7
        ours = model.generate(input_ids=x1, attention_mask=torch.ones_like(x1), past_key_values=cache,
                              generation_config=gc)[0].tolist()
    assert ours == plain
    assert cache.length == 16 + 8 - 1


def test_crop_reset_and_bad_use(tiny):
    model, tok, spec = _enabled(tiny, "llama")
    cache = KVBufferCache.for_spec(spec, 16)
    with torch.no_grad():
        model(input_ids=torch.tensor([_ids(tok, 10)]), past_key_values=cache)
    cache.crop(7)
    assert cache.length == 7 and cache.layers[0].keys.shape[-2] == 7
    cache.crop(-2)
    assert cache.length == 5
    cache.reset()
    assert cache.length == 0
    with pytest.raises(ValueError, match="outside"):
        cache.set_length(17)
    with pytest.raises(ValueError, match="batch size 2"):
        with torch.no_grad():
            model(input_ids=torch.tensor([_ids(tok, 4)] * 2), past_key_values=cache)
