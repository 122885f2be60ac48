"""One learner rank: the model inside a DeepSpeed ZeRO engine, the GRPO and SFT updates, weight export.

Plain Python: the Ray actor in actors/learner_actor.py is a thin shell around it. All L ranks form one
torch.distributed group (gloo on CPU, nccl on GPU) and run the same calls on their own batch shard.
"""
from __future__ import annotations

import math
import os
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.distributed as dist

from learner import algos
from learner.param_groups import GROUPS, group_of, set_trainable
from learner.types import TrainBatch, TrainSample
from learner.weight_sender import SyncReport, WeightSender
from rollout.prompts import decode_images
from rollout.weight_transport import TRANSPORTS, EngineLink, make_transport


@dataclass
class LearnerConfig:
    """Optimisation and loss settings. Defaults follow P3 §2.4 where the paper states them (clip 0.2
    symmetric, no KL, all modules trainable in RL, one gradient step per episode)."""

    zero_stage: int = 2
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    micro_batch_size: int = 16
    updates_per_batch: int = 1
    trainable: list[str] = field(default_factory=lambda: ["vision", "connector", "llm"])
    clip_low: float = 0.2
    clip_high: float = 0.2
    loss_agg_mode: str = "token-mean"
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    temperature: float = 1.0
    dtype: str = "float32"
    weight_bucket_mb: float = 1.0
    weight_transport: str = "object_store"  # a name in rollout/weight_transport.py TRANSPORTS
    seed: int = 0

    def __post_init__(self):
        if self.weight_transport not in TRANSPORTS:  # a config error at load time, not at the first sync
            raise ValueError(f"unknown weight transport {self.weight_transport!r}; choose one of {sorted(TRANSPORTS)}")


def _torch_dtype(name: str) -> torch.dtype:
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"unsupported dtype {name!r}")
    return getattr(torch, name)


