"""The proof and ablation configs (issue 10) load, and each ablation arm differs from its reference in
exactly the setting the paper's finding is about (R1V3 §3.4, §5.2, §5.3, §5.5)."""
import dataclasses
from pathlib import Path

from omegaconf import OmegaConf

from bench.ablations import ABLATIONS, ARMS
from bench.learning import control_config
from services.checks import load_config


def _arm(name: str, extra: list[str] = ()):
    config, overrides, _ = ARMS[name]
    return load_config(f"{ABLATIONS}/{config}.yaml", [*overrides, *extra])


def _diff(a, b) -> dict:
    """Flattened keys where two stage configs differ."""
    fa, fb = (OmegaConf.to_container(OmegaConf.structured(x)) for x in (a, b))

    def flat(d, prefix=""):
        for k, v in d.items():
            yield from flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [(prefix + k, v)]
    fa, fb = dict(flat(fa)), dict(flat(fb))
    return {k: (fa.get(k), fb.get(k)) for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k)}


def test_proof_is_the_demo_without_its_last_stage():
    proof, demo = load_config("configs/proof.yaml"), load_config("configs/demo.yaml")
    assert [s.name for s in proof.stages] == ["coldstart", "grpo"]
    assert set(_diff(proof.stages[0], demo.stages[0])) == {"end.max_steps"}  # only a shorter warm-up
    assert dataclasses.asdict(proof.stages[1]) == dataclasses.asdict(demo.stages[1])
    assert proof.data == demo.data and proof.data.n_heldout >= 200


def test_control_is_the_proof_grpo_stage_with_random_reward(tmp_path):
    run = tmp_path / "proof-run"
    cfg = load_config(str(control_config(Path("configs/proof.yaml"), run, 3, tmp_path / "c.yaml")))
    proof_grpo = load_config("configs/proof.yaml").stages[1]
    assert [dataclasses.asdict(s) for s in cfg.stages] == [dataclasses.asdict(proof_grpo)]
    assert (cfg.reward.kind, cfg.reward.seed) == ("random", 3)
    assert cfg.model.path == str(run / "checkpoints" / "coldstart")
    assert cfg.data.heldout == str(run / "data" / "heldout.parquet")


def test_rl_ablations_change_one_thing_each():
    reference = _arm("reference").stages[0]
    assert _diff(_arm("connector_frozen").stages[0], reference) == {"trainable": (["vision", "llm"],
                                                                                  ["vision", "connector", "llm"])}
    higher, symmetric = _arm("clip_higher").stages[0], _arm("clip_symmetric").stages[0]
    assert _diff(higher, symmetric) == {"algo.clip_high": (0.28, 0.2)}
    assert higher.algo.updates_per_batch > 1  # with one update the ratio is 1 and no clip ever binds
    easy, hard = _arm("curriculum").stages
    assert easy.end.max_steps + hard.end.max_steps == reference.end.max_steps
    assert set(easy.data.filter.difficulty).isdisjoint(hard.data.filter.difficulty)
    for stage in (easy, hard):
        assert set(_diff(stage, reference)) <= {"name", "data.filter.difficulty", "end.max_steps", "eval_every"}


def test_last_stage_arms_differ_in_trainable_groups_only():
    only, with_llm = _arm("last_connector").stages[0], _arm("last_connector_llm").stages[0]
    assert _diff(only, with_llm) == {"trainable": (["connector"], ["connector", "llm"])}
    assert ARMS["last_connector"][2] == ARMS["last_connector_llm"][2] == "grpo"
