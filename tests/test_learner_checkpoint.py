"""ZeRO-3 ranks build the model partitioned; a resumable checkpoint of 2 ZeRO-3 ranks, written in shards of a
small size limit: transformers loads its weights export, and the steps after it are the same when resumed
on the same 2 ranks (each reading its own partitions' slices) and on 1 rank under ZeRO-2 (full tensors by
name)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from actors.learner_actor import free_port

SHARD_MB = 1.0  # the tiny model's weights take several shards at this size


def _samples(worker, n: int = 4):
    from learner.types import TrainSample
    from rollout.prompts import decode_images, render_prompt
    from services.data.synthetic import generate_problem

    samples = []
    for i in range(n):
        p = generate_problem("count", i)
        text = render_prompt(worker.processor, p.question)
        ids = list(worker.processor(text=[text], images=decode_images(p.images))["input_ids"][0])
        samples.append(TrainSample(ids, list(range(100, 104 + i)) + [2], p.images, advantage=(-1.0) ** i * (i + 1)))
    return samples


def _spec():
    from learner.types import OptimConfig, StageSpec

    return StageSpec("grpo", total_steps=4, optim=OptimConfig(lr=1e-3))


def _step(worker, world: int, rank: int) -> dict:
    from services.fleet import shard_batch

    metrics = worker.train_step(shard_batch(_samples(worker), world)[rank])
    return {k: metrics[k] for k in ("actor/loss", "actor/grad_norm")}


def _save_then_resume(rank: int, world: int, model_path: str, out: str, port: int) -> None:
    """Two steps, save, two more; then the checkpoint resumed on the same world and its two steps (the
second moves the weights by the restored AdamW moments)."""
    from learner.types import LearnerConfig, TrainBatch
    from learner.worker import LearnerWorker

    cfg = LearnerConfig(zero_stage=3, micro_batch_size=2, checkpoint_shard_mb=SHARD_MB)
    worker = LearnerWorker(model_path, cfg, rank, world, "127.0.0.1", port)
    # built partitioned (no rank holds the whole model), yet whole to a forward pass and to named_weights
    built = {"partitioned": all(p.numel() == 0 for p in worker._module().parameters()),
             "loss": worker.evaluate_responses(TrainBatch(_samples(worker)))["loss"],
             "numel": sum(t.numel() for _, t in worker.named_weights())}
    worker.begin_stage(_spec())
    for _ in range(2):
        _step(worker, world, rank)
    worker.save_training_state(f"{out}/ckpt")
    straight = [_step(worker, world, rank) for _ in range(2)]
    worker.load_weights(f"{out}/ckpt", 2, cfg)
    worker.begin_stage(_spec())
    worker.load_training_state(f"{out}/ckpt")
    resumed = [_step(worker, world, rank) for _ in range(2)]
    if rank == 0:
        Path(f"{out}/zero3.json").write_text(json.dumps({"straight": straight, "resumed": resumed,
                                                         "stage_step": worker.stage_step, "built": built}))


def _resume_on_one_rank(rank: int, model_path: str, out: str, port: int) -> None:
    from learner.types import LearnerConfig
    from learner.worker import LearnerWorker

    worker = LearnerWorker(f"{out}/ckpt", LearnerConfig(zero_stage=2, micro_batch_size=4), rank, 1, "127.0.0.1", port)
    worker.begin_stage(_spec())
    worker.load_training_state(f"{out}/ckpt")
    Path(f"{out}/zero2.json").write_text(json.dumps([_step(worker, 1, rank) for _ in range(2)]))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    out, path = str(tmp_path_factory.mktemp("ckpt")), tiny_model_dir("internvl")
    mp.spawn(_save_then_resume, args=(2, path, out, free_port()), nprocs=2)
    mp.spawn(_resume_on_one_rank, args=(path, out, free_port()), nprocs=1)
    return Path(out), json.loads(Path(out, "zero3.json").read_text()), json.loads(Path(out, "zero2.json").read_text())


def test_the_checkpoint_is_sharded_and_transformers_loads_its_weights(runs, tiny_model_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    from learner.checkpoint_files import missing_checkpoint_files

    out, *_ = runs
    ckpt = out / "ckpt"
    shards = sorted(ckpt.glob("model-*.safetensors"))
    assert len(shards) > 1 and all(s.stat().st_size <= SHARD_MB * 2**20 + 2**16 for s in shards)
    assert len(list((ckpt / "optimizer").glob("adamw-*.safetensors"))) > 1
    assert missing_checkpoint_files(str(ckpt)) == []
    saved = {}
    for shard in shards:
        saved.update(load_file(shard))
    model = AutoModelForImageTextToText.from_pretrained(str(ckpt), dtype=torch.float32)
    start = AutoModelForImageTextToText.from_pretrained(tiny_model_dir("internvl"), dtype=torch.float32)
    state, before = model.state_dict(), start.state_dict()
    assert set(saved) == set(state)
    assert all(torch.equal(state[n], t) for n, t in saved.items())
    assert any(not torch.equal(state[n], before[n]) for n in state)  # the trained weights, not the start's


def _close(a: list[dict], b: list[dict], rel: float) -> None:
    for step, (x, y) in enumerate(zip(a, b, strict=True)):
        for key in x:
            assert abs(x[key] - y[key]) <= rel * max(1.0, abs(x[key])), (step, key, x[key], y[key])


def test_resumed_on_the_same_ranks_the_next_step_is_the_same(runs):
    _, zero3, _ = runs
    _close(zero3["straight"], zero3["resumed"], 1e-6)
    assert zero3["stage_step"] == 4


def test_zero3_ranks_build_the_model_partitioned(runs, tiny_model_dir):
    from transformers import AutoModelForImageTextToText

    _, zero3, _ = runs
    whole = AutoModelForImageTextToText.from_pretrained(tiny_model_dir("internvl"))
    assert zero3["built"]["partitioned"] and zero3["built"]["loss"] > 0
    assert zero3["built"]["numel"] == sum(p.numel() for p in whole.parameters())


def test_resumed_on_one_zero2_rank_the_next_step_is_the_same(runs):
    _, zero3, zero2 = runs
    _close(zero3["straight"], zero2, 1e-4)
