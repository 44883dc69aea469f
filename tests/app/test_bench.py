"""Benchmarks: the TTFT setting's token arithmetic, forced replies, the static last-token
step, `kvcomm bench ttft` end to end on a tiny random model (JSON schema, PNG, scaling
runs), and the `kvcomm eval --sweep` grid with a scripted engine."""
import json
import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kvcomm
from kvcomm_app import cli
from kvcomm_app.bench import sweep, ttft
from kvcomm_app.bench.setting import SettingBuilder, TTFTSetting, template_for
from kvcomm_app.bench.texts import TextMaker
from kvcomm.engine import KVCommEngine
from kvcomm_app.runtime.testing import ScriptedEngine
from sweep_args import sweep_args

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from a second thread, and on a shared 2-core machine a
    busy core makes a 2-thread forward wait ~100x longer (OpenMP)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

TINY = TTFTSetting(agents=3, prefix=48, input=24, output=12)


# ---------------------------------------------------------------- the setting

def test_paper_setting_token_arithmetic():
    s = TTFTSetting()
    assert (s.agents, s.prefix, s.input, s.output) == (5, 512, 1024, 512)
    assert [s.nominal_tokens(i) for i in range(1, 6)] == [1536, 2048, 2560, 3072, 3584]
    with pytest.raises(ValueError):
        s.nominal_tokens(6)
    with pytest.raises(ValueError):
        TTFTSetting(agents=0)


