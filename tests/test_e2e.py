"""End to end through Ray, vLLM (CPU build), the reward actor and DeepSpeed ZeRO-2 with 2 learner ranks: the
recipe's three stages (SFT -> GRPO with a frozen connector -> connector-only SFT) on the tiny InternVL,
judged on an MMMU-layout held-out file; a two-stage run on Qwen2-VL."""
from __future__ import annotations

import json

import pytest
from transformers import AutoModelForImageTextToText

from learner.param_groups import group_of
from fleets import FLEET_LAYOUT, run_on
from mmmu_layout import mmmu_row, write_mmmu

from services.checks import load_config
from services.run import Run
from services.data.loading import load_problems
from services.run_dir import read_jsonl

REQUIRED = ["step", "reward/mean", "reward/accuracy", "reward/format", "actor/entropy", "actor/critical_entropy",
            "actor/critical_token_rate", "actor/high_entropy_fraction", "actor/pg_clipfrac",
            "actor/kl", "response_length/mean", "sync/version", "sync/logprob_diff_max", "rollout/logprob_diff_max",
            "rollout/logprob_diff_mean", "offpolicy/is_ratio_mean", "offpolicy/masked_fraction",
            "offpolicy/behaviour_kl", "timing_s/gen",
            "timing_s/reward", "timing_s/train", "timing_s/sync", "timing_s/step", "perf/tokens_per_s"]


def write_mmmu_layout(problems, path) -> str:
    """Synthetic problems in MMMU's published layout, multiple-choice and open rows."""
    return write_mmmu([mmmu_row(i + 1, p.question.replace("<image>", "<image 1>").split("\nA. ")[0], list(p.options),
                                p.answer, p.images[0]) for i, p in enumerate(problems)], path)


def _run(tmp_path, model, train, heldout, stages_yaml: str, extra=(), fleet=None):
    """On the suite's warm fleet when given one, else on a fleet the run starts (and ends) itself."""
    config = tmp_path / "stages.yaml"
    config.write_text(stages_yaml)
    cfg = load_config(str(config), [
        f"model.path={model}", f"data.train={train}", f"data.heldout={heldout}", *FLEET_LAYOUT,
        "learner.optim.micro_batch_size=8", "evaluation.max_tokens=12", "reward.workers=1", *extra])
    report = run_on(fleet, cfg, tmp_path / "run") if fleet else Run(cfg, tmp_path / "run", log=lambda *_: None).run()
    return cfg, report


THREE_STAGES = """
stages:
  - {name: cold, kind: sft, batch_size: 16, optim: {lr: 2.0e-3}, end: {max_steps: 40}}
  - {name: rl, kind: grpo, batch_size: 4, trainable: [vision, llm], optim: {lr: 1.0e-3, weight_decay: 0.1},
     sampling: {n: 4, max_tokens: 12}, algo: {drop_uniform_groups: false}, end: {max_steps: 3}}
  - {name: conn, kind: sft, batch_size: 8, trainable: [connector], optim: {lr: 1.0e-3, schedule: cosine},
     end: {max_steps: 2}}
"""


