"""One small fan-out tracker: every metric goes to every backend (jsonl now; Prometheus and MLflow
plug into the same interface)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Protocol


class MetricsBackend(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class JsonlBackend:
    """metrics.jsonl: one JSON object per step, `step` first; NaN/inf written as null. A resumed run
    opens it with `keep_rows`, the rows its checkpoint had seen: rows written after the checkpoint (the
    steps the run repeats) are dropped, so no step appears twice."""

    def __init__(self, path: str | Path, keep_rows: int = 0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows = truncate_rows(self.path, keep_rows)
        self._file = self.path.open("a", encoding="utf-8")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: (v if not isinstance(v, float) or math.isfinite(v) else None)
                                for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        self.rows += 1

    def close(self) -> None:
        self._file.close()


class Tracker:
    def __init__(self, backends: list[MetricsBackend]):
        self.backends = backends

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for backend in self.backends:
            backend.log(step, metrics)

    def close(self) -> None:
        for backend in self.backends:
            backend.close()


def truncate_rows(path: Path, keep: int) -> int:
    """Keep the first `keep` lines of a JSONL file (atomically); returns the rows kept."""
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)[:keep]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(lines), encoding="utf-8")
    tmp.replace(path)
    return len(lines)


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