def test_templates_read_every_earlier_agent():
    t = template_for(4)
    assert "{user_question}" in t
    assert all("{agent_a%d_current}" % j in t for j in (1, 2, 3))
    assert "{agent_a4_current}" not in t


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_prompts_hold_exact_token_counts(which, tiny, request):
    tok = tiny()[1] if which == "tiny" else request.getfixturevalue("smollm2")[1]
    setting = TTFTSetting(agents=4, prefix=96, input=64, output=32)
    b = SettingBuilder(tok, setting)
    rows = b.check(b.request(0))
    assert [r["agent"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        i = r["agent"]
        assert r["prefix_tokens"] == 96
        assert r["slot_tokens"] == [64] + [32] * (i - 1)
        assert r["nominal_tokens"] == setting.nominal_tokens(i)
        assert r["tokens"] == r["nominal_tokens"] + r["overhead_tokens"] and r["overhead_tokens"] > 0
    # each extra slot adds its content plus the same separator
    steps = {rows[k + 1]["tokens"] - rows[k]["tokens"] for k in range(len(rows) - 1)}
    assert len(steps) == 1 and steps.pop() > 32
    # other requests: fresh texts, same lengths
    r1, r2 = b.request(1), b.request(2)
    assert r1.question != r2.question and r1.replies[0] != r2.replies[0]
    assert [r["tokens"] for r in b.check(r1)] == [r["tokens"] for r in rows]
    assert b.request(1).question == r1.question            # deterministic per index
    assert SettingBuilder(tok, setting, seed=1).request(1).question != r1.question


def test_prefix_shorter_than_the_chat_header_is_refused(tiny):
    with pytest.raises(ValueError, match="prefix"):
        SettingBuilder(tiny()[1], TTFTSetting(agents=2, prefix=3, input=8, output=8))


def test_text_maker_exact_lengths_round_trip(tiny):
    tok = tiny()[1]
    maker = TextMaker(tok)
    rng = random.Random(0)
    for n in (1, 7, 50):
        text, ids = maker.make(n, rng)
        assert len(ids) == n and tok.decode(ids) == text
        assert list(tok(text, add_special_tokens=False)["input_ids"]) == ids
    with pytest.raises(ValueError):
        maker.make(0, rng)


# ---------------------------------------------------------------- engine support

def _engine(model, tok, builder, gamma=1.0):
    s = kvcomm.hf.inspect_model(model)
    eng = KVCommEngine(model, tok, pool_config=kvcomm.PoolConfig(
        gamma=gamma, layers=s.num_layers, kv_heads=s.kv_heads, head_dim=s.head_dim))
    for a in builder.agents:
        eng.add_agent(a.name, a.system_prompt, a.template)
    return eng


def _run(eng, builder, requests):
    out = []
    for r in range(requests):
        texts = builder.request(r)
        eng.new_request()
        for a in builder.agents:
            c = eng.call(a.name, texts.inputs_for(a.index), reply_ids=texts.reply_ids[a.index - 1],
                         return_first_logits=True)
            out.append(c)
    return out


def test_forced_replies_are_captured_in_kvcomm_mode_only(tiny):
    model, tok = tiny()
    b = SettingBuilder(tok, TINY)
    eng = _engine(model, tok, b)
    texts = b.request(0)
    eng.new_request()
    d = eng.call("a1", texts.inputs_for(1), mode="dense", reply_ids=texts.reply_ids[0])
    assert d.token_ids == texts.reply_ids[0] and d.text == texts.replies[0]
    assert "a1" not in eng.request.current                   # dense captures nothing
    k = eng.call("a1", texts.inputs_for(1), reply_ids=texts.reply_ids[0])
    assert k.new_tokens == TINY.output
    assert list(eng.request.current["a1"].ids) == texts.reply_ids[0]
    with pytest.raises(ValueError):
        eng.call("a1", texts.inputs_for(1), reply_ids=[])


def test_static_step_matches_the_eager_last_token_forward(tiny):
    """The static-buffer step (CPU: no capture) gives the eager path's logits on every
    reuse-path call; the CUDA graph replays this same computation."""
    model, tok = tiny()
    b = SettingBuilder(tok, TINY)
    eager = _run(_engine(model, tok, b), b, 4)
    eng = _engine(model, tok, b)
    step = eng.use_static_step(256, bucket=64, capture=False)
    static = _run(eng, b, 4)
    reused = [(x, y) for x, y in zip(eager, static) if x.path == "reuse"]
    assert len(reused) == 2 * TINY.agents and all(y.path == "reuse" for _, y in reused)
    for x, y in reused:
        torch.testing.assert_close(y.first_logits, x.first_logits, rtol=1e-4, atol=1e-4)
        assert x.first_token_id == y.first_token_id
    assert step.replays == len(reused)
    # dense calls never touch the step; a too-small step falls back to the ordinary path
    small = _engine(model, tok, b)
    tiny_step = small.use_static_step(8, bucket=4, capture=False)
    _run(small, b, 3)
    assert tiny_step.replays == 0


def test_static_step_windows_and_errors(tiny):
    from kvcomm.engine.static_step import StaticOneTokenStep
    model, _ = tiny()
    spec = kvcomm.hf.inspect_model(model)
    step = StaticOneTokenStep(model, spec, 1000, bucket=256, capture=False)
    assert [step.window_for(p) for p in (0, 255, 256, 999)] == [256, 256, 512, 1000]
    step.prepare()
    assert sorted(step._windows) == [256, 512, 768, 1000]
    assert step.fits(1000) and not step.fits(1001)
    with pytest.raises(ValueError, match="CUDA"):
        StaticOneTokenStep(model, spec, 64, capture=True)
    with pytest.raises(ValueError):
        step(object(), 1, 0)


class _HostSyncs(TorchDispatchMode):
    """Records the aten ops that read a device value back to the host: under CUDA graph
    capture each is an error (or a silent constant baked into the graph)."""

    SYNCING = ("aten._local_scalar_dense", "aten.is_nonzero", "aten.item", "aten.nonzero",
               "aten.masked_select", "aten.equal", "aten.allclose", "aten.unique", "aten._unique",
               "aten.repeat_interleave.Tensor", "aten.bincount", "aten.histc")

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith(self.SYNCING):
            self.found.append(name)
        if name.startswith("aten.index.Tensor") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or [])):
            self.found.append(name + " (boolean mask: nonzero)")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "qwen3"])
