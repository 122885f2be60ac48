"""The learning proof's arms and the ablations (issue 18): each arm differs from its comparator in exactly
the setting it is about (R1V3 §3.4, §5.2, §5.3, §5.5, §6.1), and the paired bootstrap is right on hand-made
per-item results."""
import dataclasses

import numpy as np
import pytest
from omegaconf import OmegaConf

from bench.ablations import ARMS, FINDINGS, ablation_config
from bench.learning import Curve, arm_config, bootstrap_ci, coldstart_config, compare, entropy_selection
from services.checks import load_config

CHECKPOINT = "/runs/seed0/coldstart/checkpoints/coldstart"


def _diff(a, b) -> dict:
    """Flattened keys where two configs differ."""
    fa, fb = (OmegaConf.to_container(OmegaConf.structured(x)) for x in (a, b))

    def flat(d, prefix=""):
        for k, v in d.items():
            yield from flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [(prefix + k, v)]
    fa, fb = dict(flat(fa)), dict(flat(fb))
    return {k: (fa.get(k), fb.get(k)) for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k)}


@pytest.fixture(scope="module")
def proof():
    return load_config("configs/proof.yaml")


def test_proof_states_its_task_and_cold_start_rule(proof):
    assert [s.kind for s in proof.stages] == ["sft", "grpo"]
    assert proof.data.n_heldout >= 1000 and proof.data.n_ood > 0 and 0 < proof.data.teacher_error_rate < 0.5
    assert proof.stages[0].end.max_epochs > 0  # the cold start's length is a rule, not a tuned step count
    assert proof.evaluation.samples >= 2 and proof.evaluation.sample_temperature == 1.0
    assert coldstart_config(proof).stages == [proof.stages[0]]


def test_grpo_arms_differ_in_the_reward_only(proof):
    rl, random = arm_config(proof, "rl", CHECKPOINT), arm_config(proof, "random", CHECKPOINT)
    assert _diff(rl, random) == {"reward.kind": ("rule", "random"), "name": ("proof-rl", "proof-random")}
    assert dataclasses.asdict(rl.stages[0]) == dataclasses.asdict(proof.stages[1])
    assert rl.model.path == CHECKPOINT and not rl.evaluation.before_train
    assert not rl.stages[0].algo.drop_uniform_groups  # both arms train on every sampled response


def test_sft_arm_continues_the_cold_start_for_as_many_steps(proof):
    sft, rl = arm_config(proof, "sft", CHECKPOINT).stages[0], arm_config(proof, "rl", CHECKPOINT).stages[0]
    assert set(_diff(sft, proof.stages[0])) <= {"name", "end.max_steps", "end.max_epochs", "eval_every", "save_every"}
    assert (sft.end, sft.eval_every, sft.batch_size) == (rl.end, rl.eval_every, rl.batch_size)


def test_every_ablation_changes_one_thing(proof, tmp_path):
    arm = {name: ablation_config(proof, name, CHECKPOINT, tmp_path) for name in ARMS}
    assert _diff(arm["connector_frozen"].stages[0], arm["rl"].stages[0]) == {
        "trainable": (["vision", "llm"], ["vision", "connector", "llm"])}
    higher, symmetric = arm["clip_higher"].stages[0], arm["clip_symmetric"].stages[0]
    assert _diff(higher, symmetric) == {"algo.clip_high": (0.28, 0.2)}
    assert higher.algo.updates_per_batch > 1  # with one update the ratio is 1 and no clip ever binds
    easy, hard = arm["curriculum"].stages
    assert easy.end.max_steps + hard.end.max_steps == arm["rl"].stages[0].end.max_steps
    assert set(easy.data.filter.difficulty).isdisjoint(hard.data.filter.difficulty)
    for stage in (easy, hard):
        assert set(_diff(stage, arm["rl"].stages[0])) <= {"name", "data.filter.difficulty", "end.max_steps"}
    assert _diff(arm["last_connector"].stages[0], arm["last_connector_llm"].stages[0]) == {
        "trainable": (["connector"], ["connector", "llm"])}
    assert ARMS["last_connector"].start == ARMS["last_connector_llm"].start == "rl"
    assert all(ref in ARMS and var in ARMS for ref, var, _ in FINDINGS.values())


def test_bootstrap_ci_is_paired_over_items_and_seeds():
    same = bootstrap_ci([np.zeros(50), np.zeros(50)])
    assert same == {"mean": 0.0, "ci95": [0.0, 0.0], "by_seed": [0.0, 0.0]}
    gain = bootstrap_ci([np.r_[np.ones(30), np.zeros(70)], np.r_[np.ones(10), np.zeros(90)]], reps=2000)
    assert gain["mean"] == 20.0 and gain["by_seed"] == [30.0, 10.0]
    assert 5.0 < gain["ci95"][0] < 20.0 < gain["ci95"][1] < 40.0


def _curve(steps: dict[int, list[int]], entropy: dict[int, float] | None = None) -> Curve:
    points = {s: {"heldout": {"accuracy": sum(v) / len(v), "critical_entropy": (entropy or {}).get(s, float("nan")),
                              "items_by_id": {f"p{i}": (float(c), float("nan")) for i, c in enumerate(v)}}}
              for s, v in steps.items()}
    return Curve(points=points, rewards={s: float(s) for s in steps})


def test_compare_pairs_items_at_the_final_step():
    cold = [0, 0, 1, 1]
    curves = {0: {"rl": _curve({0: cold, 10: [1, 0, 1, 1], 20: [1, 1, 1, 1]}, {10: 2.0, 20: 1.0}),
                  "sft": _curve({0: cold, 10: [0, 0, 1, 1], 20: [0, 1, 1, 1]})}}
    assert compare(curves, "rl", None)["mean"] == 50.0
    assert compare(curves, "rl", "sft")["mean"] == 25.0
    row = entropy_selection(curves)["0"]
    assert (row["entropy_step"], row["accuracy_by_entropy"], row["accuracy_last"]) == (10, 0.75, 1.0)
    assert row["checkpoints"] == 5 and row["defined"] == 2
