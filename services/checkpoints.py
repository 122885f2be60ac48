"""Resumable checkpoints: written so that a save interrupted at any point never damages the last good one.

Layout of `RUN_DIR/checkpoints/`:
- `<name>/` one checkpoint: the HF export (config, weights, processor: what vLLM and `vireo eval` load),
  the learner's `optimizer/adamw.safetensors` (AdamW moments per parameter name, learner/worker.py) and the
  controller's `trainer_state.json` (stage, step, data sampler, end rule, RNGs, report, tracker rows).
- `latest` the name of the newest complete checkpoint, replaced last.

A save goes to `.tmp-<name>/`, is fsynced file by file, renamed into place (a rename within one directory
is atomic), the directory is fsynced, and only then does `latest` move. A half-written `.tmp-*` is
garbage from an interrupted save and is removed by the next store that opens the folder. Retention keeps
the last `keep_last` step checkpoints, the best `keep_best` by the selection criterion
(services/selection.py, the one that ranks checkpoints for `vireo select-checkpoint`), every stage's final
checkpoint, and whatever `latest` names.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from services.run_dir import fsync_path, read_json, to_json, write_atomic

STATE_FILE = "trainer_state.json"
LATEST = "latest"
TMP_PREFIX = ".tmp-"


@dataclass
class CheckpointConfig:
    """keep_last / keep_best bound the step checkpoints kept on disk (0 keeps all); select_by is the
    criterion of the best ones (services.selection.CRITERIA)."""

    keep_last: int = 2
    keep_best: int = 2
    select_by: str = "critical_entropy"


class CheckpointStore:
    def __init__(self, root: Path, cfg: CheckpointConfig):
        self.root, self.cfg = Path(root), cfg
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(TMP_PREFIX + "*"):  # an interrupted save
            shutil.rmtree(stale, ignore_errors=True)

    def path(self, name: str) -> Path:
        """A checkpoint's directory, which must be a folder right inside the root: a name such as `/tmp/x`
        or `..` would have a save replace, or retention delete, something outside the run."""
        path = self.root / name
        if path.resolve().parent != self.root.resolve():
            raise ValueError(f"checkpoint name {name!r} resolves outside {self.root}")
        return path

    def begin(self, name: str) -> Path:
        """An empty temporary directory the learner writes the checkpoint's tensors into."""
        tmp = self.path(name).with_name(TMP_PREFIX + name)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, name: str, tmp: Path, state: dict) -> Path:
        """Add the controller's state, make every byte durable, move the checkpoint into place, then
        point `latest` at it."""
        write_atomic(tmp / STATE_FILE, to_json(state))
        for file in tmp.rglob("*"):
            if file.is_file():
                fsync_path(file)
        fsync_path(tmp)
        final = self.path(name)
        if final.exists():  # the same name again (a stage re-run after a resume): replace it whole
            aside = self.root / (TMP_PREFIX + name + ".old")
            final.rename(aside)
            shutil.rmtree(aside)
        tmp.rename(final)
        fsync_path(self.root)
        write_atomic(self.root / LATEST, name)
        return final

    def latest(self) -> tuple[Path, dict] | None:
        """The newest complete checkpoint and its controller state, or None. `latest` names it; if that
        pointer is missing or names something incomplete, the complete checkpoint with the highest step."""
        pointer = self.root / LATEST
        if pointer.is_file():
            found = self._read(self.root / Path(pointer.read_text().strip()).name)
            if found:
                return found
        complete = [c for c in (self._read(d) for d in self.root.iterdir() if d.is_dir()
                                and not d.name.startswith(TMP_PREFIX)) if c]
        return max(complete, key=lambda c: (c[1]["global_step"], c[1]["stage_index"]), default=None)

    @staticmethod
    def _read(path: Path) -> tuple[Path, dict] | None:
        try:
            return path, read_json(path / STATE_FILE)
        except (OSError, ValueError):
            return None

    def prune(self, ranking: list[dict], stage_finals: set[str]) -> list[str]:
        """Delete step checkpoints beyond the retention bounds; `ranking` is the selection ranking (best
        first). Returns the names deleted."""
        if not self.cfg.keep_last and not self.cfg.keep_best:
            return []
        found = [c for c in (self._read(d) for d in self.root.iterdir() if d.is_dir()
                             and not d.name.startswith(TMP_PREFIX)) if c]
        steps = sorted((c for c in found if c[0].name not in stage_finals), key=lambda c: c[1]["global_step"])
        keep = {c[0].name for c in steps[len(steps) - self.cfg.keep_last:]} if self.cfg.keep_last else set()
        on_disk = {c[0].name for c in steps}
        best = [name for name in (Path(r["checkpoint"]).name for r in ranking) if name in on_disk]
        keep |= set(best[:self.cfg.keep_best])
        pointer = self.root / LATEST
        if pointer.is_file():
            keep.add(pointer.read_text().strip())
        deleted = []
        for path, _ in steps:
            if path.name not in keep:
                shutil.rmtree(path, ignore_errors=True)
                deleted.append(path.name)
        return deleted