@pytest.fixture(scope="module")
def three_stage_run(fleet, tiny_model_dir, tiny_data_dir, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("e2e")
    heldout = write_mmmu_layout(load_problems(tiny_data_dir / "heldout.parquet").problems, tmp_path / "mmmu.parquet")
    cfg, report = _run(tmp_path, tiny_model_dir("internvl"), tiny_data_dir / "train.parquet", heldout, THREE_STAGES,
                       fleet=fleet)
    return tmp_path, cfg, report, heldout


def test_three_stages_report_and_metrics(three_stage_run):
    tmp_path, cfg, report, _ = three_stage_run
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    stages = saved["stages"]
    assert [(s["name"], s["kind"], s["start_step"], s["end_step"], s["end_reason"]) for s in stages] == [
        ("cold", "sft", 0, 40, "max_steps"), ("rl", "grpo", 40, 43, "max_steps"), ("conn", "sft", 43, 45, "max_steps")]
    assert [s["trainable"] for s in stages] == [["vision", "connector", "llm"], ["vision", "llm"], ["connector"]]
    for s in stages:
        assert (tmp_path / "run" / "checkpoints" / s["name"] / "model.safetensors").exists()
        assert s["checkpoint"] == str(tmp_path / "run" / "checkpoints" / s["name"])
    assert saved["final_checkpoint"] == stages[-1]["checkpoint"]
    ranking = saved["checkpoint_ranking"]  # every stage-end checkpoint, judged on the primary held-out set
    assert sorted(r["checkpoint"] for r in ranking) == sorted(s["checkpoint"] for s in stages)
    assert {"step", "checkpoint", "critical_entropy", "heldout_accuracy", "reward_mean"} <= set(ranking[0])
    assert "critical_entropy_accuracy_spearman" in saved
    final_eval = [e for e in saved["eval"] if e["checkpoint"] == stages[-1]["checkpoint"]][0]
    assert final_eval["entropy"] > 0  # measured by the learner on the model's own held-out responses
    items = read_jsonl(tmp_path / "run" / final_eval["items"])  # one row per problem, for paired comparisons
    assert final_eval["items"] == "eval_items/step000045-heldout.jsonl" and len(items) == 16
    assert set(items[0]) == {"id", "subject", "correct", "sampled_correct"}
    assert sum(i["correct"] for i in items) / 16 == final_eval["accuracy"]
    assert sum(i["sampled_correct"] for i in items) / 16 == pytest.approx(final_eval["accuracy_sampled"])
    assert "critical_entropy_after" in final_eval
    assert saved["heldout_accuracy_final"] == stages[-1]["heldout_accuracy"] == report["heldout_accuracy_final"]
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    grpo = [r for r in rows if "reward/mean" in r]
    assert [r["step"] for r in grpo] == [41, 42, 43] and {r["stage"] for r in grpo} == {"rl"}
    for row in grpo:
        missing = [k for k in REQUIRED if k not in row]
        assert not missing, missing
        assert row["sync/logprob_diff_max"] < 1e-3  # float32 on both sides
        assert row["rollout/logprob_diff_max"] < 1e-3  # the learner trains the policy that sampled
        # synchronous: the engine sampled with the learner's weights, so the behaviour ratio is 1 and nothing is
        # masked (algo.offpolicy_correction none still measures it)
        assert row["offpolicy/is_ratio_mean"] == pytest.approx(1.0, abs=1e-3)
        assert row["offpolicy/masked_fraction"] == 0.0 and abs(row["offpolicy/behaviour_kl"]) < 1e-5
    # the SFT stage syncs once, for its end-of-stage evaluation; then one version per GRPO step
    assert [r["sync/version"] for r in grpo] == [2, 3, 4]
    events = [(r["event"], r["stage"], r["step"]) for r in rows if "event" in r]
    assert events == [("stage_start", "cold", 0), ("stage_end", "cold", 40), ("stage_start", "rl", 40),
                      ("stage_end", "rl", 43), ("stage_start", "conn", 43), ("stage_end", "conn", 45)]
    sft_rows = [r for r in rows if r.get("stage") == "cold" and "actor/loss" in r]
    assert len(sft_rows) == 40 and sft_rows[-1]["actor/loss"] < sft_rows[0]["actor/loss"]


def _groups(checkpoint) -> dict[str, dict]:
    """The checkpoint's tensors by parameter group, as transformers loads them (HF names)."""
    model = AutoModelForImageTextToText.from_pretrained(checkpoint)
    out: dict[str, dict] = {"vision": {}, "connector": {}, "llm": {}}
    for name, tensor in model.state_dict().items():
        out[group_of(model.config.model_type, name)][name] = tensor
    return out


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_frozen_means_frozen(three_stage_run):
    tmp_path, *_ = three_stage_run
    cold, rl, conn = (_groups(tmp_path / "run" / "checkpoints" / n) for n in ("cold", "rl", "conn"))
    # GRPO with the connector frozen: the connector is bit-identical, vision and LLM moved (AdamW's decoupled
    # weight decay moves every parameter the optimiser holds, even where a group's advantages are all 0)
    assert _same(cold["connector"], rl["connector"])
    assert not _same(cold["llm"], rl["llm"]) and not _same(cold["vision"], rl["vision"])
    # connector-only: vision and LLM bit-identical, the connector moved
    assert _same(rl["vision"], conn["vision"]) and _same(rl["llm"], conn["llm"])
    assert not _same(rl["connector"], conn["connector"])


def test_training_heldout_accuracy_is_what_vireo_eval_gives(three_stage_run):
    from services.evaluation import EvalOptions, evaluate_model

    tmp_path, cfg, report, heldout = three_stage_run
    last = report["stages"][-1]
    summary = evaluate_model(last["checkpoint"], heldout, EvalOptions(max_tokens=cfg.evaluation.max_tokens),
                             out_dir=str(tmp_path / "eval"))
    assert summary["protocol"] == "mmmu" and summary["scored"] == 16
    assert 0.0 < summary["accuracy"] < 1.0
    assert summary["accuracy"] == last["heldout_accuracy"]


def test_qwen2_vl_two_stages(ray_session, tiny_model_dir, tiny_data_dir, tmp_path):
    _, report = _run(tmp_path, tiny_model_dir("qwen2_vl"), tiny_data_dir / "train.parquet",
                     tiny_data_dir / "heldout.parquet", """
stages:
  - {name: cold, kind: sft, batch_size: 8, optim: {lr: 1.0e-3}, end: {max_steps: 2}}
  - {name: rl, kind: grpo, batch_size: 4, optim: {lr: 1.0e-3, weight_decay: 0.1}, sampling: {n: 4, max_tokens: 12},
     algo: {drop_uniform_groups: false, loss_agg_mode: seq-mean-token-mean, kl_coef: 0.01, kl_estimator: k2}, end: {max_steps: 2}}
""", extra=["rollout.num_actors=1", "rollout.spares=0", "learner.num_ranks=1"])  # a fleet of its own
    assert [s["end_step"] for s in report["stages"]] == [2, 4]
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "reward/mean" in r]
    assert len(rows) == 2 and rows[-1]["sync/logprob_diff_max"] < 1e-3
    assert rows[0]["actor/kl"] == 0 < rows[-1]["actor/kl"]  # the reference: the policy as the stage started


