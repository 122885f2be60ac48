"""One learner rank: the model inside a DeepSpeed ZeRO engine, the GRPO and SFT updates, weight export.

Plain Python: the Ray actor in actors/learner_actor.py is a thin shell around it. All L ranks form one
torch.distributed group (gloo on CPU, nccl on GPU) and run the same calls on their own batch shard.
"""
from __future__ import annotations

import gc
import math
import os
from collections.abc import Collection, Iterable, Iterator
from contextlib import nullcontext
from functools import cached_property

import torch
import torch.distributed as dist

from learner import algos
from learner.checkpoint_files import OPTIMIZER, WEIGHTS, ShardReader, write_shards
from learner.critical_tokens import (N_STATS, critical_markers, entropy_metrics, entropy_stats,
                                     separator_ids)
from learner.extensions import build_native_extensions
from learner.param_groups import group_of, set_trainable
from learner.schedules import lr_at
from learner.types import DTYPES, GROUPS, LearnerConfig, StageSpec, TrainBatch, TrainSample
from learner.weight_sender import SyncReport, WeightSender
from rollout.prompts import decode_images
from rollout.weight_transport import EngineLink, make_transport

ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")
# Parameters an architecture may tie to another (absent from a gathered ZeRO-3 state, restored by tying).
_TIED_SUFFIXES = ("lm_head.weight",)


def _torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; known: {', '.join(DTYPES)}")
    return getattr(torch, name)


