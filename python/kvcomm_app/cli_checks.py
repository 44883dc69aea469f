"""Checks of the `kvcomm` command's arguments that argparse's types cannot express.

They run before any model loads, so a bad value costs one line naming the option,
not a traceback from deep inside a run (an unusable --device used to surface as
"Torch not compiled with CUDA enabled" from the first tensor moved; a negative
--gamma as a RuntimeError of the anchor pool's constructor).
"""
from __future__ import annotations


class UsageError(ValueError):
    """A command-line value the command cannot run with; main() prints it as one line."""


# option -> smallest allowed value, for the integer and float options of every command
# (an option a command does not have is skipped; None means "not given").
_MINIMUMS = {
    "questions": 1, "warmup": 0, "offset": 0, "max_new_tokens": 1, "capacity": 1, "gamma": 0.0,
    "min_anchors": 2, "threads": 1, "agents": 1, "rounds": 1, "requests": 1, "prefix": 1,
    "input": 1, "output": 1,
}

# Why the smallest value, where the bare bound would puzzle.
_WHY = {
    "min_anchors": " (a slot shares from at least 2 anchors)",
    "capacity": " (anchors per slot)",
    "gamma": " (the entropy threshold: 0 shares nothing)",
}


def check_device(spec: str) -> None:
    """A device the ops have kernels for (cpu, cuda) and that this process can use."""
    import torch

    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as e:
        raise UsageError(f"--device {spec!r} is not a torch device ({e})") from None
    if device.type == "cpu":
        return
    if device.type != "cuda":
        raise UsageError(f"--device {spec}: kvcomm's ops have CPU and CUDA kernels only, not {device.type}")
    if not torch.backends.cuda.is_built():
        raise UsageError(f"--device {spec}: this torch ({torch.__version__}) is a CPU build, without CUDA")
    count = torch.cuda.device_count()
    if count == 0:
        raise UsageError(f"--device {spec}: torch has CUDA but sees no CUDA device")
    if device.index is not None and device.index >= count:
        raise UsageError(f"--device {spec}: only {count} CUDA device(s) visible (indices 0..{count - 1})")


def check_model(model: str | None, named: tuple[str, ...] = ()) -> None:
    """--model is one of `named` or an existing folder (models are never downloaded)."""
    import os

    if model is None or model in named or os.path.isdir(model):
        return
    known = f"one of {', '.join(named)} or " if named else ""
    raise UsageError(f"--model {model!r}: expected {known}a local model folder, and no such folder exists "
                     "(models are never downloaded)")


def check_args(args, named_models: tuple[str, ...] = ()) -> None:
    """Raises UsageError for the first option out of its range, an unusable device or a
    --model that is neither in `named_models` nor a folder."""
    for name, least in _MINIMUMS.items():
        value = getattr(args, name, None)
        if value is not None and value < least:
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"{flag} must be at least {least}{_WHY.get(name, '')}, got {value}")
    cap = getattr(args, "estimate_anchors", None)
    if cap is not None and cap < 0:
        raise UsageError(f"--estimate-anchors must be at least 0 (0: every candidate), got {cap}")
    share = getattr(args, "head_share", None)
    if share is not None and not 0 <= share <= 1:
        raise UsageError(f"--head-share must be a fraction in [0, 1] (0: off), got {share:g}")
    if getattr(args, "exact_tail", None) is not None:
        if args.exact_tail < 1:
            raise UsageError(f"--exact-tail must be at least 1 (the last prompt token), got {args.exact_tail}")
        base = args.recompute if args.recompute not in (None, "none") else ""
        args.recompute = ",".join(p for p in (base, f"tail={args.exact_tail}") if p)
    if getattr(args, "recompute", None) is not None:
        from kvcomm.plan.recompute import RecomputePolicy
        try:
            RecomputePolicy.parse(args.recompute)
        except ValueError as e:
            raise UsageError(f"--recompute: {e}") from None
    if getattr(args, "method", None):
        from kvcomm.plan.methods import method_settings
        try:
            method_settings(args.method)
        except ValueError as e:
            raise UsageError(f"--method: {e}") from None
        if getattr(args, "recompute", "none") not in (None, "none"):
            raise UsageError("--method sets the recompute policy itself: give --method or --recompute, not both")
    if getattr(args, "paired_only", False) and not getattr(args, "paired", False):
        raise UsageError("--paired-only needs --paired (it drops the free-running KVCOMM run)")
    if getattr(args, "backend", "hf") == "vllm":
        check_vllm_backend(args)
    for spec in getattr(args, "paired_variant", None) or []:
        if not getattr(args, "paired", False):
            raise UsageError("--paired-variant needs --paired (it replays the dense run teacher-forced)")
        parse_variant(spec)
    if getattr(args, "device", None) is not None:
        check_device(args.device)
    check_model(getattr(args, "model", None), named_models)


