"""DeepSpeed ZeRO over gloo: the same batch gives the same loss and gradient on 1 rank with one
micro-batch as on 2 ranks with several (token-mean over the global token count), and a rank padded with a
zero-weight sample changes nothing."""
from __future__ import annotations

import json

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


def _run(rank: int, world: int, micro: int, n: int, model_path: str, out: str, port: int) -> None:
    from learner.types import LossConfig, OptimConfig, StageSpec
    from learner.types import LearnerConfig
    from learner.worker import LearnerWorker
    from services.fleet import shard_batch

    worker = LearnerWorker(model_path, LearnerConfig(micro_batch_size=micro, grad_clip=1e9), rank, world,
                           "127.0.0.1", port)
    shard = shard_batch(_samples(worker, n), world)[rank]
    worker.begin_stage(StageSpec("sft", optim=OptimConfig(lr=1e-3), loss=LossConfig(policy_loss="sft")))
    sft = worker.train_step(shard)
    worker.begin_stage(StageSpec("grpo", optim=OptimConfig(lr=1e-3)))  # rebuilds the engine, keeping the SFT-updated weights
    grpo = worker.train_step(shard)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"sft": sft, "grpo": grpo}, f)


def _metrics(tmp_path, world, micro, n, model_path):
    out = tmp_path / f"m{world}-{micro}-{n}.json"
    mp.spawn(_run, args=(world, micro, n, model_path, str(out), free_port()), nprocs=world)
    return json.loads(out.read_text())


def _assert_same(one, two):
    for phase in ("sft", "grpo"):
        for key in ("actor/loss", "actor/grad_norm", "actor/entropy", "train/tokens", "train/sequences"):
            a, b = one[phase][key], two[phase][key]
            assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (phase, key, a, b)


def test_loss_and_grad_norm_do_not_depend_on_ranks_or_micro_batches(tmp_path, tiny_model_dir):
    path = tiny_model_dir("internvl")
    one = _metrics(tmp_path, 1, 8, 6, path)
    _assert_same(one, _metrics(tmp_path, 2, 1, 6, path))
    assert one["grpo"]["actor/grad_norm"] > 0 and one["sft"]["train/sequences"] == 6


def test_a_zero_weight_padded_rank_leaves_the_batch_loss_unchanged(tmp_path, tiny_model_dir):
    """One real sample on 2 ranks: rank 1 runs on a zero-weight copy, which must not count twice."""
    path = tiny_model_dir("internvl")
    alone = _metrics(tmp_path, 1, 4, 1, path)
    padded = _metrics(tmp_path, 2, 4, 1, path)
    _assert_same(alone, padded)
    assert padded["sft"]["train/tokens"] == 3 and padded["sft"]["train/sequences"] == 1