def test_make_coldstart_keeps_only_correct_formatted_traces(three_stage_run, tiny_data_dir, fleet):
    """Rejection sampling with the run's cold-start checkpoint; the output is an SFT stage's data."""
    from reward.compose import RewardScorer
    from reward.types import ScoreRequest
    from services.coldstart import make_coldstart

    tmp_path, _, report, _ = three_stage_run
    out = tmp_path / "traces.parquet"
    summary = make_coldstart(report["stages"][0]["checkpoint"], str(tiny_data_dir / "train.parquet"), str(out),
                             samples=8, max_per_problem=2, max_tokens=24, limit=24, fleet=fleet, log=lambda *_: None)
    assert summary["problems"] == 24 and summary["samples"] == 24 * 8
    kept = load_problems(out, require_solution=True).problems
    assert len(kept) == summary["traces"] and 0 < summary["problems_kept"] <= 24
    per_problem: dict[str, int] = {}
    for p in kept:
        base = p.id.split("#")[0]
        per_problem[base] = per_problem.get(base, 0) + 1
    assert len(per_problem) == summary["problems_kept"] and max(per_problem.values()) <= 2
    with RewardScorer() as scorer:
        results = scorer.score_batch([ScoreRequest(p.solution, p.answer, p.answer_type, p.options) for p in kept])
    assert all(r.parts == {"accuracy": 1.0, "format": 1.0} for r in results)