def check_vllm_backend(args) -> None:
    """Options the vLLM back end cannot honour. Its connector takes the all-or-nothing path
    with the last prompt token computed (docs/serving.md), the pool lives in the server, and
    a remote engine has no reply logits for a paired replay."""
    from kvcomm.plan.recompute import RecomputePolicy
    if getattr(args, "recompute", None) is not None and \
            RecomputePolicy.parse(args.recompute) != RecomputePolicy.parse("none"):
        raise UsageError(f"--recompute {args.recompute}: the vLLM back end computes the last prompt token only "
                         "(use --recompute none or --backend hf)")
    if getattr(args, "paired", False):
        raise UsageError("--paired needs reply logits and teacher forcing: use --backend hf (or --no-paired)")
    for option, attr, default in (("--anchor-storage", "anchor_storage", "model"), ("--pool-bytes", "pool_bytes", 0)):
        if getattr(args, attr, default) != default:
            raise UsageError(f"{option}: with --backend vllm the anchor pool lives in the server; pass it to "
                             "`kvcomm serve` and pass --server")
    if getattr(args, "pool", None):
        raise UsageError("--pool: with --backend vllm the anchor pool lives in the server; start it with "
                         "`kvcomm serve --pool-file PATH` and pass --server")


# How the pool may hold anchors (PoolConfig.storage; docs/method.md, "Compact anchors").
STORAGES = ("model", "bf16", "int8", "fp8")

_BYTE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_bytes(text: str) -> int:
    """'48M' / '1.5G' / '200000' -> bytes (K, M, G are binary units; a trailing 'iB' or 'B'
    is allowed). ValueError naming the text when it is not a size >= 0."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in _BYTE_UNITS else ""
    try:
        value = float(t[: len(t) - len(unit)])
    except ValueError:
        raise ValueError(f"{text!r} is not a size in bytes (e.g. 200000, 48M, 1.5G)") from None
    if not value >= 0:
        raise ValueError(f"{text!r}: a size in bytes must be >= 0")
    return int(value * _BYTE_UNITS[unit])


def byte_size_arg(text: str) -> int:
    """parse_bytes as an argparse type (its message becomes argparse's one-line error)."""
    import argparse
    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_storage(text: str) -> str:
    if text not in STORAGES:
        raise ValueError(f"{text!r} is not an anchor storage ({', '.join(STORAGES)})")
    return text


# PoolConfig fields a --paired-variant may set, with their parsers.
_VARIANT_POOL = {"gamma": float, "capacity": int, "min_anchors": int, "tau": float, "top_p": float,
                 "window": int, "storage": parse_storage, "byte_budget": parse_bytes}


def parse_variant(spec: str) -> dict:
    """'min_anchors=4 recompute=segments,budget=0.1 partial=off' -> overrides; UsageError
    naming the part that is wrong. 'method=cacheblend:0.15' sets estimator and recompute
    (kvcomm.plan.methods); 'estimator=base' the estimator alone."""
    from kvcomm.plan.estimator_names import ESTIMATORS
    from kvcomm.plan.methods import method_settings
    from kvcomm.plan.recompute import RecomputePolicy

    out: dict = {}
    for part in spec.split():
        key, eq, value = part.partition("=")
        if not eq or not value:
            raise UsageError(f"--paired-variant {spec!r}: {part!r} is not KEY=VALUE")
        if key == "method":
            try:
                out.update(method_settings(value))
            except ValueError as e:
                raise UsageError(f"--paired-variant {spec!r}: {e}") from None
            out["method"] = value
        elif key == "estimator":
            if value not in ESTIMATORS:
                raise UsageError(f"--paired-variant {spec!r}: estimator must be one of {', '.join(ESTIMATORS)}, "
                                 f"got {value!r}")
            out[key] = value
        elif key == "recompute":
            try:
                RecomputePolicy.parse(value)
            except ValueError as e:
                raise UsageError(f"--paired-variant {spec!r}: {e}") from None
            out[key] = value
        elif key == "head_share":
            try:
                out[key] = float(value)
            except ValueError:
                out[key] = -1.0
            if not 0 <= out[key] <= 1:
                raise UsageError(f"--paired-variant {spec!r}: head_share must be a fraction in [0, 1], got {value!r}")
        elif key == "estimate_anchors":
            if not value.isdigit():
                raise UsageError(f"--paired-variant {spec!r}: estimate_anchors must be an int >= 0 (0: all), "
                                 f"got {value!r}")
            out[key] = int(value)
        elif key == "partial":
            if value not in ("on", "off"):
                raise UsageError(f"--paired-variant {spec!r}: partial must be on or off, got {value!r}")
            out[key] = value == "on"
        elif key in _VARIANT_POOL:
            try:
                out[key] = _VARIANT_POOL[key](value)
            except ValueError as e:
                why = str(e) if key in ("storage", "byte_budget") else f"must be a number, got {value!r}"
                raise UsageError(f"--paired-variant {spec!r}: {key} {why}") from None
            if key == "min_anchors" and out[key] < 2:
                raise UsageError(f"--paired-variant {spec!r}: min_anchors must be at least 2, got {out[key]}")
        else:
            raise UsageError(f"--paired-variant {spec!r}: unknown setting {key!r}; use method, estimator, "
                             f"recompute, partial, head_share, estimate_anchors or a PoolConfig field ({', '.join(sorted(_VARIANT_POOL))})")
    if not out:
        raise UsageError(f"--paired-variant {spec!r}: no settings")
    return out
