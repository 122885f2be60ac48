"""DeepSpeed ZeRO over gloo: the same batch gives the same loss and gradient on 1 rank with one
micro-batch as on 2 ranks with several (token-mean over the global token count)."""
from __future__ import annotations

import json

import torch.multiprocessing as mp

from actors.learner_actor import free_port


def _run(rank: int, world: int, micro: int, model_path: str, out: str, port: int) -> None:
    from learner.types import TrainBatch, TrainSample
    from learner.worker import LearnerConfig, LearnerWorker
    from rollout.prompts import decode_images, render_prompt
    from services.synthetic import generate_problem

    worker = LearnerWorker(model_path, LearnerConfig(micro_batch_size=micro, lr=1e-3, grad_clip=1e9), rank, world,
                           "127.0.0.1", port)
    samples = []
    for i in range(6):
        p = generate_problem("count", i)
        text = render_prompt(worker.processor, p.question)
        ids = list(worker.processor(text=[text], images=decode_images(p.images))["input_ids"][0])
        samples.append(TrainSample(ids, list(range(100, 100 + 2 + i)) + [2], p.images, advantage=(-1.0) ** i * (i + 1)))
    shard = samples[rank::world]
    sft = worker.train_step(TrainBatch(shard, "sft"))
    grpo = worker.train_step(TrainBatch(shard, "grpo"))
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"sft": sft, "grpo": grpo}, f)


def _metrics(tmp_path, world, micro, model_path):
    out = tmp_path / f"m{world}-{micro}.json"
    mp.spawn(_run, args=(world, micro, model_path, str(out), free_port()), nprocs=world)
    return json.loads(out.read_text())


def test_loss_and_grad_norm_do_not_depend_on_ranks_or_micro_batches(tmp_path, tiny_model_dir):
    path = tiny_model_dir("internvl")
    one = _metrics(tmp_path, 1, 8, path)
    two = _metrics(tmp_path, 2, 1, path)
    for phase in ("sft", "grpo"):
        for key in ("actor/loss", "actor/grad_norm", "actor/entropy", "train/tokens"):
            a, b = one[phase][key], two[phase][key]
            assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (phase, key, a, b)
    assert one["grpo"]["actor/grad_norm"] > 0