def test_static_step_forward_reads_nothing_back_to_the_host(tiny, arch):
    """What the CUDA graph captures is StaticOneTokenStep._forward; a host sync in it
    (an .item(), a tensor in an `if`, a boolean-mask index) fails the capture on a GPU.
    On the CPU no sync happens, so the ops are checked by name as they are dispatched."""
    from kvcomm.engine.static_step import StaticOneTokenStep

    model, _ = tiny(arch)
    step = StaticOneTokenStep(model, kvcomm.hf.inspect_model(model), 64, bucket=32, capture=False)
    window_cache = step._window(32)[0]
    step.pos.fill_(7)
    with torch.inference_mode():
        with _HostSyncs() as probe:          # the probe itself catches a sync
            bool(torch.tensor(1) > 0)
        assert probe.found
        with _HostSyncs() as probe:
            logits = step._forward(window_cache)
    assert probe.found == [] and logits.shape == (model.config.vocab_size,)


# ---------------------------------------------------------------- kvcomm bench ttft

TOP_LEVEL = {"setting", "device", "git_sha", "git_dirty", "command", "agents", "reuse_rate", "model", "dtype",
             "requests", "warmup", "one_token_step", "paper", "samples"}
AGENT_FIELDS = {"agent", "tokens", "nominal_tokens", "dense_ms", "kvcomm_ms", "speedup", "reuse_rate"}
TINY_ARGS = ["bench", "ttft", "--model", "tiny-random", "--agents", "3", "--prefix", "48", "--input", "24",
             "--output", "12", "--gamma", "1.0", "--min-anchors", "2", "--no-progress", "--threads", "1"]


