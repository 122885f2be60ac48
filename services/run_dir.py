"""The run directory: the names of its files, and the one way vireo writes and reads them.

A run lives in RUN_DIR/: `config.yaml` (the resolved config; a resume reads it back), `metrics.jsonl` (one
row per step, services/tracking.py), `report.json` (rewritten after every evaluation and checkpoint),
`selection.json` (`vireo select-checkpoint`), `curves.png` (MLflow), `checkpoints/` (services/checkpoints.py),
`.shared-check` (proof that the learner's node sees the same directory) and, for the embedded default, the
generated `model/` and `data/`.

Kept free of torch and the rest of vireo: the CLI, the benches and the tests import it cheaply.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
REPORT_FILE = "report.json"
SELECTION_FILE = "selection.json"
CURVES_FILE = "curves.png"
CHECKPOINTS_DIR = "checkpoints"
MODEL_DIR = "model"
DATA_DIR = "data"
SHARED_MARKER = ".shared-check"  # the driver writes it; learner rank 0 must read it back (services/fleet.py)


def fsync_path(path: Path) -> None:
    """Make a file's bytes, or a directory's entries (a rename in it), durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, fsync it, rename it over `path`, fsync the directory:
    a reader, or a run killed at any point, sees the old file (or none) or the new one, never a torn one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(path.parent)


def read_jsonl(path: str | Path, *, keep_unparsed: bool = False) -> list[Any]:
    """The values of a JSONL file, one per non-blank line; bytes that are not UTF-8 read as U+FFFD.

    A last line that is not JSON is dropped: a run killed mid-append leaves half a row. Anywhere else such a
    line is a damaged file (ValueError). With `keep_unparsed` (files from elsewhere: `vireo score` reports
    them as skipped rows) every such line, or one nested past the parser's depth limit, is kept as its text.
    """
    with open(path, encoding="utf-8", errors="replace") as handle:
        lines = [(number, line) for number, line in enumerate(handle, 1) if line.strip()]
    rows: list[Any] = []
    for i, (number, line) in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except (ValueError, RecursionError):
            if keep_unparsed:
                rows.append(line.rstrip("\n"))
            elif i < len(lines) - 1:
                raise ValueError(f"{path}:{number} is not JSON (a damaged file)") from None
    return rows
