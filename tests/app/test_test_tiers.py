"""tests/conftest.py's `slow` marker: set on tests that start a process themselves or
through a helper of their file, load the real model or run the correctness gate's probe;
pure tests stay in the fast tier, and a plain run deselects nothing."""
from __future__ import annotations

import contextlib
import importlib.util
import sys
import textwrap

import conftest   # tests/conftest.py (pytest puts tests/ on sys.path)

SPAWN = "subprocess" + ".run"   # spelled apart: this file's own tests must not look slow

FAKE_TESTS = textwrap.dedent(f"""
    import subprocess

    def _run_scenario(name):
        return {SPAWN}(["true", name])

    def _via_two_helpers():
        return _run_scenario("x")

    def test_runs_the_gate_probe(engine, gate, config):
        gate.apply(engine, config)

    def _pure_helper(x):
        return x + 1

    def test_spawns_itself():
        {SPAWN}(["true"])

    def test_spawns_through_a_helper():
        assert _run_scenario("a")

    def test_spawns_two_helpers_down():
        assert _via_two_helpers()

    def test_loads_the_model():
        from kvcomm.models import load_model
        load_model()

    def test_pure():
        assert _pure_helper(1) == 2
""")


@contextlib.contextmanager
def _fake_module(tmp_path):
    path = tmp_path / "fake_tiers_module.py"
    path.write_text(FAKE_TESTS)
    spec = importlib.util.spec_from_file_location("fake_tiers_module", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod   # inspect.getmodule finds the helpers through it
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        del sys.modules[spec.name]


def test_what_a_test_does_decides_its_tier(tmp_path):
    with _fake_module(tmp_path) as mod:
        slow = {name: conftest._is_slow_code(getattr(mod, name)) for name in dir(mod) if name.startswith("test_")}
        assert slow == {"test_spawns_itself": True, "test_spawns_through_a_helper": True,
                        "test_spawns_two_helpers_down": True, "test_loads_the_model": True,
                        "test_runs_the_gate_probe": True, "test_pure": False}


def test_this_session_marks_the_known_slow_tests(request):
    """On the tests this session collected: a real-model fixture or a fresh process is slow,
    a pure test is not (checked only for the ones present, so any selection passes)."""
    marks = {item.nodeid.split("tests/", 1)[-1]: item.get_closest_marker("slow") is not None
             for item in request.session.items}
    expected = {"app/test_soak.py::test_soak_memory_bounded_reuse_steady": True,
                "app/test_cli.py::test_real_demo_one_question": True,
                "app/test_bench.py::test_prompts_hold_exact_token_counts[smollm2]": True,
                "app/test_bench.py::test_prompts_hold_exact_token_counts[tiny]": False,
                "app/test_test_tiers.py::test_this_session_marks_the_known_slow_tests": False}
    for nodeid, want in expected.items():
        if nodeid in marks:
            assert marks[nodeid] is want, nodeid



def test_a_plain_run_deselects_nothing(request):
    """The marker only labels: no default option deselects the slow tests, so a plain
    `pytest` (CI, the README) runs everything."""
    addopts = " ".join(request.config.getini("addopts"))
    assert "-m" not in addopts.split() and "slow" not in addopts
