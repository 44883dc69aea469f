""".ci/sass_check.py, the CI check that the vector kernels' KV loads and stores
are single 128-bit global instructions, on synthetic SASS in cuobjdump's format
(no GPU, no cuobjdump needed). The CUDA compile check runs it on the built
library and on a negative control built with the plain C++ vector access."""
from __future__ import annotations

import importlib.util
import shutil

import pytest

from backends import ROOT

spec = importlib.util.spec_from_file_location("sass_check", ROOT / ".ci" / "sass_check.py")
sass_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sass_check)

pytestmark = pytest.mark.skipif(shutil.which("c++filt") is None, reason="c++filt (binutils) demangles the names")

TYPES = {"float": "f", "c10::Half": "N3c104HalfE", "c10::BFloat16": "N3c108BFloat16E"}
CODES = ["LNS_5CodesE0E", "LNS_5CodesE1E", "LNS_5CodesE2E"]  # plain, int8, fp8
PLAIN = CODES[0]
SCORE_TAILS = [PLAIN + "Lb1ELi8E", PLAIN + "Lb1ELi32E", CODES[1] + "Lb1ELi8E", CODES[2] + "Lb1ELi8E"]
KERNELS = {  # family -> (mangled name, args, template tails)
    "offset": ("13offset_kernel", "NS0_10OffsetArgsENS0_8RefTableENS0_10ScaleTableE",
               [c + rot for c in CODES for rot in ("Lb1ELb0E", "Lb1ELb1E")]),
    "distance": ("15distance_kernel", "NS0_12DistanceArgsENS0_8RefTableENS0_10ScaleTableE", SCORE_TAILS),
    "token": ("18token_score_kernel", "NS0_9TokenArgsENS0_8RefTableENS0_10ScaleTableE", SCORE_TAILS),
}

GOOD = {
    "offset": ["@P0 LDG.E.128 R24, desc[UR24][R26.64] ;", "LDG.E.128.CONSTANT R8, desc[UR24][R2.64] ;",
               "@!P1 LDG.E.CONSTANT R16, desc[UR24][R22.64+0x4] ;", "LDG.E.64.CONSTANT R2, desc[UR4][R2.64] ;",
               "STG.E.128 desc[UR24][R6.64], R8 ;"],
    "distance": ["LDG.E.128 R4, desc[UR6][R4.64] ;", "STG.E desc[UR6][R2.64], R9 ;"],
    "token": ["LDG.E.128 R4, desc[UR6][R4.64] ;", "STG.E desc[UR6][R2.64], R9 ;"],
}


def _sass(overrides=None, drop=None):
    """A dump with every vector kernel (GOOD instructions), one kernel's body
    replaced or left out."""
    out = ["", "Fatbin elf code:", "================", "arch = sm_90a", ""]
    for fam, (name, args, tails) in KERNELS.items():
        for t in TYPES.values():
            for tail in tails:
                mangled = f"_ZN6kvcomm4cuda{name}I{t}{tail}EEv{args}"
                if mangled == drop:
                    continue
                body = (overrides or {}).get(mangled, GOOD[fam])
                out.append(f"\t\tFunction : {mangled}")
                out.append("\t.headerflags\t@\"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)\"")
                for i, insn in enumerate(body):
                    out.append(f"        /*{i * 16:04x}*/                   {insn:<60} /* 0x000000181a187981 */")
                out.append("\t\t..........")
    return "\n".join(out)


BF16_ROT = ("_ZN6kvcomm4cuda13offset_kernelIN3c108BFloat16ELNS_5CodesE0ELb1ELb1EEEvNS0_10OffsetArgsENS0_8RefTable"
            "ENS0_10ScaleTableE")
BF16_ROT_NAME = "offset_kernel<c10::BFloat16, (kvcomm::Codes)0, true, true>"


def _check(text):
    return sass_check.check(sass_check.parse(text), list(KERNELS))


def test_all_128_bit_passes():
    bad, summary = _check(_sass())
    assert bad == [] and len(summary) == 3 * (6 + 4 + 4)


def test_split_stores_fail():
    split = GOOD["offset"][:-1] + [f"STG.E desc[UR24][R6.64+{o}], R9 ;" for o in ("", "0x4", "0x8", "0xc")]
    bad, _ = _check(_sass({BF16_ROT: split}))
    assert len(bad) == 5  # four narrow stores, and no 128-bit store left
    assert all(BF16_ROT_NAME in b for b in bad)
    assert "KV store narrower than 128 bits" in bad[0] and "no 128-bit KV store" in bad[-1]


def test_narrow_plain_loads_and_generic_accesses_fail():
    body = GOOD["offset"] + ["LDG.E R8, desc[UR24][R16.64+0x4] ;", "LD.E.128 R8, desc[UR24][R8.64] ;",
                             "ST.E.128 desc[UR24][R8.64], R4 ;"]
    bad, _ = _check(_sass({BF16_ROT: body}))
    assert [b.split(": ", 1)[1].split(":")[0] for b in bad] == [
        "a KV load narrower than 128 bits", "generic memory access (not global)", "generic memory access (not global)"]


def test_a_missing_kernel_fails():
    bad, _ = _check(_sass(drop=BF16_ROT))
    assert bad == [f"{BF16_ROT_NAME}: not found in the SASS (renamed? not instantiated?)"]


def test_cli_exit_codes(tmp_path, capsys):
    good, split = tmp_path / "good.sass", tmp_path / "split.sass"
    good.write_text(_sass())
    split.write_text(_sass({BF16_ROT: ["LDG.E.128 R4, desc[UR6][R4.64] ;", "STG.E desc[UR6][R2.64], R9 ;"]}))
    assert sass_check.main(["--sass", str(good)]) == 0
    assert sass_check.main(["--sass", str(split)]) == 1
    assert sass_check.main(["--sass", str(good), "--kernels", "nonsense"]) == 2
    assert "FAILED" in capsys.readouterr().err


def test_codes_narrow_the_required_kernels(tmp_path):
    # the negative control compiles only the plain kernels (cuda/launch_plain.cu)
    plain_offsets = [f"_ZN6kvcomm4cuda13offset_kernelI{t}{PLAIN}{rot}EEvNS0_10OffsetArgsENS0_8RefTableENS0_10ScaleTableE"
                     for t in TYPES.values() for rot in ("Lb1ELb0E", "Lb1ELb1E")]
    text = "\n".join(line for block in _sass().split("\t\t..........") for line in block.splitlines()
                     if any(k in block for k in plain_offsets))
    bad, summary = sass_check.check(sass_check.parse(text), ["offset"], ["plain"])
    assert bad == [] and len(summary) == 3 * 2
    bad, _ = sass_check.check(sass_check.parse(text), ["offset"])
    assert len(bad) == 3 * 4 and all("not found in the SASS" in b for b in bad)
    dump = tmp_path / "plain.sass"
    dump.write_text(text)
    assert sass_check.main(["--sass", str(dump), "--kernels", "offset", "--codes", "plain"]) == 0
    assert sass_check.main(["--sass", str(dump), "--kernels", "offset", "--codes", "int4"]) == 2
