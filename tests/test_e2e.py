"""End to end through Ray, vLLM (CPU build), the reward actor and DeepSpeed ZeRO-2 with 2 learner ranks."""
from __future__ import annotations

import json

import pytest
import ray

from services.config import load_config
from services.controller import Controller
from services.tracking import read_metrics

REQUIRED = ["step", "reward/mean", "reward/accuracy", "reward/format", "actor/entropy", "actor/pg_clipfrac",
            "actor/kl", "response_length/mean", "sync/version", "sync/logprob_diff_max", "timing_s/gen",
            "timing_s/reward", "timing_s/train", "timing_s/sync", "timing_s/step", "perf/tokens_per_s"]


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("arch", ["internvl", "qwen2_vl"])
def test_grpo_steps_end_to_end(ray_local, tiny_model_dir, tiny_data_dir, tmp_path, arch):
    cfg = load_config(None, [
        f"model.path={tiny_model_dir(arch)}", f"data.train={tiny_data_dir / 'train.parquet'}",
        f"data.heldout={tiny_data_dir / 'heldout.parquet'}", "rollout.num_actors=2", "rollout.n=4",
        "rollout.max_tokens=12", "learner.num_ranks=2", "learner.optim.micro_batch_size=8",
        "learner.optim.lr=1e-3", "trainer.sft_steps=2", "trainer.sft_batch_size=8", "trainer.steps=3",
        "trainer.prompts_per_step=4", "trainer.drop_uniform_groups=false", "trainer.eval_limit=8",
        "reward.workers=1",
    ])
    controller = Controller(cfg, tmp_path / "run", log=lambda *_: None)
    try:
        report = controller.run()
        rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "reward/mean" in r]
        assert [r["step"] for r in rows] == [1, 2, 3]
        for row in rows:
            missing = [k for k in REQUIRED if k not in row]
            assert not missing, missing
            assert row["sync/logprob_diff_max"] < 1e-3  # float32 on both sides
            assert 0.0 <= row["reward/mean"] <= 1.0
        # SFT warm-up synced version 1; each GRPO step one more, on every rollout actor
        assert [r["sync/version"] for r in rows] == [2, 3, 4]
        assert controller.versions() == [4, 4]
        saved = json.loads((tmp_path / "run" / "report.json").read_text())
        assert saved["heldout_accuracy_final"] == report["heldout_accuracy_final"]
        final_ckpt = tmp_path / "run" / "checkpoints" / "final"
        assert (final_ckpt / "model.safetensors").exists()
        assert saved["eval"][-1]["checkpoint"] == str(final_ckpt) and saved["eval"][-1]["step"] == 3
        if arch == "internvl":  # `vireo eval` on the final checkpoint reproduces training's held-out figure
            from services.evaluation import EvalOptions, evaluate_model

            summary = evaluate_model(str(final_ckpt), str(tiny_data_dir / "heldout.parquet"),
                                     EvalOptions(max_tokens=cfg.rollout.max_tokens, limit=cfg.trainer.eval_limit),
                                     out_dir=str(tmp_path / "eval"))
            assert summary["scored"] == cfg.trainer.eval_limit
            assert abs(summary["accuracy"] - report["heldout_accuracy_final"]) <= 0.01
            assert (tmp_path / "eval" / "results.jsonl").read_text().count("\n") == cfg.trainer.eval_limit
    finally:
        for actor in controller.rollouts + controller.learners.actors + [controller.reward]:
            ray.kill(actor)
