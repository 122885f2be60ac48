"""Held-out evaluation during training (services.evaluation.evaluate_with_learner) with stub engines and
learner: greedy accuracy as the benchmark protocol scores it, the same protocol on sampled responses
(accuracy_sampled), entropy figures from the sampled responses, and one row per problem."""
from __future__ import annotations

import math

from learner.types import TrainSample
from reward.benchmark import score_rows
from rollout.types import SamplingConfig, Trajectory
from services.data.problems import Problem
from services.evaluation import EvalOptions, evaluate_with_learner

PROBLEMS = [Problem(f"p{i}", "Which? <image>", "A", "choice", options=("x", "y"), subject=s, source="MMMU")
            for i, s in enumerate(["Art", "Math", "Art"])]
# the greedy answer of each problem, and its four sampled answers
GREEDY = {"p0": "B", "p1": "A", "p2": "A"}
SAMPLED = {"p0": "AABB", "p1": "AAAA", "p2": "BBBB"}
GREEDY_IDS, SAMPLED_IDS = [1, 2], [3, 4, 5]


def _stubs():
    calls: dict[str, list] = {"generate": [], "evaluate": []}

    def generate(problems: list[Problem], sampling: SamplingConfig) -> list[Trajectory]:
        calls["generate"].append(sampling)
        if sampling.n == 1:
            return [Trajectory(p.id, 0, [9], GREEDY_IDS, [], f"Answer: {GREEDY[p.id]}", "stop", 0) for p in problems]
        return [Trajectory(p.id, k, [9], SAMPLED_IDS, [], f"Answer: {SAMPLED[p.id][k]}", "stop", 0)
                for p in problems for k in range(sampling.n)]

    def evaluate_responses(samples: list[TrainSample]) -> dict[str, float]:
        calls["evaluate"].append(samples)
        return {"loss": 0.0, "tokens": 0.0, "entropy": float(len(samples)), "critical_entropy": 1.5,
                "critical_entropy_after": 0.25, "critical_token_rate": 0.1, "high_entropy_fraction": 0.2}

    return generate, evaluate_responses, calls


def _run(samples: int):
    generate, evaluate_responses, calls = _stubs()
    result = evaluate_with_learner(PROBLEMS, EvalOptions(samples=samples, protocol="mmmu", seed=7), generate,
                                   lambda rows, protocol, mode: score_rows(rows, protocol, mode),
                                   evaluate_responses, sft_sample=None)
    return result, calls


def test_sampled_responses_give_accuracy_sampled_and_the_entropy_figures():
    result, calls = _run(samples=4)
    assert result.accuracy == 2 / 3  # greedy: p1 and p2 right
    assert result.accuracy_sampled == 6 / 12  # sampled: 2 + 4 + 0 of 12
    greedy, sampled = calls["generate"]
    assert (greedy.n, greedy.temperature) == (1, 0.0)
    assert (sampled.n, sampled.temperature, sampled.seed) == (4, 1.0, 7)
    (measured,) = calls["evaluate"]  # the learner saw the 12 sampled responses, not the greedy ones
    assert len(measured) == 12 and all(s.response_token_ids == SAMPLED_IDS for s in measured)
    assert result.entropy == 12.0 and result.critical_entropy == 1.5 and result.critical_entropy_after == 0.25
    assert result.items == [{"id": "p0", "subject": "Art", "correct": 0, "sampled_correct": 0.5},
                            {"id": "p1", "subject": "Math", "correct": 1, "sampled_correct": 1.0},
                            {"id": "p2", "subject": "Art", "correct": 1, "sampled_correct": 0.0}]


def test_without_samples_the_greedy_answers_are_measured():
    result, calls = _run(samples=0)
    assert len(calls["generate"]) == 1 and math.isnan(result.accuracy_sampled)
    (measured,) = calls["evaluate"]
    assert len(measured) == 3 and all(s.response_token_ids == GREEDY_IDS for s in measured)
    assert [row["sampled_correct"] for row in result.items] == [None, None, None]
    assert [row["correct"] for row in result.items] == [0, 1, 1]


def test_each_heldout_evaluation_writes_its_items_beside_the_report(tmp_path):
    from types import SimpleNamespace

    from services.config import RunConfig
    from services.run import Run
    from services.run_dir import EVAL_ITEMS_DIR, read_jsonl

    result, _ = _run(samples=4)
    run = SimpleNamespace(run_dir=tmp_path, cfg=RunConfig(), evaluate=lambda problems: result, log=lambda *_: None,
                          _write_report=lambda report: None)
    run._write_eval_items = lambda *args: Run._write_eval_items(run, *args)
    report = {"eval": []}
    metrics = Run.evaluate_heldout(run, "grpo step 30", 30, "grpo", {"heldout": PROBLEMS}, report)
    (entry,) = report["eval"]
    assert entry["items"] == f"{EVAL_ITEMS_DIR}/step000030-heldout.jsonl"
    assert read_jsonl(tmp_path / entry["items"]) == result.items
    assert metrics["eval/heldout/accuracy_sampled"] == 0.5 and metrics["eval/heldout/critical_entropy_after"] == 0.25
    assert entry["accuracy_sampled"] == 0.5 and entry["accuracy"] == 2 / 3
