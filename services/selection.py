"""Checkpoint selection (R1V3 §5.1): rank a run's saved checkpoints by critical-token entropy — the paper's
signal that a model reasons rather than imitates — or by held-out accuracy or training reward.

Inputs are the run's own records: report.json's evaluations (each with the checkpoint saved at that step)
and metrics.jsonl's reward. Used at the end of every run and by `vireo select-checkpoint`.
"""
from __future__ import annotations

import math
from pathlib import Path

from services.run_dir import METRICS_FILE, REPORT_FILE, SELECTION_FILE, read_json, read_jsonl, to_json, write_atomic

CRITERIA = ("critical_entropy", "heldout_accuracy", "reward")
REWARD_WINDOW = 5  # training steps up to a checkpoint whose mean reward/mean it is credited with


def checkpoint_ranking(report: dict, metrics: list[dict], by: str) -> list[dict]:
    """One row per evaluated checkpoint of the primary held-out set, best first by `by` (NaN last)."""
    if by not in CRITERIA:
        raise ValueError(f"unknown selection criterion {by!r}; known: {', '.join(CRITERIA)}")
    rewards = [(row["step"], row["reward/mean"]) for row in metrics if isinstance(row.get("reward/mean"), float | int)]
    entropy_key = _critical_entropy_key(report)
    rows = []
    for ev in report.get("eval", []):
        if not ev.get("checkpoint") or ev.get("set", "heldout") != "heldout":
            continue
        recent = [r for step, r in rewards if ev["step"] - REWARD_WINDOW < step <= ev["step"]]
        rows.append({"step": ev["step"], "stage": ev.get("stage", ""), "checkpoint": ev["checkpoint"],
                     "critical_entropy": _num(ev.get(entropy_key)), "heldout_accuracy": _num(ev["accuracy"]),
                     "reward_mean": sum(recent) / len(recent) if recent else float("nan")})
    key = "reward_mean" if by == "reward" else by
    return sorted(rows, key=lambda r: (math.isnan(r[key]), -r[key] if not math.isnan(r[key]) else 0.0, -r["step"]))


def _critical_entropy_key(report: dict) -> str:
    """The evaluation figure the critical_entropy criterion reads: the run's learner.optim.critical_positions
    reading (critical_entropy at a marker's first token, critical_entropy_after right after it)."""
    positions = report.get("config", {}).get("learner", {}).get("optim", {}).get("critical_positions", "first")
    return "critical_entropy_after" if positions == "after" else "critical_entropy"


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties) over the pairs where both are numbers."""
    pairs = [(x, y) for x, y in zip(xs, ys) if not (math.isnan(x) or math.isnan(y))]
    if len(pairs) < 3:
        return float("nan")
    rx, ry = _ranks([x for x, _ in pairs]), _ranks([y for _, y in pairs])
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    sy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return cov / (sx * sy) if sx and sy else float("nan")


def selection_summary(report: dict, metrics: list[dict], by: str) -> dict:
    ranking = checkpoint_ranking(report, metrics, by)
    rho = spearman([r["critical_entropy"] for r in ranking], [r["heldout_accuracy"] for r in ranking])
    return {"select_by": by, "checkpoint_ranking": ranking, "chosen": ranking[0] if ranking else None,
            "critical_entropy_accuracy_spearman": rho}


def record_selection(report: dict, metrics: list[dict], by: str) -> None:
    """The end of a run: its report ranks the checkpoints by `by`, the criterion retention pruned by
    (checkpoint.select_by), so the report, the printed table and the checkpoints kept agree."""
    summary = selection_summary(report, metrics, by)
    report.update({k: summary[k] for k in ("select_by", "checkpoint_ranking", "critical_entropy_accuracy_spearman")})


def select_checkpoint(run_dir: str | Path, by: str) -> dict:
    """Rank RUN_DIR's checkpoints; writes RUN_DIR/selection.json and returns it. A damaged report.json or
    metrics.jsonl is a DamagedFile naming it."""
    run_dir = Path(run_dir)
    if not (run_dir / REPORT_FILE).is_file():
        raise FileNotFoundError(f"{run_dir} holds no {REPORT_FILE} (not a vireo run directory?)")
    report = read_json(run_dir / REPORT_FILE)
    metrics = read_jsonl(run_dir / METRICS_FILE) if (run_dir / METRICS_FILE).is_file() else []
    summary = selection_summary(report, metrics, by)
    write_atomic(run_dir / SELECTION_FILE, to_json(summary, indent=1))
    return summary


def format_ranking(summary: dict) -> str:
    """The ranking table of a selection summary or of a run's report (record_selection)."""
    lines = [f"{'rank':<5}{'step':>6}  {'stage':<12}{'crit. entropy':>14}{'held-out':>10}{'reward':>8}  checkpoint"]
    for i, r in enumerate(summary["checkpoint_ranking"], 1):
        lines.append(f"{i:<5}{r['step']:>6}  {r['stage']:<12}{r['critical_entropy']:>14.3f}"
                     f"{r['heldout_accuracy']:>10.3f}{r['reward_mean']:>8.3f}  {r['checkpoint']}")
    lines.append(f"by {summary['select_by']}; Spearman(critical-token entropy, held-out accuracy) = "
                 f"{summary['critical_entropy_accuracy_spearman']:.3f} over {len(summary['checkpoint_ranking'])} "
                 "checkpoints")
    return "\n".join(lines)


def _num(value) -> float:
    return float(value) if isinstance(value, int | float) else float("nan")


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks
