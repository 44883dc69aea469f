"""Citations of the docs resolve: code, tests and docs cite docs/method.md by the start of a
section's heading (`docs/method.md, "Deciding"`) and docs by anchor (a page, `#`, the anchor); a
renamed heading or a moved page fails here instead of leaving readers a dead reference."""
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CITED_HEADING = re.compile(r"method\.md,?\s*(?:(?://|#|\*)\s*)?[\"']([A-Z][^\"']{2,60})[\"']")
ANCHOR_LINK = re.compile(r"(docs/[a-z0-9_\-]+\.md)#([a-z0-9\-]+)")
LOCAL_LINK = re.compile(r"\]\(#([a-z0-9\-]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^a-z0-9 \-]", "", heading.strip().lower()).replace(" ", "-")


def headings(md: Path) -> list[str]:
    return [line.lstrip("#").strip() for line in md.read_text(encoding="utf-8").splitlines()
            if re.match(r"#{1,6} ", line)]


def tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "python", "cpp", "cuda", "tests", "benchmarks", "docs", "README.md"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / f for f in out if f.endswith((".py", ".md", ".cpp", ".h", ".cu", ".cuh", ".sh"))]


@pytest.fixture(scope="module")
def files():
    files = tracked_text_files()
    if not files:
        pytest.fail("git ls-files found no sources: run the tests from a git checkout")
    return files


def test_method_citations_name_existing_sections(files):
    heads = headings(ROOT / "docs" / "method.md")
    seen, dead = 0, []
    for f in files:
        for m in CITED_HEADING.finditer(f.read_text(encoding="utf-8", errors="replace")):
            seen += 1
            if not any(h.startswith(m.group(1)) for h in heads):
                dead.append(f"{f.relative_to(ROOT)}: {m.group(1)!r}")
    assert seen > 20, "the citation pattern found almost nothing: has the citation style changed?"
    assert not dead, "cited sections that docs/method.md does not have:\n" + "\n".join(dead)


def test_doc_anchors_resolve(files):
    dead = []
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        targets = [(page, anchor) for page, anchor in ANCHOR_LINK.findall(text)]
        if f.suffix == ".md":
            targets += [(str(f.relative_to(ROOT)), a) for a in LOCAL_LINK.findall(text)]
        for page, anchor in targets:
            md = ROOT / page
            if not md.exists() or anchor not in {slug(h) for h in headings(md)}:
                dead.append(f"{f.relative_to(ROOT)}: {page}#{anchor}")
    assert not dead, "links to anchors that do not exist:\n" + "\n".join(dead)


def test_no_numbered_section_citations(files):
    """Section numbers change when a section is added; citations use names."""
    numbered = [f"{f.relative_to(ROOT)}" for f in files
                if re.search(r"method\.md,?\s*(?:(?://|#)\s*)?(?:sections?|§) ?\d", f.read_text(errors="replace"))]
    assert not numbered, "numbered citations of docs/method.md: " + ", ".join(numbered)
