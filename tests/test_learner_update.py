"""The learner group's GRPO update equals a plain single-process PyTorch reference written here: the same
batch and the same starting weights give the same loss, gradient norm and updated weights (float32), on 1
rank with one micro-batch and on 2 ranks with several, over two steps (so AdamW's moments and bias
correction count) and with gradient clipping active. `python -m bench.vs_trl --same-batch` checks the same
property against TRL's GRPO loss."""
from __future__ import annotations

import json

import pytest
import torch
import torch.multiprocessing as mp

from actors.learner_actor import free_port

LR, CLIP, STEPS, N_PROMPTS, GROUP = 1e-4, 1.0, 2, 4, 3
TEMPERATURE = 0.7  # a stage sampling at 0.7 trains the policy at 0.7 (it used a run-wide 1.0)
INIT_SCALE = 0.02  # the tiny model's initializer_range


def _batches(processor) -> list[list]:
    """STEPS batches of N_PROMPTS x GROUP samples: real prompts with images, responses of other lengths,
    GRPO advantages from seeded rewards."""
    from learner import algos
    from learner.types import TrainSample
    from rollout.prompts import decode_images, render_prompt
    from services.data.synthetic import generate_problem

    g = torch.Generator().manual_seed(0)
    batches = []
    for step in range(STEPS):
        samples, rewards, groups = [], [], []
        for i in range(N_PROMPTS):
            problem = generate_problem("count", step * N_PROMPTS + i)
            text = render_prompt(processor, problem.question)
            prompt = list(processor(text=[text], images=decode_images(problem.images))["input_ids"][0])
            for _ in range(GROUP):
                length = int(torch.randint(3, 12, (1,), generator=g))
                samples.append(TrainSample(prompt, torch.randint(100, 500, (length,), generator=g).tolist() + [2],
                                           problem.images))
                rewards.append(float(torch.rand(1, generator=g)))
                groups.append(i)
        for sample, advantage in zip(samples, algos.grpo(torch.tensor(rewards), groups).tolist()):
            sample.advantage = advantage
        batches.append(samples)
    return batches


def _vireo(rank: int, world: int, micro: int, model_path: str, out: str, port: int) -> None:
    from safetensors.torch import save_file

    from learner.types import OptimConfig, StageSpec
    from learner.types import LearnerConfig
    from learner.worker import LearnerWorker
    from services.fleet import shard_batch

    worker = LearnerWorker(model_path, LearnerConfig(micro_batch_size=micro, grad_clip=CLIP), rank, world,
                           "127.0.0.1", port)
    worker.begin_stage(StageSpec("grpo", total_steps=STEPS, optim=OptimConfig(lr=LR), temperature=TEMPERATURE))
    metrics = [worker.train_step(shard_batch(batch, world)[rank]) for batch in _batches(worker.processor)]
    weights = {name: tensor.to("cpu", copy=True) for name, tensor in worker.named_weights()}
    if rank == 0:
        save_file(weights, out + ".safetensors")
        with open(out + ".json", "w") as f:
            json.dump(metrics, f)


def _reference(model_path: str) -> tuple[list[dict], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Plain PyTorch: the whole batch in one forward, token-mean PPO-clip loss (ratio 1 on-policy), one
    backward, clip_grad_norm_, AdamW.step — what TRL's Trainer does with loss_type="dapo"."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from rollout.prompts import decode_images

    processor = AutoProcessor.from_pretrained(model_path)
    model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=torch.float32)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    model.train()
    metrics = []
    for batch in _batches(processor):
        seqs = [s.prompt_token_ids + s.response_token_ids for s in batch]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), processor.tokenizer.pad_token_id)
        attention = torch.zeros_like(ids)
        mask = torch.zeros(len(seqs), width - 1)
        for i, (s, seq) in enumerate(zip(batch, seqs)):
            ids[i, :len(seq)], attention[i, :len(seq)] = torch.tensor(seq), 1
            mask[i, len(s.prompt_token_ids) - 1:len(seq) - 1] = 1
        pixels = processor.image_processor(images=[im for s in batch for im in decode_images(s.images)],
                                           return_tensors="pt")["pixel_values"]
        logits = model(input_ids=ids, attention_mask=attention, pixel_values=pixels).logits[:, :-1].float() / TEMPERATURE
        logprobs = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        advantages = torch.tensor([s.advantage for s in batch])[:, None]
        ratio = torch.exp(logprobs - logprobs.detach())
        per_token = -torch.minimum(ratio * advantages, ratio.clamp(0.8, 1.2) * advantages)
        loss = (per_token * mask).sum() / mask.sum()
        optimizer.zero_grad()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        metrics.append({"actor/loss": loss.item(), "actor/grad_norm": grad_norm.item()})
    return metrics, start, model.state_dict()


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return _reference(tiny_model_dir("internvl"))


@pytest.mark.parametrize("world,micro", [(1, 12), (2, 4)])
def test_the_learner_update_equals_a_plain_pytorch_reference(tmp_path, tiny_model_dir, reference, world, micro):
    from safetensors.torch import load_file

    out = str(tmp_path / f"vireo-{world}-{micro}")
    mp.spawn(_vireo, args=(world, micro, tiny_model_dir("internvl"), out, free_port()), nprocs=world)
    metrics, weights = json.loads(open(out + ".json").read()), load_file(out + ".safetensors")
    ref_metrics, start, ref_weights = reference
    assert ref_metrics[0]["actor/grad_norm"] > CLIP  # clipping is active
    for got, want in zip(metrics, ref_metrics):
        for key in ("actor/loss", "actor/grad_norm"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
    assert set(weights) <= set(ref_weights)
    for name, tensor in weights.items():  # relative to the tensor's scale, at least the init scale (a zero-init
        scale = ref_weights[name].abs().max().clamp(min=INIT_SCALE)  # bias holds only its update)
        assert (tensor - ref_weights[name]).abs().max() / scale <= 1e-4, name
    update = sum((ref_weights[n] - start[n]).pow(2).sum() for n in weights).sqrt()
    mismatch = sum((weights[n] - ref_weights[n]).pow(2).sum() for n in weights).sqrt()
    assert update > 0 and mismatch / update <= 1e-3  # the update itself, not only the weights, agrees