class LearnerWorker:
    def __init__(self, model_path: str, cfg: LearnerConfig, rank: int, world_size: int,
                 master_addr: str, master_port: int, cpu_threads: int = 1):
        import deepspeed
        from transformers import AutoModelForImageTextToText, AutoProcessor

        on_gpu = torch.cuda.is_available()
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK="0")
        if not on_gpu:
            torch.set_num_threads(cpu_threads)
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
        torch.manual_seed(cfg.seed)
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
        self.processor = AutoProcessor.from_pretrained(model_path)
        dtype = _torch_dtype(cfg.dtype)
        model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=dtype)
        self.model_type = model.config.model_type
        self.trainable_params = set_trainable(model, cfg.trainable)
        self.ref_model = None
        if cfg.kl_coef > 0:
            self.ref_model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=dtype).to(self.device)
            self.ref_model.eval().requires_grad_(False)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        ds_config = {
            "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": cfg.grad_clip,
            "zero_optimization": {"stage": cfg.zero_stage},
            "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": dtype == torch.bfloat16},
            "fp16": {"enabled": dtype == torch.float16},
            "steps_per_print": 1 << 30,
        }
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                               model_parameters=params)
        self.version = 0

    # ---- batching -------------------------------------------------------------------------------
    def _model_inputs(self, samples: list[TrainSample]) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """Right-padded prompt+response ids, pixel inputs, labels and the response mask (aligned with
        the logits of the position before each token)."""
        seqs = [s.prompt_token_ids + s.response_token_ids for s in samples]
        width = max(len(s) for s in seqs)
        pad = self.processor.tokenizer.pad_token_id
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        mask = torch.zeros((len(seqs), width - 1), dtype=torch.float32)
        for i, (s, seq) in enumerate(zip(samples, seqs)):
            ids[i, :len(seq)] = torch.tensor(seq)
            attn[i, :len(seq)] = 1
            mask[i, len(s.prompt_token_ids) - 1:len(seq) - 1] = 1.0
        inputs = {"input_ids": ids, "attention_mask": attn}
        if "mm_token_type_ids" in self.processor.model_input_names:  # M-RoPE (Qwen2-VL) needs modality ids
            inputs["mm_token_type_ids"] = torch.tensor(self.processor.create_mm_token_type_ids(ids))
        images = [img for s in samples for img in decode_images(s.images)]
        if images:
            pixel = self.processor.image_processor(images=images, return_tensors="pt")
            inputs["pixel_values"] = pixel["pixel_values"].to(_torch_dtype(self.cfg.dtype))
            if "image_grid_thw" in pixel:
                inputs["image_grid_thw"] = pixel["image_grid_thw"]
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        return inputs, ids[:, 1:].to(self.device), mask.to(self.device)

    def _forward(self, model, samples: list[TrainSample], with_entropy: bool):
        inputs, labels, mask = self._model_inputs(samples)
        logits = model(**inputs).logits[:, :-1].float() / self.cfg.temperature
        logprobs = algos.logprobs_from_logits(logits, labels)
        entropy = algos.entropy_from_logits(logits.detach()) if with_entropy else None
        return logprobs, entropy, mask

    def _micro_batches(self, samples: list[TrainSample]) -> list[list[TrainSample]]:
        """Split the local shard; every rank runs the same number of micro-batches (collectives must
        line up), a rank with fewer samples pads with zero-weight repeats."""
        size = self.cfg.micro_batch_size
        local = torch.tensor([math.ceil(len(samples) / size)], dtype=torch.long)
        dist.all_reduce(local, op=dist.ReduceOp.MAX)
        return [samples[i * size:(i + 1) * size] for i in range(int(local.item()))]

    def _global_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    # ---- updates --------------------------------------------------------------------------------
    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One optimizer step on this rank's shard (GRPO or SFT); returns globally reduced metrics."""
        samples = batch.samples or []
        if not samples:
            raise ValueError("empty training shard: the controller must give every rank samples")
        self.engine.train()
        micro = self._micro_batches(samples)
        tokens = sum(len(s.response_token_ids) for s in samples)
        global_tokens, global_seqs = self._global_sum([tokens, len(samples)])
        stats = {"loss": 0.0, "clip_sum": 0.0, "kl_sum": 0.0, "ent_sum": 0.0, "ppo_kl_sum": 0.0}
        old_logprobs = self._old_logprobs(micro) if batch.kind == "grpo" and self.cfg.updates_per_batch > 1 else None
        for update in range(self.cfg.updates_per_batch if batch.kind == "grpo" else 1):
            for i, chunk in enumerate(micro):
                weight = 1.0 if chunk else 0.0
                chunk = chunk or samples[:1]
                logprobs, entropy, mask = self._forward(self.engine, chunk, with_entropy=update == 0)
                mask = mask * weight
                if batch.kind == "sft":
                    loss = algos.aggregate_loss(-logprobs, mask, "token-mean", loss_token_count=global_tokens)
                    stats["loss"] += loss.item()
                    loss = loss * self.world_size
                else:
                    loss = self._grpo_loss(chunk, logprobs, mask, old_logprobs[i] if old_logprobs else None,
                                           global_tokens, global_seqs, stats)
                if update == 0:
                    stats["ent_sum"] += algos.masked_sum(entropy, mask).item()
                self.engine.set_gradient_accumulation_boundary(i == len(micro) - 1)
                self.engine.backward(loss, scale_wrt_gas=False)
                self.engine.step()
        grad_norm = self.engine.get_global_grad_norm()
        loss, clip, kl, ent, ppo_kl = self._global_sum(list(stats.values()))
        return {"actor/loss": loss / self.cfg.updates_per_batch if batch.kind == "grpo" else loss,
                "actor/pg_clipfrac": clip / (global_tokens * self.cfg.updates_per_batch),
                "actor/kl": kl / (global_tokens * self.cfg.updates_per_batch),
                "actor/ppo_kl": ppo_kl / (global_tokens * self.cfg.updates_per_batch),
                "actor/entropy": ent / global_tokens,
                "actor/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "actor/lr": self.engine.get_lr()[0], "train/tokens": global_tokens,
                "train/sequences": global_seqs}

    def set_lr(self, lr: float) -> None:
        """Phase change (warm-up SFT -> GRPO) keeps the engine and its optimizer state."""
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    def _old_logprobs(self, micro: list[list[TrainSample]]) -> list[torch.Tensor]:
        self.engine.eval()
        with torch.no_grad():
            out = [self._forward(self.engine, c or micro[0][:1], with_entropy=False)[0] for c in micro]
        self.engine.train()
        return out

    def _grpo_loss(self, chunk, logprobs, mask, old_logprobs, global_tokens, global_seqs, stats):
        adv = torch.tensor([s.advantage for s in chunk], dtype=torch.float32, device=self.device)
        adv = algos.expand_to_tokens(adv, mask)
        old = old_logprobs if old_logprobs is not None else logprobs.detach()
        loss, pg = algos.ppo_clip(logprobs, old, adv, mask, clip_low=self.cfg.clip_low, clip_high=self.cfg.clip_high,
                                  loss_agg_mode=self.cfg.loss_agg_mode, loss_token_count=global_tokens,
                                  loss_seq_count=global_seqs, loss_scale=self.world_size)
        stats["loss"] += float(pg["pg_loss"])
        stats["clip_sum"] += float(pg["pg_clipfrac"][0])
        stats["ppo_kl_sum"] += float(pg["ppo_kl"][0])
        if self.ref_model is not None:
            with torch.no_grad():
                ref, _, _ = self._forward(self.ref_model, chunk, with_entropy=False)
            kl = algos.kl_penalty(logprobs, ref, self.cfg.kl_estimator)
            kl_loss = algos.aggregate_loss(kl, mask, "token-mean", loss_token_count=global_tokens)
            loss = loss + self.cfg.kl_coef * kl_loss * self.world_size
            stats["kl_sum"] += algos.masked_sum(kl.detach(), mask).item()
        return loss

    # ---- weights out ----------------------------------------------------------------------------
    def named_weights(self, groups: Collection[str] = GROUPS) -> Iterator[tuple[str, torch.Tensor]]:
        """Full HF-named tensors of the current policy in the given parameter groups. Under ZeRO-3 each
        parameter is gathered (a collective: every rank must iterate) and its tensor is valid only until
        the next one is requested; copy what you keep."""
        module = self.engine.module
        if self.cfg.zero_stage == 3:
            import deepspeed

            for name, param in module.named_parameters():
                if group_of(self.model_type, name) in groups:
                    with deepspeed.zero.GatheredParameters([param]):
                        yield name, param.detach()
        else:
            for name, tensor in module.state_dict().items():
                if group_of(self.model_type, name) in groups:
                    yield name, tensor.detach()

    def trainable_groups(self) -> tuple[str, ...]:
        """The parameter groups the optimizer updates now (vision / connector / llm)."""
        return tuple(g for g in GROUPS if self.trainable_params.get(g, 0) > 0)

    @cached_property
    def weight_sender(self) -> WeightSender:
        transport = make_transport(self.cfg.weight_transport, int(self.cfg.weight_bucket_mb * 2**20))
        return WeightSender(transport, self.rank)

    def sync_weights(self, link: EngineLink | None) -> SyncReport:
        """Send the groups that can have changed as the next version (all ranks call this; rank 0 sends
        through `link`, the others join the ZeRO-3 gathers)."""
        return self.weight_sender.sync(self.next_version(), self.trainable_groups(), self.named_weights, link)

    def next_version(self) -> int:
        self.version += 1
        return self.version

    def probe_logprobs(self, text: str, images: tuple[bytes, ...]) -> tuple[list[int], list[float]]:
        """The learner's side of the weight-sync probe: logprobs of tokens 1..n-1 of a fixed text."""
        inputs = self.processor(text=[text], images=decode_images(images) or None, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        self.engine.eval()
        with torch.no_grad():
            logits = self.engine.module(**inputs).logits[:, :-1].float()
        ids = inputs["input_ids"]
        return ids[0].tolist(), algos.logprobs_from_logits(logits, ids[:, 1:])[0].tolist()

    def save_hf(self, out_dir: str) -> None:
        """Write an HF checkpoint (loadable by transformers and vLLM); collective for ZeRO-3."""
        state = {name: tensor.to("cpu", copy=True) for name, tensor in self.named_weights()}
        if self.rank == 0:
            self.engine.module.save_pretrained(out_dir, state_dict=state)
            self.processor.save_pretrained(out_dir)
        dist.barrier()
