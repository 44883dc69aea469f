"""How an analysis script leaves its summary: a JSON file that names the records it read
and how it was made, then the summary on stdout."""
from __future__ import annotations

import json

from .. import provenance
from ..runtime.report import write_json


def write_and_print(doc: dict, json_path: str | None, *, script: str, argv: list[str] | None,
                    sources: list) -> None:
    """`doc` written to json_path (if given) with `sources` and the provenance fields
    (`git_sha`, `git_dirty`, the `command` that reruns `script` with argv), then printed.
    Written first, so a reader that closes the pipe early (`| head`) does not cost the file."""
    if json_path:
        made = provenance.capture("python", script, argv=argv)
        write_json(dict(doc, sources=sources, **made.fields()), json_path)
    print(json.dumps(doc, indent=1))
