#!/usr/bin/env python3
"""Checks the machine code (SASS) of the vector kernels in a built kvcomm
library: every KV access of a vector kernel must be one 128-bit global
instruction, as the kernels are written to do.

    python3 .ci/sass_check.py LIB_OR_CUBIN [--cuobjdump PATH] [--kernels offset,distance,token]
                              [--codes plain,int8,fp8]
    python3 .ci/sass_check.py --sass DUMP.txt ...     (a saved `cuobjdump --dump-sass` output)

Rules, for every instantiation of the vector variants (kVec = true) of
offset_kernel, distance_kernel and token_score_kernel, plain and compact
(int8 / fp8 codes: one 128-bit load of 16 codes, their scales through the
read-only path):
  - every plain global load (LDG without .CONSTANT) is LDG.E.128, and there is
    at least one: the KV data. Auxiliary inputs (weights, inv_freq, shift,
    the device table of delta views) are read through the read-only path
    (LDG...CONSTANT, cuda/kernel_common.cuh: load_ro) and are not counted;
  - no generic loads or stores (LD./ST.): nvcc falls back to them when it
    cannot tell a pointer is global, and they are what a C++ dereference of
    a delta view read from a table compiles to;
  - offset_kernel (the only one that stores KV data): every global store is
    STG.E.128, and there is at least one. A 16-byte store split into four
    STG.E (what nvcc 13 made of the plain C++ store) fails here.
Every expected instantiation must be present (3 dtypes x 6 / 4 / 4 template
variants, or those of the code types --codes names), so a rename cannot
silently empty the check. Spills are .ci/resource_check.py's.
Exits 1 with the offending instructions on any violation, 2 on usage errors.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from collections import defaultdict

DTYPES = ("float", "c10::Half", "c10::BFloat16")
# How the anchors / deltas are read (kvcomm::Codes: plain, int8, fp8), as
# c++filt spells the template argument.
PLAIN, INT8, FP8 = (f"(kvcomm::Codes){c}" for c in range(3))
# kernel family -> (template parameters after the dtype, for the vector
# variants, and whether it stores KV data). Compact anchors launch 8 at a time.
FAMILIES = {
    "offset": ("offset_kernel", [f"{c}, true, {rot}" for c in (PLAIN, INT8, FP8) for rot in ("false", "true")],
               True),
    "distance": ("distance_kernel", [f"{PLAIN}, true, 8", f"{PLAIN}, true, 32", f"{INT8}, true, 8",
                                     f"{FP8}, true, 8"], False),
    "token": ("token_score_kernel", [f"{PLAIN}, true, 8", f"{PLAIN}, true, 32", f"{INT8}, true, 8",
                                     f"{FP8}, true, 8"], False),
}

_FUNC = re.compile(r"^\s*Function\s*:\s*(\S+)")
# "/*0730*/   @!P1 LDG.E.128 R24, desc[UR24][R26.64] ;"
_INSN = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)")


def demangle(names: list[str]) -> dict[str, str]:
    """Mangled -> demangled names, through c++filt (binutils)."""
    tool = shutil.which("c++filt")
    if tool is None or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


def parse(sass: str) -> dict[str, list[str]]:
    """Function name (demangled) -> its instructions (mnemonic with modifiers
    first, then the rest of the line). A function that appears for several
    architectures gets all of them appended."""
    raw: dict[str, list[str]] = defaultdict(list)
    current = None
    for line in sass.splitlines():
        m = _FUNC.match(line)
        if m:
            current = m.group(1)
            continue
        if current is None:
            continue
        m = _INSN.match(line)
        if m:
            raw[current].append(line.strip())
    names = demangle(list(raw))
    return {names[k]: v for k, v in raw.items()}


def mnemonic(line: str) -> str:
    return _INSN.match(line).group(1)


CODE_NAMES = {"plain": PLAIN, "int8": INT8, "fp8": FP8}


def expected_kernels(families: list[str], codes: list[str] | None = None) -> dict[str, tuple[str, bool]]:
    """'offset_kernel<c10::Half, (kvcomm::Codes)0, true, true>' -> (family, stores KV data),
    for the variants of the code types `codes` (default all)."""
    keep = [CODE_NAMES[c] for c in (codes or CODE_NAMES)]
    out = {}
    for fam in families:
        name, variants, stores = FAMILIES[fam]
        for dt in DTYPES:
            for v in variants:
                if v.split(",")[0] in keep:
                    out[f"{name}<{dt}, {v}>"] = (fam, stores)
    return out


def check(functions: dict[str, list[str]], families: list[str],
          codes: list[str] | None = None) -> tuple[list[str], list[str]]:
    """(violations, summary lines)."""
    want = expected_kernels(families, codes)
    found: dict[str, list[str]] = {}
    for fn, insns in functions.items():
        m = re.search(r"kvcomm::cuda::(\w+<[^>]*>)", fn)
        if m and m.group(1) in want:
            found.setdefault(m.group(1), []).extend(insns)
    bad, summary = [], []
    for kernel in sorted(want):
        if kernel not in found:
            bad.append(f"{kernel}: not found in the SASS (renamed? not instantiated?)")
            continue
        fam, stores = want[kernel]
        counts: dict[str, int] = defaultdict(int)
        for line in found[kernel]:
            op = mnemonic(line)
            parts = op.split(".")
            base, mods = parts[0], set(parts[1:])
            if base in ("LDG", "STG", "LD", "ST"):
                counts[op] += 1
            if base in ("LD", "ST"):
                bad.append(f"{kernel}: generic memory access (not global): {line}")
            elif base == "LDG" and "CONSTANT" not in mods and "128" not in mods:
                bad.append(f"{kernel}: a KV load narrower than 128 bits: {line}")
            elif base == "STG" and stores and "128" not in mods:
                bad.append(f"{kernel}: a KV store narrower than 128 bits: {line}")
        wide_loads = sum(n for op, n in counts.items() if op.startswith("LDG") and "128" in op.split(".")
                         and "CONSTANT" not in op.split("."))
        wide_stores = sum(n for op, n in counts.items() if op.startswith("STG") and "128" in op.split("."))
        if wide_loads == 0:
            bad.append(f"{kernel}: no 128-bit KV load at all")
        if stores and wide_stores == 0:
            bad.append(f"{kernel}: no 128-bit KV store at all")
        summary.append(f"  {kernel}: " + ", ".join(f"{n} {op}" for op, n in sorted(counts.items()) if n))
    return bad, summary


def dump(path: str, cuobjdump: str | None, what: str = "--dump-sass", expect: str = "Function") -> str:
    """`cuobjdump WHAT path`'s output, which must contain `expect`; exits otherwise."""
    tool = cuobjdump or shutil.which("cuobjdump")
    if tool is None:
        sys.exit("no cuobjdump (pass --cuobjdump, or put it on PATH)")
    env = dict(os.environ)
    # cuobjdump runs nvdisasm, which the pip packages put beside it.
    env["PATH"] = os.path.dirname(os.path.abspath(tool)) + os.pathsep + env.get("PATH", "")
    p = subprocess.run([tool, what, path], capture_output=True, text=True, env=env)
    if p.returncode != 0 or expect not in p.stdout:
        sys.exit(f"`{tool} {what} {path}` failed (exit {p.returncode}): {p.stderr.strip()[:500]}")
    return p.stdout


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("binary", nargs="?", help="the built _C*.so (or a .cubin)")
    ap.add_argument("--sass", help="read a saved SASS dump instead of running cuobjdump")
    ap.add_argument("--cuobjdump", help="path of cuobjdump (default: PATH)")
    ap.add_argument("--kernels", default="offset,distance,token",
                    help="kernel families to require (comma-separated; default all)")
    ap.add_argument("--codes", default="plain,int8,fp8",
                    help="anchor code types whose variants to require (comma-separated; default all)")
    args = ap.parse_args(argv)
    families = [f for f in args.kernels.split(",") if f]
    codes = [c for c in args.codes.split(",") if c]
    unknown = [f for f in families if f not in FAMILIES] + [c for c in codes if c not in CODE_NAMES]
    if unknown or not families or not codes or (args.binary is None) == (args.sass is None):
        ap.print_usage(sys.stderr)
        print(f"sass_check: give one of BINARY or --sass; families from {sorted(FAMILIES)}, codes from "
              f"{sorted(CODE_NAMES)}", file=sys.stderr)
        return 2
    text = open(args.sass).read() if args.sass else dump(args.binary, args.cuobjdump)
    bad, summary = check(parse(text), families, codes)
    print(f"sass_check: {len(summary)} vector kernels, global memory instructions:")
    print("\n".join(summary))
    return report("sass_check", bad, "every KV load/store of a vector kernel is one 128-bit global instruction")


def report(tool: str, bad: list[str], ok: str) -> int:
    """The findings (the first 60) on stderr and exit status 1, or `ok` and 0."""
    if bad:
        print(f"{tool}: FAILED, {len(bad)} findings:", file=sys.stderr)
        for b in bad[:60]:
            print("  " + b, file=sys.stderr)
        if len(bad) > 60:
            print(f"  ... and {len(bad) - 60} more", file=sys.stderr)
        return 1
    print(f"{tool}: OK ({ok})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