def test_bench_ttft_end_to_end_json_and_png(tmp_path, capsys):
    out = tmp_path / "ttft.json"
    assert cli.main(TINY_ARGS + ["--requests", "2", "--warmup", "2", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| agent |" in text and "reuse rate" in text
    doc = json.loads(out.read_text())
    assert TOP_LEVEL <= set(doc)
    assert doc["device"] == "cpu" and doc["setting"]["agents"] == 3 and doc["setting"]["prefix"] == 48
    assert doc["command"].startswith("kvcomm bench ttft") and "--agents 3" in doc["command"]
    assert [a["agent"] for a in doc["agents"]] == [1, 2, 3]
    setting = TTFTSetting(3, 48, 24, 12)
    for a in doc["agents"]:
        assert AGENT_FIELDS <= set(a)
        assert a["nominal_tokens"] == setting.nominal_tokens(a["agent"]) and a["tokens"] > a["nominal_tokens"]
        assert a["dense_ms"] > 0 and a["kvcomm_ms"] > 0 and a["prefix_ms"] > 0
        # the headline baseline is dense prefill with the agent's exact S0 cached
        assert a["baseline"] == "prefix" and a["speedup"] == pytest.approx(a["prefix_ms"] / a["kvcomm_ms"])
        assert a["speedup_vs_dense"] == pytest.approx(a["dense_ms"] / a["kvcomm_ms"])
        assert len(a["dense_ms_all"]) == len(a["prefix_ms_all"]) == len(a["kvcomm_ms_all"]) == 2
    # a reply's capture is charged to its first reader (agent i+1 reads agent i's reply first)
    kv = {(s["request"], s["agent"]): s for s in doc["samples"] if s["mode"] == "kvcomm" and s["phase"] == "measure"}
    a2 = doc["agents"][1]
    want = sorted(kv[(r, 2)]["ttft_ms"] + kv[(r, 1)]["timings"]["capture"] for r in (2, 3))
    assert sorted(a2["kvcomm_ms_all"]) == pytest.approx(want, abs=1e-3)
    assert all(kv[(r, 1)]["timings"]["capture"] > 0 for r in (2, 3))
    prefix = [s for s in doc["samples"] if s["mode"] == "prefix"]
    assert prefix and all(s["path"] == "dense" and "prefix caching only" in s["reason"] for s in prefix)
    # warm-up fills the pools (2 anchors per slot); with gamma 1 every later slot shares
    assert doc["warmup_reuse_rate"] == 0.0 and doc["reuse_rate"] == 1.0
    assert doc["replies_captured"] == 1.0
    # (dense, prefix, kvcomm) x agents per measured request and the first warm-up one; kvcomm alone after
    assert len(doc["samples"]) == (2 + 1) * 3 * 3 + 1 * 3
    tokens = {a["agent"]: a["tokens"] for a in doc["agents"]}
    assert all(s["prompt_tokens"] == tokens[s["agent"]] for s in doc["samples"])
    assert out.with_suffix(".png").read_bytes()[:8] == PNG


def test_bench_ttft_share_always_takes_the_reuse_path_after_warm_up(tmp_path, capsys):
    out = tmp_path / "always.json"
    args = [a for a in TINY_ARGS if a not in ("--gamma", "1.0")]
    assert cli.main(args + ["--share", "always", "--requests", "2", "--warmup", "2", "--json", str(out)]) == 0
    assert "share: always" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["share"] == "always" and doc["pool"]["gamma"] == ttft.ALWAYS_SHARE_GAMMA
    assert doc["warmup_reuse_rate"] == 0.0 and doc["reuse_rate"] == 1.0
    # the decision still ran (and was timed) on every reuse-path call
    reused = [s for s in doc["samples"] if s["mode"] == "kvcomm" and s["phase"] == "measure"]
    assert reused and all(s["path"] == "reuse" and "decide" in s["timings"] for s in reused)


def test_default_result_paths_keep_runs_apart():
    assert ttft.result_stem("h200") == "results/ttft/ttft-h200"
    assert ttft.result_stem("h200", share="always") == "results/ttft/ttft-h200-share-always"
    assert ttft.result_stem("h200", share="always", step="eager", scaling="agents") == \
        "results/ttft/ttft-h200-share-always-step-eager-scaling-agents"
    assert ttft.result_stem("h200", share="always", storage="int8") == "results/ttft/ttft-h200-share-always-anchors-int8"


def test_share_policy_sets_the_pool_gamma():
    assert ttft.pool_gamma("entropy", None) is None and ttft.pool_gamma("entropy", 0.5) == 0.5
    assert ttft.pool_gamma("always", None) >= 1.0      # H <= log2 N always holds from gamma 1
    with pytest.raises(ValueError, match="gamma"):
        ttft.pool_gamma("always", 0.3)
    with pytest.raises(ValueError, match="share"):
        ttft.pool_gamma("sometimes", None)


def test_bench_ttft_scaling_agents_and_prefix(tmp_path):
    a_json, p_json = tmp_path / "agents.json", tmp_path / "prefix.json"
    common = TINY_ARGS + ["--requests", "1", "--warmup", "2"]
    assert cli.main(common + ["--scaling", "agents", "--values", "2,3", "--json", str(a_json)]) == 0
    doc = json.loads(a_json.read_text())
    assert doc["scaling"] == "agents" and [r["agents"] for r in doc["rows"]] == [2, 3]
    assert doc["setting"]["agents"] == 3
    run_agents = doc["runs"][0]["agents"]
    assert len(doc["runs"]) == 1 and len(run_agents) == 3           # one run of the largest count
    for row in doc["rows"]:
        assert row["last_agent_tokens"] == run_agents[row["agents"] - 1]["tokens"]
    assert (tmp_path / "agents.png").read_bytes()[:8] == PNG

    assert cli.main(common + ["--agents", "2", "--scaling", "prefix", "--values", "56,48",
                              "--json", str(p_json)]) == 0
    doc = json.loads(p_json.read_text())
    assert [r["prefix"] for r in doc["rows"]] == [48, 56] and len(doc["runs"]) == 2
    assert doc["rows"][1]["last_agent_tokens"] - doc["rows"][0]["last_agent_tokens"] == 8


def test_bench_rejects_bad_arguments(capsys):
    assert cli.main(["bench"]) == 2
    assert "bench ttft" in capsys.readouterr().err
    assert cli.main(TINY_ARGS + ["--requests", "0"]) == 2
    assert cli.main(TINY_ARGS + ["--prefix", "2", "--no-write"]) == 2
    assert "prefix" in capsys.readouterr().err
    assert cli.main(TINY_ARGS + ["--scaling", "agents", "--values", "0,2", "--no-write"]) == 2
    assert cli.main(TINY_ARGS + ["--share", "always", "--no-write"]) == 2    # conflicts with --gamma
    assert "gamma" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(TINY_ARGS + ["--step", "fastest"])


# ---------------------------------------------------------------- kvcomm eval --sweep

def test_sweep_grid():
    points = sweep.grid()
    assert len(points) == 15 and len(set(points)) == 15
    assert points[0] == (0.0, 5) and points[-1] == (0.9, 20)
    assert {g for g, _ in points} == {0.0, 0.1, 0.3, 0.5, 0.9} and {c for _, c in points} == {5, 10, 20}
    assert sweep.grid([0.3, 0.3], [20]) == [(0.3, 20)]
    with pytest.raises(ValueError):
        sweep.grid([0.3], [0])
    assert sweep.parse_list("0, 0.5", float) == [0.0, 0.5]
    with pytest.raises(ValueError):
        sweep.parse_list("a,b", int)


def test_eval_sweep_runs_dense_once_and_every_point(tmp_path, capsys):
    made = []

    def factory(pool):
        # the scripted engine's cold start stands in for the pool: larger capacity, later reuse
        eng = ScriptedEngine(warm_after=1 if pool["capacity"] >= 10 else 3)
        made.append((pool["gamma"], pool["capacity"], eng))
        return eng

    out = tmp_path / "sweep.json"
    args = sweep_args(out, "0,0.5", "5,10")
    assert cli.cmd_eval(args, sweep_factory=factory) == 0
    assert "| gamma | capacity |" in capsys.readouterr().out
    assert [(g, c) for g, c, _ in made] == [(0.0, 5), (0.0, 10), (0.5, 5), (0.5, 10)]
    dense_calls = [sum(1 for e in eng.log if e["mode"] == "dense") for _, _, eng in made]
    assert dense_calls[0] == (1 + 2) * 4 and dense_calls[1:] == [0, 0, 0]     # dense once
    doc = json.loads(out.read_text())
    assert [(r["gamma"], r["capacity"]) for r in doc["grid"]] == [(0.0, 5), (0.0, 10), (0.5, 5), (0.5, 10)]
    rates = {(r["gamma"], r["capacity"]): r["reuse_rate"] for r in doc["grid"]}
    # fresh engines count requests from 1: warm-up = 1, measured = 2 and 3
    assert rates[(0.5, 10)] == 1.0 and rates[(0.5, 5)] == 0.0
    assert all(r["answer_agreement"] is not None for r in doc["grid"])
    assert doc["sweep"]["dense_runs"] == 1 and doc["task"] == "gsm8k" and doc["command"] == "kvcomm eval --sweep"
    assert doc["sweep"]["complete"] is True and doc["sweep"]["points_done"] == 4
    assert cli.main(["eval", "--task", "gsm8k", "--sweep", "--gamma", "0.3"]) == 2


def test_eval_sweep_cut_off_keeps_the_points_it_finished(tmp_path):
    made = []

    def factory(pool):
        if len(made) == 2:      # the third grid point never starts (a run cut off, a crash)
            raise RuntimeError("cut off")
        made.append(pool)
        return ScriptedEngine(warm_after=1)

    out = tmp_path / "sweep.json"
    args = sweep_args(out, "0.3,0.9", "5,20")
    with pytest.raises(RuntimeError, match="cut off"):
        cli.cmd_eval(args, sweep_factory=factory)
    doc = json.loads(out.read_text())
    assert doc["sweep"]["complete"] is False and doc["sweep"]["points"] == 4
    assert doc["sweep"]["points_done"] == 2
    assert [(r["gamma"], r["capacity"]) for r in doc["grid"]] == [(0.3, 5), (0.3, 20)]
    assert doc["default_point"]["capacity"] == 20 and doc["dense"]["accuracy"] is not None
    assert doc["command"] == "kvcomm eval --sweep" and {"git_sha", "git_dirty"} <= set(doc)
