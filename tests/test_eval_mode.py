"""The evaluation mode: training-time held-out accuracy is the number `vireo eval` gives, in the mode the
system prompt implies (vireo's asks for \\boxed{}, so "auto" scores in mode r1v3 and a `\\boxed{B}` answer
is credited), on an MMMU-layout file. Both paths get the same fixed responses; no Ray or vLLM."""
from __future__ import annotations

import io
import json
import re
import sys
import types
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from actors.reward_actor import RewardActor
from mmmu_layout import mmmu_row, write_mmmu
from reward.compose import RewardConfig
from rollout.prompts import DEFAULT_SYSTEM_PROMPT
from rollout.types import Trajectory
from services.checks import load_config
from services.config import ConfigError, RunConfig
from services.data.loading import load_problems
from services.evaluation import EvalOptions, evaluate_model, evaluate_with_learner, resolve_mode
from services.run import Run


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


# (question_type, options, answer, the model's response). The first is read as A by the official parser
# (the only standalone letter), as B by R1V3's rule (the last \boxed{} first).
ROWS = [
    ("multiple-choice", ["Monet", "Manet", "Degas"], "B",
     "<think>A is tempting, but the brushwork says otherwise.</think> The painter is \\boxed{B}"),
    ("multiple-choice", ["1", "2", "3", "4"], "C", "<think>Three shapes.</think> Answer: C"),
    ("multiple-choice", ["red", "green"], "B", "<think>It looks red, so A.</think> \\boxed{A}"),
    ("multiple-choice", ["cat", "dog", "bird"], "C", "<think>Feathers.</think> \\boxed{(C)}"),
    ("open", [], "42", "<think>6 times 7.</think> \\boxed{42}"),
    ("open", [], "7", "<think>3 + 3 = 6.</think> \\boxed{6}"),
]


def _write_mmmu(path: Path) -> str:
    png = _png()
    return write_mmmu([mmmu_row(i + 1, f"Question {i + 1} about <image 1>.", options, answer, png)
                       for i, (_, options, answer, _) in enumerate(ROWS)], path)


def _response_of(problem_id: str) -> str:
    return ROWS[int(problem_id.rsplit("_", 1)[1]) - 1][3]


def _trajectory(problem_id: str) -> Trajectory:
    return Trajectory(problem_id, 0, [1, 2], [3, 4], [-0.1, -0.1], _response_of(problem_id), "stop", 0)


@pytest.fixture
def mmmu_file(tmp_path):
    path = _write_mmmu(tmp_path / "validation-00000-of-00001.parquet")
    problems = load_problems(path).problems
    assert len(problems) == len(ROWS) and problems[0].source == "MMMU"
    return path, problems


@pytest.fixture
def benchmark_score():
    """The run's score function (Fleet.score_benchmark -> RewardActor.score_benchmark), the actor's own
    method on its class, without Ray."""
    actor = RewardActor.__ray_actor_class__(RewardConfig(workers=1))
    yield actor.score_benchmark
    actor.scorer.close()


def _training_figure(problems, cfg: RunConfig, score) -> tuple[float, dict]:
    """What Run.evaluate and Run.evaluate_heldout compute, with the fleet's calls stubbed: the rollout
    actors return the fixed responses, the learner figures are left out."""
    def evaluate(batch):
        options = EvalOptions(**asdict(cfg.evaluation), seed=cfg.trainer.seed, system_prompt=cfg.data.system_prompt)
        return evaluate_with_learner(batch, options, lambda ps, _: [_trajectory(p.id) for p in ps], score,
                                     lambda samples: {"loss": 0.0}, lambda problem: None)

    run = SimpleNamespace(cfg=cfg, evaluate=evaluate, log=lambda *_: None, _write_report=lambda report: None,
                          _write_eval_items=lambda step, set_name, items: "eval_items/stub.jsonl")
    report = {"eval": []}
    Run.evaluate_heldout(run, "final", 3, "grpo", {"heldout": problems}, report, checkpoint="ckpt")
    (entry,) = report["eval"]
    return entry["accuracy"], entry


def _vireo_eval(path: str, monkeypatch, tmp_path, mode: str = "auto") -> dict:
    """`vireo eval`'s evaluate_model with a stub engine that returns the fixed responses."""
    prompts = []

    class Processor:
        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            return messages[0]["content"] if messages[0]["role"] == "system" else ""  # the system prompt

    class Engine:
        def __init__(self, model_path, options, on_gpu):
            self.processor = Processor()

        def generate(self, requests, sampling):
            prompts.extend(r.prompt for r in requests)
            return [_trajectory(r.prompt_id) for r in requests]

    monkeypatch.setitem(sys.modules, "rollout.engine", types.SimpleNamespace(RolloutEngine=Engine))
    summary = evaluate_model("stub-model", path, EvalOptions(mode=mode), out_dir=str(tmp_path / "eval"))
    assert prompts and set(prompts) == {DEFAULT_SYSTEM_PROMPT}  # vireo's, which asks for \boxed{}
    return summary


def test_training_figure_equals_vireo_eval_and_credits_boxed(mmmu_file, benchmark_score, monkeypatch, tmp_path):
    path, problems = mmmu_file
    cfg = RunConfig()
    assert cfg.evaluation.mode == "auto" and cfg.data.system_prompt == DEFAULT_SYSTEM_PROMPT
    assert "\\boxed{}" in DEFAULT_SYSTEM_PROMPT
    accuracy, entry = _training_figure(problems, cfg, benchmark_score)
    assert (entry["protocol"], entry["mode"]) == ("mmmu", "r1v3")
    summary = _vireo_eval(path, monkeypatch, tmp_path)
    assert (summary["protocol"], summary["mode"]) == ("mmmu", "r1v3")
    assert summary["accuracy"] == accuracy == 4 / 6  # rows 1 (\boxed{B}), 2, 4, 5 right; 3 and 6 wrong
    assert entry["n"] == summary["scored"] == len(ROWS)
    results = [json.loads(line) for line in (tmp_path / "eval" / "results.jsonl").read_text().splitlines()]
    first = next(r for r in results if r["id"] == "validation_Math_1")
    assert (first["pred"], first["correct"]) == ("B", True)  # \boxed{B} is credited
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["mode"] == "r1v3"


def test_explicit_official_mode_is_kept_on_both_paths(mmmu_file, benchmark_score, monkeypatch, tmp_path):
    path, problems = mmmu_file
    cfg = load_config(None, ["evaluation.mode=official"])
    accuracy, entry = _training_figure(problems, cfg, benchmark_score)
    assert entry["mode"] == "official"
    summary = _vireo_eval(path, monkeypatch, tmp_path, mode="official")
    assert summary["mode"] == "official" and summary["accuracy"] == accuracy
    assert accuracy == 3 / 6  # the official parser reads row 1 as A: the mode is what credits \boxed{B}


def test_resolve_mode():
    assert resolve_mode("auto", DEFAULT_SYSTEM_PROMPT) == "r1v3"
    assert resolve_mode("auto", "You are a helpful assistant.") == "official"
    for mode in ("official", "strict", "r1v3"):
        assert resolve_mode(mode, DEFAULT_SYSTEM_PROMPT) == mode
    with pytest.raises(ValueError, match="auto"):
        resolve_mode("lenient", DEFAULT_SYSTEM_PROMPT)


def test_unknown_eval_mode_is_a_config_error_listing_the_choices():
    message = "evaluation.mode must be one of ['auto', 'official', 'r1v3', 'strict'], got 'lenient'"
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, ["evaluation.mode=lenient"])
    assert load_config(None, ["evaluation.mode=strict"]).evaluation.mode == "strict"
