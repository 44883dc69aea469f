"""The `kvcomm` command: argument handling and outputs with the scripted engine, and
one short real demo run on the embedded SmolLM2 (one measured question)."""
import json
import os
import subprocess
import sys
import time

import pytest

from kvcomm_app import cli
from kvcomm_app.runtime.testing import ScriptedEngine

TOP_LEVEL = {"model", "device", "questions", "reuse_rate", "accuracy", "answer_agreement",
             "judge_consistency", "agents"}
AGENT_FIELDS = {"name", "ttft_ms_dense", "ttft_ms_kvcomm", "speedup", "reuse_rate"}


def scripted(cfg):
    return ScriptedEngine(warm_after=2), "scripted", "cpu (scripted)", 0.0


def test_demo_writes_json_plot_and_records(tmp_path, capsys):
    out, png, rec = tmp_path / "out.json", tmp_path / "ttft.png", tmp_path / "calls.jsonl"
    args = cli.build_parser().parse_args(
        ["demo", "--questions", "2", "--warmup", "2", "--no-progress", "--json", str(out),
         "--plot", str(png), "--records", str(rec)])
    assert cli.cmd_demo(args, engine_factory=scripted) == 0
    text = capsys.readouterr().out
    for word in ("expert", "reasoner", "critic", "decision", "reuse rate",
                 "accuracy", "answer agreement", "judge consistency", "speedup"):
        assert word in text
    doc = json.loads(out.read_text())
    assert TOP_LEVEL <= set(doc)
    assert doc["questions"] == 2 and doc["model"] == "scripted" and doc["device"] == "cpu"
    assert set(doc["accuracy"]) == {"dense", "kvcomm"}
    # the demo runs MMLU (a task the embedded model does) with 3 workers and a decision agent
    assert doc["task"] == "mmlu" and doc["config"]["warmup_rule"] == "cover"
    assert [a["name"] for a in doc["agents"]] == ["expert", "reasoner", "critic", "decision"]
    for a in doc["agents"]:
        assert AGENT_FIELDS <= set(a)
        # timed on the paired replays; the headline is against dense with the exact S0 cached
        assert a["timed"] == "paired" and a["baseline"] == "prefix"
        assert a["ttft_ms_dense"] > a["ttft_ms_prefix"] > 0
        assert a["speedup"] == pytest.approx(a["ttft_ms_prefix"] / a["ttft_ms_kvcomm"])
        assert a["speedup_vs_dense"] == pytest.approx(a["ttft_ms_dense"] / a["ttft_ms_kvcomm"])
    assert doc["reuse_rate"] == 1.0 and doc["warmup"]["questions"] == 2
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = rec.read_text().splitlines()
    assert len(lines) == 3 * (2 + 2)          # (warm-up + measured) x (dense, its paired replay, kvcomm)
    assert {json.loads(l)["mode"] for l in lines} == {"dense", "paired", "kvcomm"}
    # The demo's paired replay: every call of the dense run, on a second engine, compared.
    paired = [c for l in lines if json.loads(l)["mode"] == "paired" for c in json.loads(l)["calls"]]
    dense = [c for l in lines if json.loads(l)["mode"] == "dense" for c in json.loads(l)["calls"]]
    assert [(c["agent_id"], c["inputs_digest"]) for c in paired] == [(c["agent_id"], c["inputs_digest"]) for c in dense]
    assert all(c["fidelity"]["tf_positions"] >= 1 for c in paired)
    assert "Paired calls (teacher-forced" in text and "first-token agreement" in text
    fid = doc["fidelity"]
    assert fid["calls"] == sum(1 for c in paired if c["path"] == "reuse" and c["phase"] == "measure")
    assert fid["first_token_agreement"]["n"] == fid["calls"] and len(fid["first_token_agreement"]["ci95"]) == 2
    calls = [c for l in lines for c in json.loads(l)["calls"] if json.loads(l)["mode"] != "paired"]
    # each call's slot decisions arrive in the records with the numbers behind them
    assert all(set(c["slot_gates"]) == set(c["slot_decisions"]) for c in calls if c["call_mode"] == "kvcomm")
    assert any(g["candidates"] == 2 for c in calls for g in c["slot_gates"].values())


