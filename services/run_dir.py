"""The run directory: the names of its files, and the one way vireo writes and reads them.

A run lives in RUN_DIR/: `config.yaml` (the resolved config, written once; a resume reads it back),
`overrides.jsonl` (each resume's changes to it), `metrics.jsonl` (one row per step, services/tracking.py), `report.json` (rewritten after every evaluation and checkpoint),
`selection.json` (`vireo select-checkpoint`), `curves.png` (MLflow), `checkpoints/` (services/checkpoints.py),
`eval_items/` (each held-out evaluation's per-problem verdicts, `eval_items_file`),
`.shared-check` (proof that learner rank 0's node sees the same directory) and, for the embedded default,
the generated `model/` and `data/`.

Kept free of torch and the rest of vireo: the CLI, the benches and the tests import it cheaply.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.yaml"
OVERRIDES_FILE = "overrides.jsonl"
METRICS_FILE = "metrics.jsonl"
REPORT_FILE = "report.json"
SELECTION_FILE = "selection.json"
CURVES_FILE = "curves.png"
CHECKPOINTS_DIR = "checkpoints"
EVAL_ITEMS_DIR = "eval_items"
MODEL_DIR = "model"
DATA_DIR = "data"
SHARED_MARKER = ".shared-check"  # the driver writes it; learner rank 0 must read it back (services/fleet.py)


def eval_items_file(step: int, set_name: str) -> str:
    """Where, relative to the run directory, the evaluation of `set_name` at global step `step` writes its
    per-problem rows ({id, subject, correct, sampled_correct} per line)."""
    return f"{EVAL_ITEMS_DIR}/step{step:06d}-{set_name}.jsonl"


class DamagedFile(ValueError):
    """A run file that cannot be read as vireo wrote it (cut by a full disk or a kill, or edited)."""


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


def to_json(value: Any, **kwargs) -> str:
    """json.dumps with every NaN and infinity as null: bare NaN is not JSON, and other readers reject it."""
    return json.dumps(_finite(value), allow_nan=False, **kwargs)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def append_jsonl(handle, row: Any) -> None:
    """One row onto an open JSONL file, made durable before the caller goes on (a step's record survives
    a crash that comes after it)."""
    handle.write(to_json(row) + "\n")
    handle.flush()
    os.fsync(handle.fileno())


def log_overrides(run_dir: Path, changes: dict[str, Any]) -> None:
    """A resume's changes to the run's config (config.yaml itself is never rewritten): one row per resume."""
    with (run_dir / OVERRIDES_FILE).open("a", encoding="utf-8") as handle:
        append_jsonl(handle, {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "changes": changes})


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_json(path: str | Path) -> Any:
    """A JSON file vireo wrote; a cut or damaged one is a DamagedFile naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:
        raise DamagedFile(f"{path} is not JSON (a damaged file: {exc})") from None


def read_jsonl(path: str | Path, *, keep_unparsed: bool = False) -> list[Any]:
    """The values of a JSONL file, one per non-blank line; bytes that are not UTF-8 read as U+FFFD.

    A line that is not JSON, the last one too, is a DamagedFile naming it (a torn last row, from a run
    killed mid-append, is cut when the run resumes: keep_jsonl_rows). With `keep_unparsed` (files from
    elsewhere: `vireo score` reports them as skipped rows) every such line, or one nested past the parser's
    depth limit, is kept as its text.
    """
    with open(path, encoding="utf-8", errors="replace") as handle:
        lines = [(number, line) for number, line in enumerate(handle, 1) if line.strip()]
    rows: list[Any] = []
    for number, line in lines:
        try:
            rows.append(json.loads(line))
        except (ValueError, RecursionError):
            if not keep_unparsed:
                raise DamagedFile(f"{path}:{number} is not JSON (a damaged file; a torn last row is cut when "
                                  "the run resumes)") from None
            rows.append(line.rstrip("\n"))
    return rows


def keep_jsonl_rows(path: Path, keep: int) -> int:
    """Keep the first `keep` rows of a JSONL file (atomically), dropping a torn last row so the next one
    does not glue onto it; returns the rows kept. Fewer complete rows than `keep` is a DamagedFile: the
    rows were fsynced before the checkpoint that counted them."""
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines.pop()  # torn: a kill mid-append
    if len(lines) < keep:
        raise DamagedFile(f"{path} holds {len(lines)} complete rows, its checkpoint saw {keep} (a damaged file)")
    write_atomic(path, "".join(lines[:keep]))
    return keep
