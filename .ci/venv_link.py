#!/usr/bin/env python3
"""Puts distributions installed in this Python's environment, with everything
they require, into another venv's site-packages as hard links: the files and
.dist-info records pip wrote, so that venv's pip sees them installed, in a
second or two instead of pip unpacking them again (torch with its CUDA
libraries: 5.4 GB, ~70 s and as long again to delete, on the CI machine).

    python .ci/venv_link.py DEST_SITE_PACKAGES torch numpy

Files outside site-packages (console scripts) are left out. Falls back to a
copy where a hard link is refused (another filesystem).
"""
from __future__ import annotations

import importlib.metadata as md
import os
import shutil
import sys

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def closure(names: list[str]) -> list[md.Distribution]:
    """The distributions `names` and all they require, with the extras each
    requirement names (torch requires cuda-toolkit[cudart, cublas, ...]),
    markers evaluated for this interpreter."""
    todo = [(n, frozenset()) for n in names]
    seen: set[tuple[str, frozenset]] = set()
    dists: dict[str, md.Distribution] = {}
    while todo:
        name, extras = todo.pop()
        key = (canonicalize_name(name), extras)
        if key in seen:
            continue
        seen.add(key)
        dist = dists.setdefault(key[0], md.distribution(name))
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ("", *extras)):
                todo.append((req.name, frozenset(req.extras)))
    return list(dists.values())


def link(dists: list[md.Distribution], dest: str) -> int:
    count = 0
    for dist in dists:
        for rel in dist.files or []:
            if str(rel).startswith(".."):
                continue
            src = str(dist.locate_file(rel))
            if not os.path.isfile(src):
                continue
            dst = os.path.join(dest, str(rel))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
            count += 1
    return count


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    dists = closure(argv[1:])
    n = link(dists, argv[0])
    print(f"venv_link: {len(dists)} distributions ({', '.join(sorted(d.metadata['Name'] for d in dists))}), "
          f"{n} files linked into {argv[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
