#!/usr/bin/env python3
"""Per-kernel resource usage of a built kvcomm library, and a check that no
kernel spills registers to local memory.

    python3 .ci/resource_check.py LIB_OR_CUBIN --ptxas-log BUILD.LOG [--cuobjdump PATH]
    python3 .ci/resource_check.py --resources DUMP.txt --ptxas-log BUILD.LOG

Two sources, per kernel and architecture:
  - `cuobjdump --dump-resource-usage`: registers (REG), stack frame (STACK),
    local memory (LOCAL) and shared memory of every kernel in the binary;
  - ptxas -v, in the build log (the build sets NVCC_APPEND_FLAGS=-Xptxas=-v):
    the bytes of spill stores and loads, which only ptxas knows. A stack
    frame alone is not a spill: sincosf's slow path (far positions) keeps a
    small array there in every rotating offset kernel.
Prints the table (a column per architecture) and a summary line per
architecture, and fails (exit 1) if a kvcomm kernel spills, uses local
memory beyond its stack, or has no ptxas record for an architecture the
binary holds (the log would then not be this build's). Exit 2 on usage errors.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sass_check import demangle, dump, report  # noqa: E402  (beside this file)

CODES = {"(kvcomm::Codes)0": "plain", "(kvcomm::Codes)1": "int8", "(kvcomm::Codes)2": "fp8"}


class Usage:
    """One kernel on one arch; spills stay -1 until ptxas's record is found."""

    def __init__(self, reg: int, stack: int, local: int, shared: int):
        self.reg, self.stack, self.local, self.shared = reg, stack, local, shared
        self.spill_stores = self.spill_loads = -1

    def cell(self) -> str:
        spill = "?" if self.spill_stores < 0 else str(self.spill_stores + self.spill_loads)
        return f"{self.reg}r {self.stack}st {spill}sp {self.local}l"


def short(demangled: str) -> str:
    """'void kvcomm::cuda::offset_kernel<float, (kvcomm::Codes)1, true, true>(...)'
    -> 'offset_kernel<float, int8, true, true>'."""
    name = re.sub(r"^void ", "", demangled)
    depth, cut = 0, len(name)
    for i, ch in enumerate(name):  # the argument list starts at the first '(' outside <...>
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0:
            cut = i
            break
    name = name[:cut].replace("kvcomm::cuda::", "").replace("c10::", "")
    for code, word in CODES.items():
        name = name.replace(code, word)
    return name


def parse_resources(text: str) -> dict[tuple[str, str], Usage]:
    """(mangled kernel, arch) -> Usage from `cuobjdump --dump-resource-usage`."""
    out: dict[tuple[str, str], Usage] = {}
    arch = None
    name = None
    for line in text.splitlines():
        m = re.match(r"\s*arch = (sm_\w+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function (\S+):\s*$", line)
        if m:
            name = m.group(1)
            continue
        m = re.match(r"\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m and name:
            reg, stack, shared, local = (int(x) for x in m.groups())
            # A lone cubin's dump names no arch: "" matches ptxas's record of any.
            out[(name, arch or "")] = Usage(reg=reg, stack=stack, local=local, shared=shared)
            name = None
    return out


def parse_ptxas(text: str) -> dict[tuple[str, str], tuple[int, int, int]]:
    """(mangled kernel, arch) -> (registers, spill store bytes, spill load
    bytes) from ptxas -v output. The spills are every "spill" line of the
    kernel's block: its own, and any non-inlined device function's it calls."""
    out: dict[tuple[str, str], tuple[int, int, int]] = {}
    entry = arch = None
    stores = loads = 0
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\w+)'", line)
        if m:
            entry, arch = m.groups()
            stores = loads = 0
            continue
        if entry is None:
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            stores += int(m.group(1))
            loads += int(m.group(2))
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m:
            out[(entry, arch)] = (int(m.group(1)), stores, loads)
            entry = None
    return out


def check(resources: dict[tuple[str, str], Usage], ptxas: dict[tuple[str, str], tuple[int, int, int]]
          ) -> tuple[list[str], list[str]]:
    """(violations, table lines) for the kvcomm kernels."""
    names = demangle(sorted({n for n, _ in resources}))
    rows: dict[str, dict[str, Usage]] = defaultdict(dict)
    bad = []
    for (mangled, arch), use in resources.items():
        if "kvcomm" not in names[mangled]:
            continue
        kernel = short(names[mangled])
        if not arch:
            arch = next((a for n, a in ptxas if n == mangled), "")
        rec = ptxas.get((mangled, arch))
        if rec is None:
            bad.append(f"{kernel} ({arch}): no ptxas -v record in the build log")
        else:
            use.spill_stores, use.spill_loads = rec[1], rec[2]
            if rec[1] or rec[2]:
                bad.append(f"{kernel} ({arch}): spills {rec[1]} bytes stored, {rec[2]} loaded")
        if use.local > 0:
            bad.append(f"{kernel} ({arch}): {use.local} bytes of local memory")
        rows[kernel][arch] = use
    archs = sorted({a for r in rows.values() for a in r})
    width = max((len(k) for k in rows), default=10) + 2
    table = [f"{'kernel':<{width}}" + "".join(f"{a:<22}" for a in archs)]
    for kernel in sorted(rows):
        table.append(f"{kernel:<{width}}" + "".join(f"{rows[kernel][a].cell() if a in rows[kernel] else '-':<22}"
                                                   for a in archs))
    for a in archs:
        uses = [(r[a].reg, k) for k, r in rows.items() if a in r]
        if uses:
            reg, kernel = max(uses)
            spilling = sum(1 for r in rows.values() if a in r and r[a].spill_stores + r[a].spill_loads > 0)
            table.append(f"{a}: {len(uses)} kernels, at most {reg} registers ({kernel}), {spilling} spilling")
    return bad, table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("binary", nargs="?", help="the built _C*.so (or a .cubin)")
    ap.add_argument("--resources", help="a saved `cuobjdump --dump-resource-usage` output instead of BINARY")
    ap.add_argument("--ptxas-log", required=True, help="the build log with ptxas -v output")
    ap.add_argument("--cuobjdump", help="path of cuobjdump (default: PATH)")
    args = ap.parse_args(argv)
    if (args.binary is None) == (args.resources is None):
        ap.print_usage(sys.stderr)
        print("resource_check: give one of BINARY or --resources", file=sys.stderr)
        return 2
    text = (open(args.resources).read() if args.resources
            else dump(args.binary, args.cuobjdump, "--dump-resource-usage", "REG:"))
    with open(args.ptxas_log, errors="replace") as f:
        ptxas = parse_ptxas(f.read())
    bad, table = check(parse_resources(text), ptxas)
    print("resource_check: per kernel and arch: registers (r), stack frame bytes (st), spilled bytes (sp, "
          "stores + loads), local memory bytes (l)")
    print("\n".join(table))
    return report("resource_check", bad, "no kernel spills or uses local memory beyond its stack frame")


if __name__ == "__main__":
    sys.exit(main())
