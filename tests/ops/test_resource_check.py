""".ci/resource_check.py, the CI table of per-kernel registers, stack, spills and
local memory and its check that no kernel spills, on synthetic cuobjdump
--dump-resource-usage and ptxas -v output (no GPU, no CUDA toolkit needed)."""
from __future__ import annotations

import importlib.util
import shutil

import pytest

from backends import ROOT

spec = importlib.util.spec_from_file_location("resource_check", ROOT / ".ci" / "resource_check.py")
resource_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(resource_check)

pytestmark = pytest.mark.skipif(shutil.which("c++filt") is None, reason="c++filt (binutils) demangles the names")

OFFSET = "_ZN6kvcomm4cuda13offset_kernelIfLNS_5CodesE1ELb1ELb1EEEvNS0_10OffsetArgsENS0_8RefTableENS0_10ScaleTableE"
TOKEN = ("_ZN6kvcomm4cuda18token_score_kernelIN3c104HalfELNS_5CodesE2ELb1ELi8EEEvNS0_9TokenArgsENS0_8RefTable"
         "ENS0_10ScaleTableE")
STORE = "_ZN6kvcomm4cuda17store_refs_kernelENS0_8RefTableEiPNS0_5KVRefE"
KERNELS = {OFFSET: "offset_kernel<float, int8, true, true>", TOKEN: "token_score_kernel<Half, fp8, true, 8>",
           STORE: "store_refs_kernel"}


def resources(archs=("sm_80", "sm_90a"), local=0):
    """A fatbin's resource dump: the three kernels for each arch."""
    out = []
    for arch in archs:
        out += ["", "Fatbin elf code:", "================", f"arch = {arch}", "code version = [1,8]",
                "", "Resource usage:", " Common:", "  GLOBAL:0"]
        for i, name in enumerate(KERNELS):
            out += [f" Function {name}:",
                    f"  REG:{100 + i} STACK:{32 if name == OFFSET else 0} SHARED:0 LOCAL:{local if name == TOKEN else 0} "
                    "CONSTANT[0]:2680 TEXTURE:0 SURFACE:0 SAMPLER:0"]
    return "\n".join(out)


def ptxas(archs=("sm_80", "sm_90a"), spill=None, callee_spill=None, skip=None):
    """ptxas -v lines for the kernels, as nvcc 13 prints them. spill: the
    (kernel, arch) whose block reports 8 bytes spilled each way; callee_spill:
    the one whose block also has a non-inlined device function spilling 4;
    skip: the one left out."""
    out = ["ptxas info    : 0 bytes gmem"]
    for arch in archs:
        for i, name in enumerate(KERNELS):
            if (name, arch) == skip:
                continue
            spilled = 8 if (name, arch) == spill else 0
            out.append(f"ptxas info    : Compiling entry function '{name}' for '{arch}'")
            if (name, arch) == callee_spill:
                out += ["ptxas info    : Function properties for _ZN6kvcomm4math7sin_cosEfPfS1_",
                        "    16 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads"]
            out += [f"ptxas info    : Function properties for {name}",
                    f"    32 bytes stack frame, {spilled} bytes spill stores, {spilled} bytes spill loads",
                    f"ptxas info    : Used {100 + i} registers, used 1 barriers, 32 bytes cumulative stack size",
                    "ptxas info    : Compile time = 12.3 ms"]
    return "\n".join(out)


def run(res, log):
    return resource_check.check(resource_check.parse_resources(res), resource_check.parse_ptxas(log))


def test_a_clean_build_passes_and_the_table_has_every_kernel_and_arch():
    bad, table = run(resources(), ptxas())
    assert bad == []
    assert table[0].split() == ["kernel", "sm_80", "sm_90a"]
    for name in KERNELS.values():
        assert sum(line.startswith(name + " ") for line in table) == 1, name
    offset_row = next(line for line in table if line.startswith("offset_kernel<float, int8, true, true>"))
    assert offset_row.split()[-8:] == ["100r", "32st", "0sp", "0l"] * 2
    assert "sm_90a: 3 kernels, at most 102 registers (store_refs_kernel), 0 spilling" in table


def test_a_spill_fails_and_names_the_kernel_and_arch():
    bad, table = run(resources(), ptxas(spill=(TOKEN, "sm_80")))
    assert bad == ["token_score_kernel<Half, fp8, true, 8> (sm_80): spills 8 bytes stored, 8 loaded"]
    assert "sm_80: 3 kernels, at most 102 registers (store_refs_kernel), 1 spilling" in table


def test_a_called_functions_spill_counts_for_the_kernel():
    bad, _ = run(resources(), ptxas(callee_spill=(OFFSET, "sm_90a")))
    assert bad == ["offset_kernel<float, int8, true, true> (sm_90a): spills 4 bytes stored, 4 loaded"]


def test_local_memory_and_a_missing_ptxas_record_fail():
    bad, _ = run(resources(local=16), ptxas(skip=(STORE, "sm_90a")))
    assert sorted(bad) == ["store_refs_kernel (sm_90a): no ptxas -v record in the build log",
                           "token_score_kernel<Half, fp8, true, 8> (sm_80): 16 bytes of local memory",
                           "token_score_kernel<Half, fp8, true, 8> (sm_90a): 16 bytes of local memory"]


def test_a_lone_cubin_without_arch_lines_takes_ptxas_arch():
    res = "\n".join(line for line in resources(archs=("sm_90a",)).splitlines() if not line.startswith("arch"))
    bad, table = run(res, ptxas(archs=("sm_90a",)))
    assert bad == [] and table[0].split() == ["kernel", "sm_90a"]


def test_cli_exit_codes(tmp_path, capsys):
    res, good, spilled = tmp_path / "res.txt", tmp_path / "good.log", tmp_path / "spill.log"
    res.write_text(resources())
    good.write_text(ptxas())
    spilled.write_text(ptxas(spill=(OFFSET, "sm_90a")))
    assert resource_check.main(["--resources", str(res), "--ptxas-log", str(good)]) == 0
    assert resource_check.main(["--resources", str(res), "--ptxas-log", str(spilled)]) == 1
    assert "FAILED, 1 findings" in capsys.readouterr().err
    assert resource_check.main(["--ptxas-log", str(good)]) == 2
