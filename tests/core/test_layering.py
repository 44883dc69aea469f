"""The library (kvcomm) and the application (kvcomm_app) stay apart, and neither has an
import cycle.

kvcomm is what a user of torch.ops.kvcomm, kvcomm.hf.enable(model) or KVCommEngine
imports; kvcomm_app (agent runtime, benchmarks, CLI) is built on it and never the other
way round. Cycles are found statically: every import statement of every module (those
inside functions too, which is where a cycle usually hides) becomes an edge.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PYTHON = Path(__file__).resolve().parents[2] / "python"
PACKAGES = ("kvcomm", "kvcomm_app")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PYTHON).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((PYTHON / pkg).rglob("*.py"))}


def _is_module(name: str, modules: dict) -> bool:
    if name in modules:
        return True
    *pkg, last = name.split(".")   # an extension module such as kvcomm._C
    return any((PYTHON.joinpath(*pkg)).glob(f"{last}.*.so"))


def imports_of(name: str, path: Path, modules: dict) -> set[str]:
    """The project modules `name` imports anywhere in its source."""
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - (node.level - 1)]
                base_name = ".".join(base + ([node.module] if node.module else []))
            else:
                base_name = node.module
            # `from pkg import sub` imports the submodule when there is one, else pkg itself
            targets = [f"{base_name}.{a.name}" if _is_module(f"{base_name}.{a.name}", modules) else base_name
                       for a in node.names]
        else:
            continue
        out.update(t for t in targets if t.split(".")[0] in PACKAGES and t != name)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}   # 1 = on the current path, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_sees_the_packages_imports():
    graph = import_graph()
    assert "kvcomm.engine.engine" in graph["kvcomm.engine.gate"]      # the gate sits above the engine
    assert "kvcomm._C" in graph["kvcomm.engine.engine"]
    assert "kvcomm.plan.template" in graph["kvcomm_app.runtime.agents"]
    assert "kvcomm_app.runtime.session" in graph["kvcomm_app.bench.sweep"]   # an import inside a function


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_a_cycle_is_found():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_engine_does_not_import_the_gate():
    assert not {m for m in import_graph()["kvcomm.engine.engine"] if m.endswith(".gate")}


def test_the_library_never_imports_the_application_statically():
    graph = import_graph()
    offenders = {m: sorted(t for t in deps if t.startswith("kvcomm_app"))
                 for m, deps in graph.items() if m.startswith("kvcomm.") or m == "kvcomm"}
    assert not {m: d for m, d in offenders.items() if d}


@pytest.mark.parametrize("statement", [
    "import kvcomm",
    "import kvcomm.engine, kvcomm.engine.gate, kvcomm.hf, kvcomm.models, kvcomm.reference",
    "from kvcomm.engine import KVCommEngine",
])
def test_importing_the_library_loads_no_application_module(statement):
    code = f"{statement}\nimport sys\nprint(sorted(m for m in sys.modules if m.split('.')[0] == 'kvcomm_app'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