def test_the_demo_plot_title_fits_in_the_image():
    """The demo's title (command, task, graph and model: ~100 characters) is wrapped to the
    figure's width: every line of it lies inside the saved image."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kvcomm_app.runtime import report

    title = ("kvcomm demo (MMLU, fully connected 3 agents + decision): TTFT per agent "
             "(SmolLM2-135M-Instruct (embedded))")
    for width in (5.0, 8.5):
        fig, ax = plt.subplots(figsize=(width, 4.0))
        ax.bar([0, 1], [1.0, 2.0])
        text = report.fit_title(fig, ax, title)
        fig.tight_layout()
        fig.canvas.draw()
        box, frame = text.get_window_extent(), fig.bbox
        assert "\n" in text.get_text() and text.get_text().replace("\n", " ") == title
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and box.y1 <= frame.y1, (width, box, frame)
        plt.close(fig)


def test_eval_runs_other_tasks_and_topologies(tmp_path, capsys):
    out = tmp_path / "eval.json"
    args = cli.build_parser().parse_args(
        ["eval", "--task", "mmlu", "--agents", "3", "--topology", "debate", "--rounds", "2",
         "--questions", "2", "--warmup", "1", "--no-progress", "--json", str(out)])
    assert cli.cmd_eval(args, engine_factory=scripted) == 0
    doc = json.loads(out.read_text())
    assert doc["task"] == "mmlu" and doc["topology"] == "debate"
    assert [a["name"] for a in doc["agents"]] == ["expert", "reasoner", "critic", "decision"]


def test_bare_commands_print_usage(capsys):
    assert cli.main(["bench"]) == 2
    assert "kvcomm bench ttft" in capsys.readouterr().err
    assert cli.main([]) == 2


def test_bad_arguments_are_rejected(capsys):
    with pytest.raises(SystemExit):
        cli.main(["eval", "--task", "trivia"])
    assert cli.main(["demo", "--questions", "0"]) == 2
    assert cli.main(["demo", "--min-anchors", "1"]) == 2
    assert "--min-anchors must be at least 2" in capsys.readouterr().err
    assert cli.main(["demo", "--recompute", "segmentz"]) == 2
    assert "--recompute" in capsys.readouterr().err
    assert cli.main(["eval", "--task", "gsm8k", "--paired-only", "--no-paired"]) == 2
    assert "--paired-only needs --paired" in capsys.readouterr().err


def _engine_available() -> bool:
    try:
        import kvcomm.engine  # noqa: F401
        import kvcomm.models
        kvcomm.models.embedded_gguf_path()
        return True
    except Exception:
        return False


@pytest.mark.skipif(not _engine_available(), reason="kvcomm.engine or the embedded model is not installed")
def test_real_demo_one_question(tmp_path):
    """The main job for real, kept small for CI: 2 warm-up questions fill the pool (slots share
    from 2 anchors here, not the default 4, to keep it short), then one measured question;
    replies capped at 12 tokens."""
    out = tmp_path / "demo.json"
    script = os.path.join(os.path.dirname(sys.executable), "kvcomm")   # the console script users run
    launcher = [script] if os.path.exists(script) else [
        sys.executable, "-c", "import sys; from kvcomm_app.cli import main; sys.exit(main())"]
    cmd = launcher + ["demo", "--questions", "1", "--warmup", "2", "--min-anchors", "2", "--max-new-tokens", "12",
                      "--no-progress",
           "--json", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TQDM_DISABLE": "1"})
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert TOP_LEVEL <= set(doc) and doc["questions"] == 1
    assert "SmolLM2" in doc["model"]
    assert len(doc["agents"]) == 4 and doc["task"] == "mmlu"
    assert doc["reuse_rate"] is not None and doc["reuse_rate"] > 0, doc
    for a in doc["agents"]:
        assert a["ttft_ms_dense"] > 0 and a["ttft_ms_kvcomm"] > 0
    assert "judge consistency" in proc.stdout
    print(f"real demo (1 question): {elapsed:.1f} s\n{proc.stdout}")


def test_reuse_options_reach_the_engine(tiny, monkeypatch):
    """--recompute, --min-anchors and --no-partial go through ExperimentConfig into the engine
    load_engine builds."""
    import kvcomm.models
    from kvcomm_app.runtime import session

    monkeypatch.setattr(kvcomm.models, "load_model", lambda *a, **k: tiny("llama"))
    args = cli.build_parser().parse_args(["demo", "--recompute", "tail=7", "--min-anchors", "5",
                                          "--no-partial", "--no-gate"])
    cfg = cli._config(args, "gsm8k", 4, "fully_connected")
    assert (cfg.recompute, cfg.pool["min_anchors"], cfg.partial) == ("tail=7", 5, False)
    engine, *_ = session.load_engine(cfg)
    assert engine.exact_tail == 7 and engine.pool.config.min_anchors == 5 and not engine.partial
