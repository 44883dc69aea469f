"""The `kvcomm` command refuses unusable options in one line naming the option, before
any model loads (no traceback, exit status 2)."""
import types

import pytest
import torch

from kvcomm_app import cli
from kvcomm_app.cli_checks import UsageError, check_args, check_device, check_model


@pytest.mark.parametrize("argv,needle", [
    (["demo", "--questions", "0"], "--questions must be at least 1, got 0"),
    (["demo", "--warmup", "-1"], "--warmup must be at least 0, got -1"),
    (["demo", "--offset", "-3"], "--offset must be at least 0, got -3"),
    (["demo", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["demo", "--min-anchors", "1"], "--min-anchors must be at least 2 (a slot shares from at least 2 anchors)"),
    (["demo", "--recompute", "tail=0"], "--recompute: recompute tail must be an int >= 1"),
    (["demo", "--threads", "0"], "--threads must be at least 1"),
    (["demo", "--head-share", "1.5"], "--head-share must be a fraction in [0, 1] (0: off), got 1.5"),
    (["bench", "ttft", "--head-share", "-0.1"], "--head-share must be a fraction in [0, 1]"),
    (["eval", "--task", "gsm8k", "--estimate-anchors", "-1"], "--estimate-anchors must be at least 0"),
    (["eval", "--task", "gsm8k", "--gamma", "-1"], "--gamma must be at least 0.0 (the entropy threshold"),
    (["eval", "--task", "gsm8k", "--capacity", "0"], "--capacity must be at least 1 (anchors per slot), got 0"),
    (["eval", "--task", "gsm8k", "--agents", "0"], "--agents must be at least 1"),
    (["eval", "--task", "gsm8k", "--rounds", "0"], "--rounds must be at least 1"),
    (["eval", "--task", "gsm8k", "--sweep", "--questions", "0"], "--questions must be at least 1"),
    (["bench", "ttft", "--requests", "0"], "--requests must be at least 1"),
    (["bench", "ttft", "--warmup", "-1"], "--warmup must be at least 0"),
    (["bench", "ttft", "--output", "0"], "--output must be at least 1"),
    (["demo", "--device", "tpu"], "--device 'tpu' is not a torch device"),
    (["demo", "--device", "meta"], "CPU and CUDA kernels only, not meta"),
    (["demo", "--model", "/no/such/folder"], "--model '/no/such/folder': expected a local model folder"),
    (["bench", "ttft", "--model", "llama-9b"], "expected one of smollm2, llama-3.1-8b-random, tiny-random or"),
    # what the vLLM back end's connector cannot do is refused before a server starts
    (["eval", "--task", "gsm8k", "--backend", "vllm", "--paired"], "--paired needs reply logits"),
    (["eval", "--task", "gsm8k", "--backend", "vllm", "--recompute", "segments"],
     "--recompute segments: the vLLM back end computes the last prompt token only"),
    (["eval", "--task", "gsm8k", "--backend", "vllm", "--pool", "p.bin"], "--pool: with --backend vllm"),
    (["bench", "ttft", "--backend", "vllm", "--recompute", "tail=4"], "the vLLM back end computes"),
    (["eval", "--task", "gsm8k", "--backend", "vllm", "--anchor-storage", "int8"],
     "--anchor-storage: with --backend vllm the anchor pool lives in the server"),
    (["bench", "ttft", "--backend", "vllm", "--pool-bytes", "1G"], "--pool-bytes: with --backend vllm"),
])
def test_bad_options_are_one_line_before_anything_loads(argv, needle, capsys, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("a model was loaded for a command that should have been refused")
    monkeypatch.setattr("kvcomm.models.load_model", no_load)
    monkeypatch.setattr("kvcomm_app.bench.models.load_bench_model", no_load)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvcomm: ") and needle in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_device_without_cuda_is_refused_by_name(capsys):
    with pytest.raises(UsageError, match=r"--device cuda: (this torch .* is a CPU build|torch has CUDA but sees no)"):
        check_device("cuda")
    assert cli.main(["bench", "ttft", "--device", "cuda:0"]) == 2
    assert "--device cuda:0" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_device_index_out_of_range_is_refused():
    check_device("cuda")
    with pytest.raises(UsageError, match="CUDA device"):
        check_device(f"cuda:{torch.cuda.device_count()}")


def test_good_values_pass(tmp_path):
    args = types.SimpleNamespace(questions=1, warmup=0, offset=0, gamma=0.0, capacity=1, threads=None,
                                 device="cpu", model=str(tmp_path))
    check_args(args)
    check_device("cpu")
    check_model(None)
    check_model("tiny-random", ("tiny-random",))
    with pytest.raises(UsageError):
        check_model("tiny-random")      # a name only where the command knows it


def test_exact_tail_is_recompute_tail():
    from kvcomm_app import cli
    from kvcomm_app.cli_checks import UsageError, check_args

    args = cli.build_parser().parse_args(["eval", "--task", "gsm8k", "--exact-tail", "64"])
    check_args(args)
    assert args.recompute == "tail=64"
    args = cli.build_parser().parse_args(["eval", "--task", "gsm8k", "--exact-tail", "8", "--recompute", "segments"])
    check_args(args)
    assert args.recompute == "segments,tail=8"
    args = cli.build_parser().parse_args(["eval", "--task", "gsm8k", "--exact-tail", "0"])
    with pytest.raises(UsageError, match="--exact-tail must be at least 1"):
        check_args(args)


@pytest.mark.parametrize("argv,needle", [
    (["demo", "--pool-bytes", "lots"], "argument --pool-bytes: 'lots' is not a size in bytes"),
    (["demo", "--pool-bytes=-5M"], "a size in bytes must be >= 0"),
    (["eval", "--task", "gsm8k", "--anchor-storage", "int4"], "argument --anchor-storage: invalid choice: 'int4'"),
])
def test_bad_storage_options_are_argparse_errors(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2 and needle in capsys.readouterr().err


def test_storage_options_reach_the_pool_config():
    from kvcomm_app.cli_checks import parse_bytes

    assert [parse_bytes(t) for t in ("200000", "48M", "1.5G", "2GiB", "64k", "0")] == [
        200000, 48 << 20, 3 << 29, 2 << 30, 64 << 10, 0]
    args = cli.build_parser().parse_args(["eval", "--task", "gsm8k", "--anchor-storage", "int8",
                                          "--pool-bytes", "96M"])
    assert cli._config(args, "gsm8k", 3, "fully_connected").pool == {
        "min_anchors": 4, "storage": "int8", "byte_budget": 96 << 20}
    plain = cli.build_parser().parse_args(["eval", "--task", "gsm8k"])
    assert cli._config(plain, "gsm8k", 3, "fully_connected").pool == {"min_anchors": 4}


def test_recorded_commands_run_when_pasted():
    """Results record the command that made them; an argument with spaces (a
    --paired-variant of several settings) must stay one argument when pasted."""
    import shlex

    argv = ["eval", "--task", "gsm8k", "--paired-variant", "min_anchors=2 byte_budget=128M storage=int8"]
    args = cli.build_parser().parse_args(argv)
    args.argv = argv    # what main() records
    assert shlex.split(cli._provenance(args).command) == ["kvcomm", *argv]
