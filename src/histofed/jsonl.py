"""JSON-lines logs (metrics.jsonl, egress.jsonl, ...): one reader for the engine and the report.

A run killed mid-write leaves a torn last line; it is skipped with a note, so a crashed run
can still be resumed and reported. Any other bad line is an error naming the file and line.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def iter_jsonl(path: Path, notes: list[str] | None = None) -> Iterator[tuple[int, Any]]:
    """(line number, object) for each line of a JSON-lines log.

    A torn last line (a run killed mid-write) is skipped with a note (appended to ``notes``, or
    a warning); a bad line elsewhere is a ValueError naming the file and line.
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            if i < len(lines):
                raise ValueError(f"{path}:{i}: not valid JSON ({err}); fix or delete that "
                                 "line") from None
            note = f"{path.name}: ignored an incomplete last line ({i})"
            if notes is None:
                warnings.warn(note, stacklevel=3)
            else:
                notes.append(note)
            continue
        yield i, row