class LearnerWorker:
    def __init__(self, model_path: str, cfg: LearnerConfig, rank: int, world_size: int,
                 master_addr: str, master_port: int, cpu_threads: int = 1):
        on_gpu = torch.cuda.is_available()
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK="0")
        if not on_gpu:
            torch.set_num_threads(cpu_threads)
        build_native_extensions()  # normally built by the install already; never waits on a stale lock
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
        self.rank, self.world_size = rank, world_size
        self.device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
        self.engine = None
        self.model_type: str | None = None
        self.load_weights(model_path, 0, cfg)

    def load_weights(self, model_path: str, version: int, cfg: LearnerConfig) -> None:
        """Serve a run: its model from `model_path`, labelled `version`, and its settings (a fleet's group
        outlives runs). Drops any stage; the next begin_stage builds the optimiser. What shapes the group
        itself (the architecture, ZeRO stage, dtype, weight transport) cannot change under it."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if self.model_type is not None:
            fixed = [k for k in ("zero_stage", "dtype", "weight_transport", "weight_bucket_mb")
                     if getattr(cfg, k) != getattr(self.cfg, k)]
            if fixed:
                raise ValueError(f"a learner group cannot change {', '.join('learner.optim.' + k for k in fixed)}"
                                 " between runs")
        if self.engine is not None:
            self.engine.destroy()
            self.engine = None
        self._model = self.ref_model = None
        gc.collect()
        torch.manual_seed(cfg.seed)
        self.cfg = cfg
        self.processor = AutoProcessor.from_pretrained(model_path)
        self.critical_markers = sorted(critical_markers(self.processor.tokenizer, cfg.critical_words))
        self.separator_ids = separator_ids(self.processor.tokenizer)
        model = (self._load_partitioned(model_path) if self._partitioned() else
                 AutoModelForImageTextToText.from_pretrained(model_path, dtype=_torch_dtype(cfg.dtype)))
        if self.model_type not in (None, model.config.model_type):
            raise ValueError(f"this learner group trains {self.model_type}, not {model.config.model_type}")
        self._model = model if cfg.zero_stage == 3 else model.to(self.device)
        self.model_type = model.config.model_type
        self.stage: StageSpec | None = None
        self.trainable_params: dict[str, int] = {}
        self._trained_since_sync: set[str] = set()
        self.stage_step = 0
        self.version = version
        self.weight_sender.forget()  # the engines get this model whole (push_weights)

    # ---- stages ---------------------------------------------------------------------------------
    def begin_stage(self, spec: StageSpec, reference: str | None = None) -> dict[str, int]:
        """(Re)build the DeepSpeed engine for a stage, keeping the weights: the optimiser holds exactly
        the stage's trainable groups, with fresh moments (a frozen group really stays frozen, a newly
        trainable one really trains). The KL reference, when the stage has one, is the policy as the
        stage starts: `reference` is its checkpoint when a run resumes inside the stage. Returns the
        trainable parameter count per group."""
        import deepspeed

        model = self._current_model()
        trainable = set_trainable(model, spec.trainable)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self._lr(spec, 0), betas=tuple(spec.optim.betas),
                                      weight_decay=spec.optim.weight_decay)
        dtype = _torch_dtype(self.cfg.dtype)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=self._ds_config(),
                                               model_parameters=params)
        self.ref_model = None
        if spec.loss.kl_coef > 0:
            from transformers import AutoModelForImageTextToText

            self.ref_model = (AutoModelForImageTextToText.from_pretrained(reference, dtype=dtype) if reference
                              else self._copy_of()).to(self.device)
            self.ref_model.eval().requires_grad_(False)
        self.stage, self.stage_step, self.trainable_params = spec, 0, trainable
        self._trained_since_sync.update(g for g, n in trainable.items() if n)  # they may change from now on
        return trainable

    def _load_partitioned(self, model_path: str) -> torch.nn.Module:
        """The checkpoint built under deepspeed.zero.Init, each rank keeping only its partitions (38B in bf16
        is 77 GB a rank otherwise): rank 0 reads one tensor at a time into each gathered parameter.
        (transformers' own ZeRO-3 loading needs accelerate, which vireo does not install.)"""
        import deepspeed
        from transformers import AutoConfig, AutoModelForImageTextToText
        from transformers.initialization import no_init_weights

        with no_init_weights(), deepspeed.zero.Init(config_dict_or_path=self._ds_config()):
            model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(model_path),
                                                            dtype=_torch_dtype(self.cfg.dtype))
        weights = ShardReader(model_path, WEIGHTS)
        stored = _stored_names(model, weights.names())
        missing = [name for name, _ in model.named_parameters() if name not in stored]
        if missing:
            raise RuntimeError(f"{model_path} lacks the parameters {missing}")
        with torch.no_grad():
            for name, param in model.named_parameters():
                with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                    if self.rank == 0:
                        param.copy_(weights.tensor(stored[name]))
            for name, buffer in model.named_buffers():  # not partitioned: every rank loads its own
                if name in stored:
                    buffer.copy_(weights.tensor(stored[name]))
        return model

    def _ds_config(self) -> dict:
        dtype = _torch_dtype(self.cfg.dtype)
        return {
            "train_micro_batch_size_per_gpu": self.cfg.micro_batch_size,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": self.cfg.grad_clip,
            "zero_optimization": {"stage": self.cfg.zero_stage},
            "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": dtype == torch.bfloat16},
            "fp16": {"enabled": dtype == torch.float16},
            "steps_per_print": 1 << 30,
        }

    def _current_model(self) -> torch.nn.Module:
        """The policy as a plain module: at the first stage the loaded checkpoint, later a fresh module
        holding the previous engine's (gathered) weights, once that engine is torn down."""
        if self.engine is None:
            return self._model
        model = self._copy_of()
        self.engine.destroy()
        self.engine = None
        self._model = None
        gc.collect()
        return model

    def _copy_of(self) -> torch.nn.Module:
        """A new module of the policy's architecture with the current policy weights."""
        from transformers import AutoModelForImageTextToText

        state = {name: tensor.to("cpu", copy=True) for name, tensor in self.named_weights()}
        model = AutoModelForImageTextToText.from_config(self._module().config, dtype=_torch_dtype(self.cfg.dtype))
        missing, unexpected = model.load_state_dict(state, strict=False)
        persistent = set(model.state_dict())
        if unexpected or any(k in persistent for k in missing if not k.endswith(_TIED_SUFFIXES)):
            raise RuntimeError(f"rebuilding the policy: missing {missing}, unexpected {unexpected}")
        model.tie_weights()
        return model

    @staticmethod
    def _lr(spec: StageSpec, step: int) -> float:
        o = spec.optim
        return lr_at(step, spec.total_steps, o.lr, o.schedule, o.warmup_ratio, o.min_lr_ratio)

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
            mask[i, len(s.prompt_token_ids) - 1:len(seq) - 1] = s.weight
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

    def _forward(self, model, samples: list[TrainSample], with_entropy: bool, temperature: float = 1.0):
        """Logprobs (and entropy) of the policy at `temperature`: the stage's sampling temperature when
        training, so the loss is taken on the distribution the engines sampled from."""
        inputs, labels, mask = self._model_inputs(samples)
        logits = model(**inputs).logits[:, :-1].float() / temperature
        logprobs = algos.logprobs_from_logits(logits, labels)
        entropy = algos.entropy_from_logits(logits.detach()) if with_entropy else None
        return logprobs, entropy, mask, labels

    def _micro_batches(self, samples: list[TrainSample]) -> list[list[TrainSample]]:
        """Split the local shard; every rank runs the same number of micro-batches (collectives must
        line up), a rank with fewer pads with empty micro-batches (run on a zero-weight sample)."""
        size = self.cfg.micro_batch_size
        local = torch.tensor([math.ceil(len(samples) / size)], dtype=torch.long)
        dist.all_reduce(local, op=dist.ReduceOp.MAX)
        return [samples[i * size:(i + 1) * size] for i in range(int(local.item()))]

    def _global_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    @staticmethod
    def _counts(samples: list[TrainSample]) -> list[float]:
        """Response tokens and sequences that count in the loss (zero-weight padding does not)."""
        return [sum(len(s.response_token_ids) * s.weight for s in samples),
                float(sum(s.weight > 0 and len(s.response_token_ids) > 0 for s in samples))]

    # ---- updates --------------------------------------------------------------------------------
    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One optimizer step of the current stage on this rank's shard, with the stage's registered
        policy loss (SFT is one too); returns globally reduced metrics."""
        spec = self._require_stage()
        samples = batch.samples or []
        if not samples:
            raise ValueError("empty training shard: the controller must give every rank samples")
        for group in self.engine.optimizer.param_groups:
            group["lr"] = self._lr(spec, self.stage_step)
        self.engine.train()
        micro = self._micro_batches(samples)
        global_tokens, global_seqs = self._global_sum(self._counts(samples))
        if global_tokens == 0:
            raise ValueError("training batch has no response tokens with weight > 0")
        updates = spec.loss.updates_per_batch
        stats = dict.fromkeys(TRAIN_STATS, 0.0)
        entropy_sums, gap = [0.0] * N_STATS, [0.0, 0.0, 0.0]
        # With one update the learner's old logprobs are those of this very forward (logprobs.detach(), the
        # policy has not moved yet), so a correction needs no extra pass; with more they are computed first.
        old_logprobs = self._old_logprobs(micro, samples) if updates > 1 else None
        for update in range(updates):
            for i, chunk in enumerate(micro):
                logprobs, entropy, mask, labels = self._forward(self.engine, chunk or [samples[0].as_padding()],
                                                                with_entropy=update == 0, temperature=spec.temperature)
                loss = self._policy_loss(spec, chunk or [samples[0].as_padding()], logprobs, mask,
                                         old_logprobs[i] if old_logprobs else None, global_tokens, global_seqs,
                                         stats)
                if update == 0:
                    entropy_sums = self._add_entropy_stats(entropy_sums, entropy, labels, mask)
                    chunk_gap = _rollout_gap(chunk, logprobs)
                    gap = [gap[0] + chunk_gap[0], gap[1] + chunk_gap[1], max(gap[2], chunk_gap[2])]
                self.engine.set_gradient_accumulation_boundary(i == len(micro) - 1)
                self.engine.backward(loss, scale_wrt_gas=False)
                self.engine.step()
        self.stage_step += 1
        self._trained_since_sync.update(g for g, n in self.trainable_params.items() if n)
        grad_norm = self.engine.get_global_grad_norm()
        totals = self._global_sum(list(stats.values()) + gap[:2] + entropy_sums)
        stats, (gap_sum, gap_n, *entropy_sums) = dict(zip(stats, totals)), totals[len(stats):]
        loss, clip, kl, ppo_kl = stats["loss"], stats["clip_sum"], stats["kl_sum"], stats["ppo_kl_sum"]
        gap_max = torch.tensor([gap[2]], dtype=torch.float64)
        dist.all_reduce(gap_max, op=dist.ReduceOp.MAX)
        per_update_tokens = global_tokens * updates
        rollout_gap = ({"rollout/logprob_diff_mean": gap_sum / gap_n, "rollout/logprob_diff_max": float(gap_max)}
                       if gap_n else {})
        return {"actor/loss": loss / updates, "actor/pg_clipfrac": clip / per_update_tokens,
                "actor/kl": kl / per_update_tokens, "actor/ppo_kl": ppo_kl / per_update_tokens,
                **entropy_metrics(entropy_sums, "actor"),
                "actor/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "actor/lr": self.engine.get_lr()[0], "train/tokens": global_tokens,
                "train/sequences": global_seqs, **rollout_gap, **offpolicy_metrics(stats)}

    def evaluate_responses(self, batch: TrainBatch) -> dict[str, float]:
        """The current policy on given responses, no update: their token-mean NLL (on reference solutions,
        the validation loss an SFT stage's early stopping watches, R1V3 §3.4) and, on the model's own
        responses, the entropy figures of learner.critical_tokens."""
        samples = batch.samples or []
        global_tokens, _ = self._global_sum(self._counts(samples))
        nll, entropy_sums = 0.0, [0.0] * N_STATS
        policy = self._policy()
        policy.eval()
        with torch.no_grad(), self._whole_before_a_stage():
            for chunk in self._micro_batches(samples):
                logprobs, entropy, mask, labels = self._forward(policy, chunk or [samples[0].as_padding()],
                                                                with_entropy=True)
                nll += algos.masked_sum(-logprobs, mask).item()
                entropy_sums = self._add_entropy_stats(entropy_sums, entropy, labels, mask)
        nll, *entropy_sums = self._global_sum([nll] + entropy_sums)
        return {"loss": nll / max(global_tokens, 1.0), "tokens": global_tokens, **entropy_metrics(entropy_sums, "")}

    def _add_entropy_stats(self, sums: list[float], entropy, labels, mask) -> list[float]:
        new = entropy_stats(entropy, labels, mask, self.critical_markers, self.cfg.high_entropy, self.separator_ids)
        return [a + b for a, b in zip(sums, new)]

    def _policy(self) -> torch.nn.Module:
        """The current policy for forward passes: the engine's, or the loaded model before any stage."""
        return self.engine if self.engine is not None else self._model

    def _module(self) -> torch.nn.Module:
        return self.engine.module if self.engine is not None else self._model

    def _partitioned(self) -> bool:
        """ZeRO-3 parameters: gathered on use (by the engine's hooks once a stage has begun)."""
        return self.cfg.zero_stage == 3

    def _whole_before_a_stage(self):
        """A forward pass of the loaded, ZeRO-3-partitioned model before any stage (no engine hooks yet)
        gathers it whole for its length; otherwise nothing."""
        import deepspeed

        if self._partitioned() and self.engine is None:
            return deepspeed.zero.GatheredParameters(list(self._model.parameters()))
        return nullcontext()

    def _require_stage(self) -> StageSpec:
        if self.stage is None or self.engine is None:
            raise RuntimeError("no stage begun: call begin_stage(spec) before training")
        return self.stage

    def _old_logprobs(self, micro: list[list[TrainSample]], samples: list[TrainSample]) -> list[torch.Tensor]:
        self.engine.eval()
        with torch.no_grad():
            out = [self._forward(self.engine, c or [samples[0].as_padding()], with_entropy=False,
                                 temperature=self.stage.temperature)[0] for c in micro]
        self.engine.train()
        return out

    def _policy_loss(self, spec: StageSpec, chunk, logprobs, mask, old_logprobs, global_tokens, global_seqs, stats):
        adv = torch.tensor([s.advantage for s in chunk], dtype=torch.float32, device=self.device)
        adv = algos.expand_to_tokens(adv, mask)
        old = old_logprobs if old_logprobs is not None else logprobs.detach()
        cfg = spec.loss
        normalisers = {"loss_agg_mode": cfg.loss_agg_mode, "loss_token_count": global_tokens,
                       "loss_seq_count": global_seqs}
        weights = offpolicy_weights(cfg, chunk, old, mask, stats)
        loss, pg = algos.get_policy_loss(cfg.policy_loss)(
            logprobs, old, adv, mask, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
            loss_scale=self.world_size, **normalisers,
            **({"offpolicy_weights": weights} if weights is not None else {}))
        stats["loss"] += float(pg["pg_loss"])
        stats["clip_sum"] += float(pg["pg_clipfrac"][0])
        stats["ppo_kl_sum"] += float(pg["ppo_kl"][0])
        if self.ref_model is not None:
            with torch.no_grad():
                ref, *_ = self._forward(self.ref_model, chunk, with_entropy=False, temperature=spec.temperature)
            kl = algos.kl_penalty(logprobs, ref, cfg.kl_estimator)
            loss = loss + cfg.kl_coef * algos.aggregate_loss(kl, mask, **normalisers) * self.world_size
            stats["kl_sum"] += algos.masked_sum(kl.detach(), mask).item()
        return loss

    # ---- weights out ----------------------------------------------------------------------------
    def named_weights(self, groups: Collection[str] = GROUPS) -> Iterator[tuple[str, torch.Tensor]]:
        """Full HF-named tensors of the current policy in the given parameter groups. Under ZeRO-3 each
        parameter is gathered (a collective: every rank must iterate) and its tensor is valid only until
        the next one is requested; copy what you keep."""
        module = self._module()
        if self._partitioned():
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
        """The parameter groups the optimizer updated since the last sync (vision / connector / llm): the
        only ones whose weights can differ from what the engines hold, across stage changes too."""
        return tuple(g for g in GROUPS if g in self._trained_since_sync)

    @cached_property
    def weight_sender(self) -> WeightSender:
        transport = make_transport(self.cfg.weight_transport, int(self.cfg.weight_bucket_mb * 2**20))
        return WeightSender(transport, self.rank, stable=self.cfg.zero_stage != 3)  # ZeRO-3 gathers are transient

    def sync_weights(self, link: EngineLink | None, everything: bool = False) -> SyncReport:
        """Send the groups that can have changed (every group when `everything`) as the next version (all
        ranks call this; rank 0 sends through `link`, the others join the ZeRO-3 gathers)."""
        report = self.weight_sender.sync(self.next_version(), self.trainable_groups(), self.named_weights, link,
                                         everything)
        self._trained_since_sync.clear()
        return report

    def push_weights(self, link: EngineLink | None) -> SyncReport:
        """The current version, whole, to replaced engines (all ranks call this, as for sync_weights)."""
        return self.weight_sender.push(self.version, self.named_weights, link)

    def next_version(self) -> int:
        self.version += 1
        return self.version

    def probe_logprobs(self, text: str, images: tuple[bytes, ...]) -> tuple[list[int], list[float]]:
        """The learner's side of the weight-sync probe: logprobs of tokens 1..n-1 of a fixed text."""
        inputs = self.processor(text=[text], images=decode_images(images) or None, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        self._policy().eval()
        with torch.no_grad(), self._whole_before_a_stage():
            logits = self._module()(**inputs).logits[:, :-1].float()
        ids = inputs["input_ids"]
        return ids[0].tolist(), algos.logprobs_from_logits(logits, ids[:, 1:])[0].tolist()

    def save_hf(self, out_dir: str) -> None:
        """Write an HF checkpoint (loadable by transformers and vLLM); collective for ZeRO-3."""
        self._save_shards(out_dir, WEIGHTS, self.named_weights())
        if self.rank == 0:
            module = self._module()
            module.config.save_pretrained(out_dir)
            if getattr(module, "generation_config", None) is not None:
                module.generation_config.save_pretrained(out_dir)
            self.processor.save_pretrained(out_dir)
        dist.barrier()

    def _save_shards(self, out_dir: str, base: str, tensors: Iterator[tuple[str, torch.Tensor]],
                     metadata: dict[str, str] | None = None) -> None:
        """Rank 0 streams the tensors into shards of learner.optim.checkpoint_shard_mb, so its host memory
        holds one shard and one gathered tensor; the other ranks only join the gathers, in the same order."""
        if self.rank == 0:
            write_shards(out_dir, base, tensors, int(self.cfg.checkpoint_shard_mb * 2**20), metadata)
        else:
            for _ in tensors:
                pass

    # ---- resumable state ------------------------------------------------------------------------
    def save_training_state(self, out_dir: str) -> None:
        """The learner's part of a resumable checkpoint: the HF export (the weights, which vLLM and
        `vireo eval` load too) and AdamW's moments as full tensors per parameter name with the step count
        (learner.checkpoint_files OPTIMIZER). Gathered, so a run resumes on any number of ranks and any ZeRO
        stage — the idea of DeepSpeed's universal checkpoint, written directly. Collective: every rank
        calls it; learner.checkpoint_files.missing_checkpoint_files tells whether it completed."""
        self.save_hf(out_dir)
        moments = ((f"{key}/{name}", value) for name, key, value in self._moments())
        self._save_shards(out_dir, OPTIMIZER, moments, {"optimizer_steps": str(self._optimizer_steps()),
                                                        "stage_step": str(self.stage_step)})
        dist.barrier()

    def load_training_state(self, in_dir: str) -> None:
        """Continue the begun stage from save_training_state's checkpoint (the weights came with the model
        path): AdamW's moments and step count, and the stage's step, which places the lr schedule. Each
        rank reads one moment at a time, under ZeRO-3 only its own partition's slice of it."""
        moments = ShardReader(in_dir, OPTIMIZER)
        self._require_stage()
        self.stage_step = int(moments.metadata["stage_step"])
        steps = int(moments.metadata["optimizer_steps"])
        if not steps:  # saved before the stage's first update: AdamW has no state yet
            return
        base = self._base_optimizer()
        # AdamW initialises its state lazily; give it the saved step count. ZeRO-3 hands AdamW its flat fp32
        # partitions only during a step, so they are found on the ZeRO optimizer.
        flats = getattr(self.engine.optimizer, "fp32_partitioned_groups_flat", None) or [
            flat for group in base.param_groups for flat in group["params"]]
        for flat in flats:
            state = base.state[flat]
            if not state:
                state.update(exp_avg=torch.zeros_like(flat), exp_avg_sq=torch.zeros_like(flat))
            state["step"] = torch.tensor(float(steps))
        if hasattr(self.engine.optimizer, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2 (deepspeed 0.19)
            self.engine.optimizer._hp_optimizer_states_linked = False
            self.engine.optimizer._lazy_init_hp_params_optimizer_state()
        from deepspeed.utils import safe_set_full_optimizer_state, safe_set_local_optimizer_state

        for name, param in self._module().named_parameters():
            if not param.requires_grad:
                continue
            for key in ADAM_MOMENTS:
                if self.cfg.zero_stage == 3:  # this rank's partition: a flat range, padded at the end
                    size = param.ds_tensor.numel()
                    local = moments.flat_slice(f"{key}/{name}", self.rank * size, size)
                    safe_set_local_optimizer_state(param, local.to(self.device), key)
                    continue
                value = moments.tensor(f"{key}/{name}").to(self.device)
                if self.cfg.zero_stage == 0:
                    base.state[param][key].copy_(value)
                else:
                    safe_set_full_optimizer_state(param, value, key)

    def _base_optimizer(self) -> torch.optim.Optimizer:
        """The torch AdamW under DeepSpeed's ZeRO wrapper (itself when ZeRO is off)."""
        return getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)

    def _optimizer_steps(self) -> int:
        states = [s for s in self._base_optimizer().state.values() if "step" in s]
        return int(states[0]["step"]) if states else 0

    def _moments(self) -> Iterator[tuple[str, str, torch.Tensor]]:
        """(name, moment, full tensor) of every trainable parameter; a collective under ZeRO."""
        if self.engine is None or not self._optimizer_steps():
            return
        from deepspeed.utils import safe_get_full_optimizer_state

        base = self._base_optimizer()
        for name, param in self._module().named_parameters():
            if param.requires_grad:
                for key in ADAM_MOMENTS:
                    value = (base.state[param][key] if self.cfg.zero_stage == 0
                             else safe_get_full_optimizer_state(param, key))
                    yield name, key, value


def _stored_names(model: torch.nn.Module, keys: Iterable[str]) -> dict[str, str]:
    """Module name -> checkpoint key: transformers renames keys on loading (e.g. InternVL's
    `language_model.model.*` is `model.language_model.*`) and back on saving; its own renaming rules."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    if len(renamings) != len(transforms):
        raise NotImplementedError(f"{type(model).__name__}'s checkpoints convert tensors, not only names")
    own = dict.fromkeys(model.state_dict())
    return {rename_source_key(key, renamings, [], model.base_model_prefix, own)[0]: key for key in keys}


#: The sums train_step accumulates over micro-batches and updates, then all-reduces: the loss figures, and
#: the off-policy ones (offpolicy_weights) with their token count.
TRAIN_STATS = ("loss", "clip_sum", "kl_sum", "ppo_kl_sum", "offpolicy_ratio_sum", "offpolicy_masked_sum",
               "offpolicy_kl_sum", "offpolicy_tokens")


def behaviour_logprobs(chunk: list[TrainSample], mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The engine's logprobs of a micro-batch laid out like the learner's ([B, T], response token j of
    sample i at column len(prompt_i) - 1 + j, as LearnerWorker._model_inputs aligns them) and where they
    exist ([B, T] bool: response tokens of samples that carry rollout_logprobs and count); None when no
    sample carries them (an SFT batch, reference solutions)."""
    values = torch.zeros(mask.shape, dtype=torch.float32)
    has = torch.zeros(mask.shape, dtype=torch.bool)
    for i, sample in enumerate(chunk):
        if sample.rollout_logprobs is None or sample.weight == 0:
            continue
        if len(sample.rollout_logprobs) != len(sample.response_token_ids):
            raise ValueError(f"a sample has {len(sample.rollout_logprobs)} rollout logprobs for "
                             f"{len(sample.response_token_ids)} response tokens")
        start = len(sample.prompt_token_ids) - 1
        end = start + len(sample.response_token_ids)
        values[i, start:end] = torch.tensor(sample.rollout_logprobs, dtype=torch.float32)
        has[i, start:end] = True
    if not has.any():
        return None
    return values.to(mask.device), has.to(mask.device) & (mask != 0)


def offpolicy_weights(loss_cfg, chunk: list[TrainSample], old_logprobs: torch.Tensor, mask: torch.Tensor,
                      stats: dict[str, float]) -> torch.Tensor | None:
    """The behaviour-policy correction of a micro-batch (learner.algos.offpolicy_correction, the stage's
    loss.offpolicy_correction) between the learner's old logprobs and the engine's: its per-token weights
    for the policy loss, None when the correction is "none" (the loss stays bit-identical) or no sample
    carries engine logprobs. The off-policy sums go into `stats` whenever engine logprobs are present, also
    with "none", so a synchronous run shows its engine/learner mismatch."""
    behaviour = behaviour_logprobs(chunk, mask)
    if behaviour is None:
        return None
    values, has = behaviour
    thresholds = {k: getattr(loss_cfg, k) for k in algos.OFFPOLICY_THRESHOLDS}
    weights, off = algos.offpolicy_correction(loss_cfg.offpolicy_correction, old_logprobs.detach(), values, mask,
                                              has, **thresholds)
    stats["offpolicy_ratio_sum"] += float(off["is_ratio"][0])
    stats["offpolicy_masked_sum"] += float(off["masked"][0])
    stats["offpolicy_kl_sum"] += float(off["behaviour_kl"][0])
    stats["offpolicy_tokens"] += float(off["is_ratio"][1])
    return None if loss_cfg.offpolicy_correction == "none" else weights


def offpolicy_metrics(stats: dict[str, float]) -> dict[str, float]:
    """offpolicy/* from the all-reduced sums (absent when no trained token had engine logprobs):
    is_ratio_mean (mean ρ_behav = π_old / π_engine), masked_fraction (share of those tokens the correction
    gave weight 0), behaviour_kl (mean k3 = ρ - log ρ - 1, the estimate of KL(π_engine ‖ π_old))."""
    n = stats["offpolicy_tokens"]
    if not n:
        return {}
    return {"offpolicy/is_ratio_mean": stats["offpolicy_ratio_sum"] / n,
            "offpolicy/masked_fraction": stats["offpolicy_masked_sum"] / n,
            "offpolicy/behaviour_kl": stats["offpolicy_kl_sum"] / n}


def _rollout_gap(chunk: list[TrainSample], logprobs: torch.Tensor) -> list[float]:
    """[Σ |learner - engine| logprob, #tokens, max] over the response tokens of samples that carry the
    engine's logprobs: how far the policy being trained is from the one that sampled (verl logs it as
    rollout_probs_diff). Both are raw logprobs, so the figure is exact at sampling temperature 1."""
    total, count, worst = 0.0, 0.0, 0.0
    for i, sample in enumerate(chunk):
        if sample.rollout_logprobs is None or sample.weight == 0:
            continue
        start = len(sample.prompt_token_ids) - 1
        mine = logprobs[i, start:start + len(sample.response_token_ids)].detach().to("cpu", torch.float64)
        diff = (mine - torch.tensor(sample.rollout_logprobs, dtype=torch.float64)).abs()
        if diff.numel():
            total, count, worst = total + float(diff.sum()), count + diff.numel(), max(worst, float(diff.max()))
    return [total, count, worst]

