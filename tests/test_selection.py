"""Checkpoint selection from a run's own records (report.json evaluations, metrics.jsonl rewards)."""
from __future__ import annotations

import json
import math

import pytest

from services.cli import main
from services.selection import checkpoint_ranking, format_ranking, record_selection, select_checkpoint, spearman


def _report():
    evals = [(0, None, 0.0, float("nan")), (10, "ck/10", 0.55, 0.9), (20, "ck/20", 0.62, 1.4),
             (30, "ck/30", 0.60, 1.1), (40, "ck/40", 0.64, 1.3)]
    return {"eval": [{"name": f"s{step}", "stage": "grpo", "set": "heldout", "step": step, "checkpoint": ck,
                      "accuracy": acc, "critical_entropy": ce} for step, ck, acc, ce in evals]
            + [{"name": "x", "stage": "grpo", "set": "other", "step": 40, "checkpoint": "ck/40", "accuracy": 1.0,
                "critical_entropy": 9.0}]}


METRICS = [{"step": s, "reward/mean": 0.01 * s} for s in range(1, 41)] + [{"step": 40, "event": "stage_end"}]


def test_ranking_by_each_criterion():
    report = _report()
    assert [r["step"] for r in checkpoint_ranking(report, METRICS, "critical_entropy")] == [20, 40, 30, 10]
    assert [r["step"] for r in checkpoint_ranking(report, METRICS, "heldout_accuracy")] == [40, 20, 30, 10]
    by_reward = checkpoint_ranking(report, METRICS, "reward")
    assert [r["step"] for r in by_reward] == [40, 30, 20, 10]
    assert by_reward[0]["reward_mean"] == pytest.approx(sum(0.01 * s for s in range(36, 41)) / 5)
    with pytest.raises(ValueError, match="critical_entropy, heldout_accuracy, reward"):
        checkpoint_ranking(report, METRICS, "loss")


def test_the_critical_entropy_criterion_reads_the_runs_critical_positions():
    """learner.optim.critical_positions=after ranks by the entropy right after the markers."""
    report = _report()
    for ev, after in zip(report["eval"], [float("nan"), 2.0, 0.1, 0.5, 0.3, 9.0]):
        ev["critical_entropy_after"] = after
    assert [r["step"] for r in checkpoint_ranking(report, METRICS, "critical_entropy")] == [20, 40, 30, 10]
    report["config"] = {"learner": {"optim": {"critical_positions": "after"}}}
    ranking = checkpoint_ranking(report, METRICS, "critical_entropy")
    assert [r["step"] for r in ranking] == [10, 30, 40, 20] and ranking[0]["critical_entropy"] == 2.0


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([0.9, 1.4, 1.1, 1.3], [0.55, 0.62, 0.60, 0.64]) == pytest.approx(0.8)
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(math.sqrt(3) / 2)  # average ranks for ties
    assert math.isnan(spearman([1, 2], [1, 2])) and math.isnan(spearman([1, float("nan"), 2], [1, 2, 3]))


def test_select_checkpoint_command(tmp_path, capsys):
    (tmp_path / "report.json").write_text(json.dumps(_report()))
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in METRICS))
    assert main(["select-checkpoint", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "chosen: ck/20" in out and "Spearman" in out
    saved = json.loads((tmp_path / "selection.json").read_text())
    assert saved["chosen"]["checkpoint"] == "ck/20" and saved["critical_entropy_accuracy_spearman"] == pytest.approx(0.8)
    assert select_checkpoint(tmp_path, "heldout_accuracy")["chosen"]["step"] == 40
    assert main(["select-checkpoint", str(tmp_path / "missing")]) == 2


def test_a_run_report_ranks_by_its_select_by():
    """Retention prunes by checkpoint.select_by; the report must rank by it too (it ranked by entropy)."""
    report = _report()
    record_selection(report, METRICS, "heldout_accuracy")
    assert report["select_by"] == "heldout_accuracy" and [r["step"] for r in report["checkpoint_ranking"]] == [40, 20, 30, 10]
    assert "by heldout_accuracy;" in format_ranking(report)


def test_train_prints_the_ranking_by_select_by(tmp_path, monkeypatch, capsys):
    import services.run

    class FakeRun:  # what Run.run leaves in the report, without Ray
        def __init__(self, cfg, run_dir):
            self.cfg = cfg

        def run(self):
            report = {**_report(), "heldout_accuracy_initial": 0.0, "stages": []}
            record_selection(report, METRICS, self.cfg.checkpoint.select_by)
            return report

    monkeypatch.setattr(services.run, "Run", FakeRun)
    assert main(["train", "checkpoint.select_by=heldout_accuracy", f"out_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "by heldout_accuracy;" in out and "by critical_entropy" not in out
    assert out.index("ck/40") < out.index("ck/20")


@pytest.mark.parametrize("damaged", ["report.json", "metrics.jsonl"])
def test_select_checkpoint_on_a_damaged_record_names_it(tmp_path, capsys, damaged):
    report, metrics = json.dumps(_report()), "".join(json.dumps(m) + "\n" for m in METRICS)
    (tmp_path / "report.json").write_text(report[:len(report) // 2] if damaged == "report.json" else report)
    (tmp_path / "metrics.jsonl").write_text(metrics + '{"step": 99, "reward/me' if damaged == "metrics.jsonl"
                                            else metrics)
    assert main(["select-checkpoint", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("vireo select-checkpoint: ")
    assert f"{tmp_path / damaged}" in err and "is not JSON" in err, err
    assert not (tmp_path / "selection.json").exists()
