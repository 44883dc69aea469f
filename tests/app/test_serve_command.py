"""`kvcomm serve` as an operator meets it, without starting vLLM: what it chooses (dtype,
served model name, KV cache size, the planner's defaults) and what it refuses before the
server starts (a pool file that cannot be used, a recompute policy vLLM cannot express)."""
import json

import pytest
import torch

import kvcomm
from kvcomm.vllm import launch
from kvcomm_app.cli import build_parser
from kvcomm_app.serve import serve_command

GIB = 1 << 30


def command(*argv, cuda=False):
    args = build_parser().parse_args(["serve", *argv])
    return serve_command(args, cuda=cuda)


def extra_config(argv) -> dict:
    return json.loads(argv[argv.index("--kv-transfer-config") + 1])["kv_connector_extra_config"]


def test_defaults_name_the_model_size_the_cache_and_use_the_planners_defaults(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)   # an operator's own setting wins (below)
    argv, notes = command()
    assert argv[argv.index("--dtype") + 1] == "float32"            # no CUDA: the embedded model's dtype
    assert argv[argv.index("--served-model-name") + 1] == "SmolLM2-135M-Instruct"
    kv = int(argv[argv.index("--kv-cache-memory-bytes") + 1])
    total, _ = launch.memory_info()
    assert GIB <= kv <= total // 4
    assert any("sized from this machine" in n for n in notes)
    extra = extra_config(argv)
    assert extra["plan"] == {"partial": True} and "pool" not in extra   # the worker's defaults apply
    assert command(cuda=True)[0][argv.index("--dtype") + 1] == "auto"
    assert "--kv-cache-memory-bytes" not in command(cuda=True)[0]     # vLLM sizes GPU memory itself


def test_an_operators_vllm_setting_is_left_alone(monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")
    argv, notes = command()
    assert "--kv-cache-memory-bytes" not in argv and any("vLLM's own setting" in n for n in notes)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE")
    argv, notes = command("--", "--kv-cache-memory-bytes", str(3 * GIB))
    assert argv.count("--kv-cache-memory-bytes") == 1 and argv[argv.index("--kv-cache-memory-bytes") + 1] == str(3 * GIB)


@pytest.mark.parametrize("line", [
    ["--port", "8100", "--print-command", "--", "--max-num-seqs", "4"],
    ["{model}", "--port", "8100", "--print-command", "--", "--max-num-seqs", "4"],
    ["--port", "8100", "{model}", "--print-command", "--", "--max-num-seqs", "4"],
])
def test_vllm_arguments_after_the_double_dash_wherever_the_model_is(line, capsys, monkeypatch):
    import shlex
    from kvcomm.models import embedded_model_dir
    from kvcomm_app import cli
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    assert cli.main(["serve", *(a.format(model=embedded_model_dir()) for a in line)]) == 0
    argv = shlex.split(capsys.readouterr().out.strip().splitlines()[-1])
    assert argv[argv.index("--max-num-seqs") + 1] == "4" and argv[argv.index("--port") + 1] == "8100"
    assert embedded_model_dir() in argv


def test_flags_reach_the_connector():
    argv, notes = command("--kv-cache-gib", "2", "--min-anchors", "3", "--recompute", "tail=4", "--no-partial",
                          "--served-model-name", "smol")
    assert int(argv[argv.index("--kv-cache-memory-bytes") + 1]) == 2 * GIB
    extra = extra_config(argv)
    assert extra["plan"] == {"partial": False, "recompute": "tail=4"} and extra["pool"] == {"min_anchors": 3}
    assert argv[argv.index("--served-model-name") + 1] == "smol"


def test_head_sharing_reaches_the_connector_and_is_checked():
    argv, _ = command("--head-share", "0")
    assert extra_config(argv)["plan"] == {"partial": True, "head_share": 0.0}
    assert "head_share" not in extra_config(command()[0])["plan"]   # the planner's default
    with pytest.raises(SystemExit, match="--head-share must be a fraction"):
        command("--head-share", "1.5")


def test_the_estimate_limit_reaches_the_connector_and_is_checked():
    from kvcomm.vllm.settings import plan_settings
    argv, _ = command("--estimate-anchors", "0")
    assert extra_config(argv)["plan"] == {"partial": True, "estimate_anchors": 0}
    assert plan_settings(extra_config(argv)).estimate_anchors == 0
    assert plan_settings(extra_config(command()[0])).estimate_anchors == 8   # the planner's default
    with pytest.raises(SystemExit, match="--estimate-anchors must be at least 0"):
        command("--estimate-anchors", "-2")
    with pytest.raises(ValueError, match="estimate_anchors must be an int"):
        plan_settings({"plan": {"estimate_anchors": "all"}})


def test_a_recompute_policy_vllm_cannot_express_is_refused():
    with pytest.raises(SystemExit, match="prefix of the prompt only"):
        command("--recompute", "segments")


def test_pool_files_that_cannot_be_used_are_refused_before_the_server_starts(tmp_path):
    missing = str(tmp_path / "pool.bin")
    with pytest.raises(SystemExit, match="does not exist"):
        command("--pool-file", missing)
    argv, _ = command("--pool-file", missing, "--pool-new")
    assert extra_config(argv)["pool_new"] is True and extra_config(argv)["pool_file"] == missing
    corrupt = tmp_path / "corrupt.bin"
    corrupt.write_bytes(b"not a pool at all")
    with pytest.raises(SystemExit, match="not a kvcomm anchor-pool file"):
        command("--pool-file", str(corrupt))
    other = kvcomm.AnchorPool(kvcomm.PoolConfig())
    other.add_anchor("q", torch.zeros(4, 2, 3, 16), torch.zeros(4, 2, 3, 16))   # another model's layout
    other.save(str(tmp_path / "other.bin"))
    with pytest.raises(SystemExit, match=r"holds anchors of \[layers=4, kv_heads=2, head_dim=16\] but the model "
                                         r"has \[layers=30, kv_heads=3, head_dim=64\]"):
        command("--pool-file", str(tmp_path / "other.bin"))
    ok = kvcomm.AnchorPool(kvcomm.PoolConfig())
    ok.add_anchor("q", torch.zeros(30, 3, 3, 64), torch.zeros(30, 3, 3, 64))
    ok.save(str(tmp_path / "ok.bin"))
    assert extra_config(command("--pool-file", str(tmp_path / "ok.bin"))[0])["pool_file"].endswith("ok.bin")


def test_the_kv_cache_default_leaves_room_for_the_rest():
    total, model = 24 * GIB, GIB // 2
    assert launch.default_kv_cache_bytes(total, 20 * GIB, model) == 6 * GIB          # a quarter of the machine
    assert launch.default_kv_cache_bytes(total, 5 * GIB, model) == 2 * GIB           # what is left after the rest
    assert launch.default_kv_cache_bytes(total, 2 * GIB, model) == GIB               # never below 1 GiB
    assert launch.default_kv_cache_bytes(total, 20 * GIB, model, pool_bytes=16 * GIB) == GIB


def test_chat_flags_reach_the_front_end(monkeypatch):
    from kvcomm.vllm.chat_front import CHAT_ARGS, ChatFront
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    assert CHAT_ARGS not in extra_config(command()[0])                 # the front end's defaults
    front = ChatFront(None, (), None)
    assert front.enabled and front.encode_ahead and front.min_tokens == 1
    chat = extra_config(command("--no-chat-encode-ahead", "--chat-min-tokens", "8", "--tenant-header", "X-Team",
                                "--chat-tail", "16")[0])
    front = ChatFront(None, (), chat[CHAT_ARGS])
    assert not front.encode_ahead and front.min_tokens == 8 and front.tenant_header == b"x-team"
    assert front.tail == 16
    with pytest.raises(SystemExit, match="--chat-tail must be at least 1"):
        command("--chat-tail", "0")
    assert not ChatFront(None, (), extra_config(command("--no-chat")[0])[CHAT_ARGS]).enabled
    with pytest.raises(ValueError, match="unknown chat setting"):
        ChatFront(None, (), {"encode_later": False})
