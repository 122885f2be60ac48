"""DeepSpeed ZeRO over gloo: the same batch gives the same loss and gradient on 1 rank with one
micro-batch as on 2 ranks with several (token-mean over the global token count), and a rank padded with a
zero-weight sample changes nothing."""
from __future__ import annotations

import json

import pytest
import torch.multiprocessing as mp

from actors.learner_actor import free_port


def _samples(worker, n: int):
    from learner.types import TrainSample
    from rollout.prompts import decode_images, render_prompt
    from services.data.synthetic import generate_problem

    samples = []
    for i in range(n):
        p = generate_problem("count", i)
        text = render_prompt(worker.processor, p.question)
        ids = list(worker.processor(text=[text], images=decode_images(p.images))["input_ids"][0])
        samples.append(TrainSample(ids, list(range(100, 100 + 2 + i)) + [2], p.images, advantage=(-1.0) ** i * (i + 1)))
    return samples


def _run(rank: int, world: int, cases: list[tuple[int, int]], model_path: str, out: str, port: int) -> None:
    """Every (micro-batch size, samples) case on one world: the worker reloads the model for each, as a
    fleet's learner group does between runs (load_weights), so each case starts from the same weights."""
    from learner.types import LearnerConfig, LossConfig, OptimConfig, StageSpec
    from learner.worker import LearnerWorker
    from services.fleet import shard_batch

    worker = LearnerWorker(model_path, LearnerConfig(), rank, world, "127.0.0.1", port)
    results = []
    for micro, n in cases:
        worker.load_weights(model_path, 0, LearnerConfig(micro_batch_size=micro, grad_clip=1e9))
        shard = shard_batch(_samples(worker, n), world)[rank]
        worker.begin_stage(StageSpec("sft", optim=OptimConfig(lr=1e-3), loss=LossConfig(policy_loss="sft")))
        sft = worker.train_step(shard)
        worker.begin_stage(StageSpec("grpo", optim=OptimConfig(lr=1e-3)))  # rebuilds the engine, keeping the SFT-updated weights
        results.append({"sft": sft, "grpo": worker.train_step(shard)})
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)


@pytest.fixture(scope="module")
def metrics(tmp_path_factory, tiny_model_dir):
    """(world, micro, n) -> the step metrics: one spawned world per size runs all of its cases."""
    tmp, path = tmp_path_factory.mktemp("ranks"), tiny_model_dir("internvl")
    cases = {1: [(8, 6), (4, 1)], 2: [(1, 6), (4, 1)]}
    out = {}
    for world, todo in cases.items():
        done = tmp / f"world{world}.json"
        mp.spawn(_run, args=(world, todo, path, str(done), free_port()), nprocs=world)
        out.update({(world, *case): m for case, m in zip(todo, json.loads(done.read_text()))})
    return out


def _assert_same(one, two):
    for phase in ("sft", "grpo"):
        for key in ("actor/loss", "actor/grad_norm", "actor/entropy", "train/tokens", "train/sequences"):
            a, b = one[phase][key], two[phase][key]
            assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (phase, key, a, b)


def test_loss_and_grad_norm_do_not_depend_on_ranks_or_micro_batches(metrics):
    one = metrics[1, 8, 6]
    _assert_same(one, metrics[2, 1, 6])
    assert one["grpo"]["actor/grad_norm"] > 0 and one["sft"]["train/sequences"] == 6


def test_a_zero_weight_padded_rank_leaves_the_batch_loss_unchanged(metrics):
    """One real sample on 2 ranks: rank 1 runs on a zero-weight copy, which must not count twice."""
    _assert_same(metrics[1, 4, 1], metrics[2, 4, 1])
