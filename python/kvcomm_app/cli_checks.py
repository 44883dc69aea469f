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
    "gamma": " (the entropy gate: 0 shares nothing)",
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
    if getattr(args, "recompute", None) is not None:
        from kvcomm.engine.recompute import RecomputePolicy
        try:
            RecomputePolicy.parse(args.recompute)
        except ValueError as e:
            raise UsageError(f"--recompute: {e}") from None
    if getattr(args, "paired_only", False) and not getattr(args, "paired", False):
        raise UsageError("--paired-only needs --paired (it drops the free-running KVCOMM run)")
    if getattr(args, "device", None) is not None:
        check_device(args.device)
    check_model(getattr(args, "model", None), named_models)
