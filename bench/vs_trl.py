"""vireo vs. TRL's GRPOTrainer on the same work: the same warmed tiny InternVL, data, reward, group size,
batch, response length, learning rate and step count, alternating runs in one session on this machine.

TRL is installed for this bench only, outside the project's lock:
    .tools/bin/uv pip install --python .venv/bin/python --target .bench-trl --no-deps \\
        "trl==1.16.*" accelerate datasets multiprocess xxhash
    python -m bench.vs_trl [--runs 3] [--steps 10] [--prompts 32] [--n 8] [--max-tokens 40]

The warm-up (vireo's SFT, `--warm-steps`) runs once; every run starts from its checkpoint in a fresh
process. TRL generates with transformers (its default without a vLLM server) on both cores; vireo uses
its demo topology (2 vLLM rollout actors + 2 DeepSpeed ranks, one thread each). Both score with vireo's
reward (0.8 accuracy + 0.2 format), no KL, one update per batch; vireo's dynamic filtering is off so both
train on every sample. The first step of each run is a warm-up and is not timed. Each row of CONFIGS is
one contender: `vireo_one_step` is vireo with trainer.mode=one_step, `vireo_async` with trainer.mode=async
two updates ahead and truncated IS (`--contenders trl,vireo,vireo_one_step,vireo_async`).

Prints a table, every run's reward curve, the mean curve with its spread (and grad norm, entropy,
response length, truncation and the rollout/learner logprob gap per step), plots the curves
(docs/vs-trl-<steps>.png), then one JSON line with `<contender>_over_trl_step_speed` per vireo contender
(TRL's median step time over its; above 1 means vireo is faster) and `vireo_overlap_over_trl_step_speed`
(the better overlapping contender's), `reward_gain_<contender>` (mean reward over the last 5 steps minus
step 0, mean over runs) with its spread, and `seconds_to_reward` (training seconds until the 3-step
mean reward first reaches the level the weaker contender's mean curve peaks at).

`--same-batch` samples one batch (vLLM, vireo's reward, GRPO advantages) and applies one update to the same
weights twice: by vireo's learner group (`--ranks`, `--micro-batch-size`: the demo's 2 and 32) and by TRL's
own `GRPOTrainer.compute_loss`, clipping and optimizer; it prints both losses and gradient norms and the
weight differences after the update.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRL_SITE = REPO / ".bench-trl"

# contender -> how its worker runs; "vireo" rows take config overrides
CONFIGS: dict[str, dict] = {
    "trl": {"runner": "trl"},
    "vireo": {"runner": "vireo", "overrides": []},
    # generation overlaps training: one step ahead, and streaming two updates ahead with truncated IS (which
    # two updates of lag need: bench.overlap's uncorrected arm)
    "vireo_one_step": {"runner": "vireo", "overrides": ["trainer.mode=one_step"], "overlaps": True},
    "vireo_async": {"runner": "vireo", "overrides": ["trainer.mode=async", "trainer.max_staleness=2",
                                                     "stages.grpo.algo.offpolicy_correction=tis"], "overlaps": True},
}


# ---- vireo --------------------------------------------------------------------------------------
def run_vireo(model: str, data: Path, a: argparse.Namespace, overrides: list[str]) -> list[dict]:
    import ray

    from services.checks import load_config
    from services.run import Run

    cfg = load_config(str(REPO / "configs" / "demo.yaml"), [
        f"model.path={model}", f"data.train={data / 'train.parquet'}", f"data.heldout={data / 'heldout.parquet'}",
        f"stages.grpo.batch_size={a.prompts}", f"stages.grpo.sampling.n={a.n}",
        f"stages.grpo.sampling.max_tokens={a.max_tokens}", f"stages.grpo.optim.lr={a.lr}", "stages.grpo.algo.kl_coef=0.0",
        "stages.grpo.algo.drop_uniform_groups=false", "trainer.probe_every=0", f"trainer.seed={a.seed}"] + overrides)
    cfg.stages = [s for s in cfg.stages if s.name == "grpo"]
    controller = Run(cfg, Path(tempfile.mkdtemp(prefix="vireo-vs-trl-")), log=lambda *_: None)
    plans = controller.prepare()
    controller.start_fleet(cfg.model.path)
    grpo = controller.begin_stage(0, plans[0])[0].kind
    rows = []
    for step in range(1, a.steps + 2):
        m = grpo.step(step, step, steps_left=a.steps + 1 - step)  # async generates no batch past the last step
        rows.append({"step_s": m["timing_s/step"], "gen_s": m["timing_s/gen"],
                     "train_s": m["timing_s/train"] + m["timing_s/sync"],
                     "gen_tokens": m["response_length/mean"] * a.prompts * a.n, "reward": m["reward/mean"],
                     "grad_norm": m.get("actor/grad_norm", float("nan")), "entropy": m.get("actor/entropy", float("nan")),
                     "length": m["response_length/mean"], "clipped": m["response_length/clip_rate"],
                     "rollout_gap_max": m.get("rollout/logprob_diff_max", float("nan")),
                     "rollout_gap_mean": m.get("rollout/logprob_diff_mean", float("nan"))})
    grpo.finish()  # one_step: the batch generated ahead is in before the actors go
    ray.shutdown()
    return rows


# ---- TRL ----------------------------------------------------------------------------------------
class ProblemReward:
    """vireo's reward as a TRL reward function: each completion is scored against the answer of its own
    problem, found by the `problem_id` column TRL passes through. (The bench first keyed problems by
    question text; the synthetic set has 30 texts for 2,000 problems, so 68 % of completions were scored
    against another problem's answer — a fixed answer per text, which TRL learned without looking at the
    image, "twice vireo's reward per step".)"""

    __name__ = "reward"  # TRL names the logged reward after its function

    def __init__(self, problems):
        from reward.compose import RewardConfig, RewardScorer

        self.by_id = {p.id: p for p in problems}
        self.scorer = RewardScorer(RewardConfig())

    def __call__(self, completions, problem_id, **_) -> list[float]:
        from reward.types import ScoreRequest

        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        problems = [self.by_id[i] for i in problem_id]
        return [r.score for r in self.scorer.score_batch(
            [ScoreRequest(t, p.answer, p.answer_type, p.options) for t, p in zip(texts, problems)])]

    def close(self) -> None:
        self.scorer.close()


def run_trl(model: str, data: Path, a: argparse.Namespace) -> list[dict]:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    from rollout.prompts import chat_messages, decode_images
    from services.config import DataConfig
    from services.data.loading import load_problems

    torch.set_num_threads(2)
    problems = load_problems(str(data / "train.parquet")).problems
    system = DataConfig().system_prompt  # the same chat messages vireo renders
    def listed(messages):  # Arrow needs every message's content as a list of parts
        return [{**m, "content": [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str)
                 else m["content"]} for m in messages]

    rows = [{"prompt": listed(chat_messages(p.question, system)), "image": decode_images(p.images)[0],
             "problem_id": p.id} for p in problems]
    reward = ProblemReward(problems)

    timings: list[dict] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start, timings_gen[:] = time.perf_counter(), []

        def on_step_end(self, *_, **__):
            timings.append({"step_s": time.perf_counter() - self.start, "gen_s": sum(timings_gen)})

    timings_gen: list[float] = []
    trainer = trl_trainer(model, a, reward, Dataset.from_list(rows), callbacks=[Clock()])
    generate = trainer._generate_and_score_completions  # timed from outside; behaviour unchanged

    def timed(*args_, **kwargs):
        start = time.perf_counter()
        out = generate(*args_, **kwargs)
        timings_gen.append(time.perf_counter() - start)
        return out

    trainer._generate_and_score_completions = timed
    trainer.train()
    logs = [h for h in trainer.state.log_history if "reward" in h]
    for t, log in zip(timings, logs):
        t.update(train_s=t["step_s"] - t["gen_s"], reward=log["reward"],
                 gen_tokens=log.get("completions/mean_length", float("nan")) * a.prompts * a.n,
                 grad_norm=log.get("grad_norm", float("nan")), entropy=log.get("entropy", float("nan")),
                 length=log.get("completions/mean_length", float("nan")),
                 clipped=log.get("completions/clipped_ratio", float("nan")))
    return timings


def trl_trainer(model: str, a: argparse.Namespace, reward, dataset, callbacks=()):
    """TRL's GRPOTrainer as both modes use it: its defaults (loss_type "dapo", scale_rewards "group",
    max_grad_norm 1.0, AdamW) with the bench's batch, group, length and learning rate."""
    from transformers import AutoProcessor
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="trl-"), per_device_train_batch_size=a.prompts * a.n,
                      num_generations=a.n, max_completion_length=a.max_tokens, learning_rate=a.lr, beta=0.0,
                      max_steps=a.steps + 1, temperature=1.0, logging_steps=1, report_to=[], save_strategy="no",
                      seed=a.seed, use_cpu=True, bf16=False, dataloader_num_workers=0, lr_scheduler_type="constant",
                      warmup_steps=0)
    return GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=dataset,
                       processing_class=AutoProcessor.from_pretrained(model), callbacks=list(callbacks))


# ---- same batch ---------------------------------------------------------------------------------
def sample_batch(model: str, data: Path, a: argparse.Namespace) -> list:
    """One GRPO batch as vireo's GRPO stage builds it: the first `--prompts` training problems, `--n`
    samples each from a vLLM engine at temperature 1, vireo's reward, group-normalised advantages."""
    import torch

    from learner import algos
    from learner.types import TrainSample
    from rollout.engine import RolloutEngine
    from rollout.prompts import render_prompt
    from rollout.types import RolloutRequest, SamplingConfig
    from rollout.vllm_adapter import EngineOptions
    from services.config import DataConfig
    from services.data.loading import load_problems

    problems = load_problems(str(data / "train.parquet")).problems[:a.prompts]
    engine = RolloutEngine(model, EngineOptions(cpu_threads=2))
    requests = [RolloutRequest(p.id, render_prompt(engine.processor, p.question, DataConfig().system_prompt),
                               p.images) for p in problems]
    trajectories = engine.generate(requests, SamplingConfig(n=a.n, temperature=1.0, max_tokens=a.max_tokens,
                                                            seed=a.seed))
    reward = ProblemReward(problems)
    rewards = reward([t.response_text for t in trajectories], [t.prompt_id for t in trajectories])
    reward.close()
    advantages = algos.grpo(torch.tensor(rewards), [t.prompt_id for t in trajectories]).tolist()
    return [TrainSample(t.prompt_token_ids, t.response_token_ids, t.images, adv)
            for t, adv in zip(trajectories, advantages)]


def vireo_update(rank: int, world: int, micro: int, model: str, batch_file: str, out: str, port: int,
                 lr: float) -> None:
    """One train_step of vireo's learner group (DeepSpeed ZeRO-2 over gloo, the demo's ranks and
    micro-batches) on the saved batch; rank 0 writes the updated weights and the step's metrics."""
    import pickle

    from safetensors.torch import save_file

    from learner.types import OptimConfig, StageSpec
    from learner.types import LearnerConfig
    from learner.worker import LearnerWorker
    from services.fleet import shard_batch

    with open(batch_file, "rb") as f:
        batch = pickle.load(f)
    worker = LearnerWorker(model, LearnerConfig(micro_batch_size=micro), rank, world, "127.0.0.1", port)
    worker.begin_stage(StageSpec("grpo", optim=OptimConfig(lr=lr)))
    metrics = worker.train_step(shard_batch(batch, world)[rank])
    weights = {name: tensor.to("cpu", copy=True) for name, tensor in worker.named_weights()}
    if rank == 0:
        save_file(weights, out)
        Path(out + ".json").write_text(json.dumps(metrics))


def trl_update(model: str, batch: list, a: argparse.Namespace) -> tuple[dict, dict]:
    """One update by TRL's own pieces on the same batch: GRPOTrainer._compute_loss (its loss_type "dapo"
    on our prompts, completions and advantages), backward, clip to max_grad_norm, the optimizer TRL's
    Trainer creates. Returns (metrics, updated weights)."""
    import torch
    from datasets import Dataset

    from rollout.prompts import decode_images

    trainer = trl_trainer(model, a, lambda completions, **_: [0.0] * len(completions),
                          Dataset.from_list([{"prompt": "unused"}]))
    policy = trainer.model
    policy.train()
    processor = trainer.processing_class
    pad = processor.tokenizer.pad_token_id
    prompt_width = max(len(s.prompt_token_ids) for s in batch)
    completion_width = max(len(s.response_token_ids) for s in batch)
    prompt_ids = torch.full((len(batch), prompt_width), pad)
    prompt_mask = torch.zeros_like(prompt_ids)
    completion_ids = torch.full((len(batch), completion_width), pad)
    completion_mask = torch.zeros_like(completion_ids)
    for i, s in enumerate(batch):  # prompts left-padded, completions right-padded, as TRL builds them
        prompt_ids[i, prompt_width - len(s.prompt_token_ids):] = torch.tensor(s.prompt_token_ids)
        prompt_mask[i, prompt_width - len(s.prompt_token_ids):] = 1
        completion_ids[i, :len(s.response_token_ids)] = torch.tensor(s.response_token_ids)
        completion_mask[i, :len(s.response_token_ids)] = 1
    images = [img for s in batch for img in decode_images(s.images)]
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": torch.tensor([s.advantage for s in batch]),
              "num_items_in_batch": completion_mask.sum(), "num_images": [len(s.images) for s in batch],
              "pixel_values": processor.image_processor(images=images, return_tensors="pt")["pixel_values"]}
    trainer.current_gradient_accumulation_steps = 1
    optimizer = trainer.create_optimizer()
    loss = trainer.compute_loss(policy, inputs)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), trainer.args.max_grad_norm)
    optimizer.step()
    weights = {name: t.detach().clone() for name, t in policy.state_dict().items()}
    return {"loss": loss.item(), "grad_norm": grad_norm.item(), "optimizer": type(optimizer).__name__}, weights


def same_batch(a: argparse.Namespace, model: str, data: Path, work: Path) -> None:
    import pickle

    import torch
    import torch.multiprocessing as mp
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    from actors.learner_actor import free_port

    batch = sample_batch(model, data, a)
    batch_file = work / "batch.pkl"
    batch_file.write_bytes(pickle.dumps(batch))
    out = str(work / "vireo-update.safetensors")
    mp.spawn(vireo_update, args=(a.ranks, a.micro_batch_size, model, str(batch_file), out, free_port(), a.lr),
             nprocs=a.ranks)
    vireo, vireo_metrics = load_file(out), json.loads(Path(out + ".json").read_text())
    trl_metrics, trl = trl_update(model, batch, a)
    start = AutoModelForImageTextToText.from_pretrained(model, dtype=torch.float32).state_dict()
    abs_diff = max((vireo[n] - trl[n]).abs().max().item() for n in vireo)
    # relative to each tensor's scale, at least the init scale 0.02 (a zero-init bias holds only its update)
    rel_diff = max(((vireo[n] - trl[n]).abs().max() / trl[n].abs().max().clamp(min=0.02)).item() for n in vireo)
    update = sum((trl[n] - start[n]).pow(2).sum() for n in vireo).sqrt().item()
    mismatch = sum((vireo[n] - trl[n]).pow(2).sum() for n in vireo).sqrt().item()
    tokens = sum(len(s.response_token_ids) for s in batch)
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  one batch: {a.prompts} prompts x {a.n} samples, {tokens} response "
          f"tokens, lr {a.lr:g}; vireo on {a.ranks} ranks, micro-batch {a.micro_batch_size}; TRL "
          f"{trl_metrics['optimizer']}")
    print(f"{'':>6} {'loss':>14} {'grad norm':>12}")
    print(f"{'vireo':>6} {vireo_metrics['actor/loss']:14.9f} {vireo_metrics['actor/grad_norm']:12.6f}")
    print(f"{'trl':>6} {trl_metrics['loss']:14.9f} {trl_metrics['grad_norm']:12.6f}")
    print(f"weights after the update: max |vireo - trl| {abs_diff:.3g}, max relative (per tensor) {rel_diff:.3g}, "
          f"|vireo - trl| / |update| {mismatch / update:.3g}")
    print(json.dumps({"same_batch_max_abs_weight_diff": abs_diff, "same_batch_max_rel_weight_diff": rel_diff,
                      "same_batch_update_mismatch": mismatch / update,
                      "vireo_loss": vireo_metrics["actor/loss"], "trl_loss": trl_metrics["loss"],
                      "vireo_grad_norm": vireo_metrics["actor/grad_norm"], "trl_grad_norm": trl_metrics["grad_norm"]}))


# ---- driver -------------------------------------------------------------------------------------
def warm_model(a: argparse.Namespace, out: Path) -> tuple[str, Path]:
    """vireo's own warm-up (SFT) of the embedded default, once; its checkpoint is every run's start."""
    from services.checks import load_config
    from services.run import Run
    from services.run_dir import DATA_DIR, REPORT_FILE

    cfg = load_config(str(REPO / "configs" / "demo.yaml"), [f"stages.coldstart.end.max_steps={a.warm_steps}",
                                                           "evaluation.limit=1"])
    cfg.stages = cfg.stages[:1]
    done = out / REPORT_FILE
    report = json.loads(done.read_text()) if done.is_file() else {}
    if "final_checkpoint" not in report:
        report = Run(cfg, out, log=lambda *_: None).run()
    return report["final_checkpoint"], out / DATA_DIR


def worker(a: argparse.Namespace) -> None:
    config = CONFIGS[a.worker]
    if config["runner"] == "trl":
        rows = run_trl(a.model, Path(a.data), a)
    else:
        rows = run_vireo(a.model, Path(a.data), a, config["overrides"])
    Path(a.out).write_text(json.dumps(rows))


def summarise(rows: list[dict], a: argparse.Namespace) -> dict:
    timed = rows[1:]  # the first step warms up
    med = {k: statistics.median(r[k] for r in timed) for k in ("step_s", "gen_s", "train_s")}
    med["gen_tok_s"] = statistics.median(r["gen_tokens"] / r["step_s"] for r in timed)
    return med


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warm-steps", type=int, default=140)
    parser.add_argument("--contenders", default="trl,vireo")
    parser.add_argument("--work", help="working folder; a warm-up already in it is reused")
    parser.add_argument("--plot", help="PNG of the reward curves (default docs/vs-trl-<steps>.png)")
    parser.add_argument("--same-batch", action="store_true",
                        help="one sampled batch, one update by vireo's learner group and by TRL: compare weights")
    parser.add_argument("--ranks", type=int, default=2, help="--same-batch: vireo's learner ranks")
    parser.add_argument("--micro-batch-size", type=int, default=32, help="--same-batch: vireo's micro-batch")
    parser.add_argument("--worker", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.worker:
        return worker(a)
    contenders = a.contenders.split(",")
    unknown = [c for c in contenders if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown contenders {unknown}; choose from {sorted(CONFIGS)}")
    if not (TRL_SITE / "trl").is_dir():
        raise SystemExit(f"TRL is not installed in {TRL_SITE}: see `python -m bench.vs_trl --help` for the line")
    work = Path(a.work or tempfile.mkdtemp(prefix="vireo-vs-trl-"))
    model, data = warm_model(a, work / "warm")
    if a.same_batch:
        sys.path.insert(0, str(TRL_SITE))
        return same_batch(a, model, data, work)
    results: dict[str, list[list[dict]]] = {c: [] for c in contenders}
    loads = []
    for run in range(a.runs):
        for c in contenders:  # alternate
            out = work / f"{c}-{run}.json"
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TRL_SITE), str(REPO)]) if CONFIGS[c]["runner"] == "trl" else str(REPO))
            loads.append(os.getloadavg()[0])
            subprocess.run([sys.executable, "-m", "bench.vs_trl", "--worker", c, "--model", model, "--data", str(data),
                            "--out", str(out), "--steps", str(a.steps), "--prompts", str(a.prompts), "--n", str(a.n),
                            "--max-tokens", str(a.max_tokens), "--lr", str(a.lr), "--seed", str(a.seed + run)],
                           check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            results[c].append(json.loads(out.read_text()))
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  load {min(loads):.1f}-{max(loads):.1f}  cores {os.cpu_count()}  "
          f"{a.prompts} prompts x {a.n} samples x {a.max_tokens} tokens, lr {a.lr:g}, {a.steps} timed steps, "
          f"{a.runs} alternating runs (medians of per-run medians)")
    print(f"{'':>16} {'step s':>8} {'gen s':>7} {'train s':>8} {'gen tok/s':>10}   per-run step s")
    summary = {}
    for c in contenders:
        runs = [summarise(r, a) for r in results[c]]
        summary[c] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"{c:>16} {summary[c]['step_s']:8.2f} {summary[c]['gen_s']:7.2f} {summary[c]['train_s']:8.2f} "
              f"{summary[c]['gen_tok_s']:10.0f}   " + " ".join(f"{r['step_s']:.2f}" for r in runs))
    curves = {c: [[r["reward"] for r in run] for run in results[c]] for c in contenders}
    print("\nreward/mean per step (step 0 is the untimed warm-up step; its batch was sampled before any update)")
    print(f"{'step':<17}" + " ".join(f"{i:>5d}" for i in range(a.steps + 1)))
    for c in contenders:
        for run, curve in enumerate(curves[c]):
            print(f"{c + '-' + str(run):>16} " + " ".join(f"{v:5.3f}" for v in curve))
    mean = {c: [statistics.mean(col) for col in zip(*curves[c])] for c in contenders}
    spread = {c: [statistics.pstdev(col) for col in zip(*curves[c])] for c in contenders}
    for c in contenders:
        print(f"{c + ' mean':>16} " + " ".join(f"{v:5.3f}" for v in mean[c]))
        print(f"{c + ' sd':>16} " + " ".join(f"{v:5.3f}" for v in spread[c]))
    for key in ("grad_norm", "entropy", "length", "clipped", "rollout_gap_mean", "rollout_gap_max"):
        print(f"\n{key} per step (mean over runs)")
        for c in contenders:
            print(f"{c:>16} " + " ".join(f"{statistics.mean(col):{'7.1e' if 'gap' in key else '5.3f'}}" for col in zip(
                *[[r.get(key, float('nan')) for r in run] for run in results[c]])))
    gains = {c: [reward_gain(curve) for curve in curves[c]] for c in contenders}
    target = min(max(smoothed(mean[c])) for c in contenders)  # a level every contender's mean curve reaches
    to_target = {c: seconds_to(target, mean[c], [statistics.mean(col) for col in zip(
        *[[r["step_s"] for r in run] for run in results[c]])]) for c in contenders}
    print("\nreward gain (mean of the last 5 steps - step 0): " + ", ".join(
        f"{c} {statistics.mean(gains[c]):+.3f} (runs {' '.join(f'{g:+.3f}' for g in gains[c])}, "
        f"spread {statistics.pstdev(gains[c]):.3f})" for c in contenders))
    print(f"seconds to a 3-step mean reward of {target:.3f}: " + ", ".join(
        f"{c} {to_target[c]:.1f}" for c in contenders))
    plot = Path(a.plot or REPO / "docs" / f"vs-trl-{a.steps}.png")
    plot_curves(plot, curves, a)
    print(f"curves plotted: {plot}")
    headline = {f"{c}_over_trl_step_speed": round(summary["trl"]["step_s"] / summary[c]["step_s"], 3)
                for c in contenders if c != "trl" and "trl" in summary}
    overlapping = [headline[f"{c}_over_trl_step_speed"] for c in contenders if CONFIGS[c].get("overlaps") and headline]
    if overlapping:
        headline["vireo_overlap_over_trl_step_speed"] = max(overlapping)
    print(json.dumps({**headline, **{f"reward_gain_{c}": round(statistics.mean(gains[c]), 4) for c in contenders},
                      **{f"reward_gain_spread_{c}": round(statistics.pstdev(gains[c]), 4) for c in contenders},
                      "seconds_to_reward": {"target": round(target, 4), **{c: round(v, 2) for c, v in to_target.items()}},
                      **{f"{c}_{k}": round(v, 3) for c in contenders for k, v in summary[c].items()},
                      "reward_curves": {c: [round(v, 4) for v in mean[c]] for c in contenders}}))


def reward_gain(curve: list[float]) -> float:
    """Mean reward over the last 5 steps minus step 0's (sampled before any update)."""
    return statistics.mean(curve[-5:]) - curve[0]


def smoothed(curve: list[float], window: int = 3) -> list[float]:
    return [statistics.mean(curve[max(0, i - window + 1):i + 1]) for i in range(len(curve))]


def seconds_to(target: float, curve: list[float], step_s: list[float]) -> float:
    """Training seconds (the untimed warm-up step excluded) until the smoothed curve first reaches target."""
    elapsed = 0.0
    for i, value in enumerate(smoothed(curve)):
        elapsed += step_s[i] if i else 0.0
        if value >= target - 1e-12:
            return elapsed
    return float("nan")


def plot_curves(path: Path, curves: dict[str, list[list[float]]], a: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (runs_ax, mean_ax) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for (c, runs), color in zip(curves.items(), ("tab:orange", "tab:blue", "tab:green", "tab:red")):
        for i, curve in enumerate(runs):
            runs_ax.plot(curve, color=color, alpha=0.6, label=c if i == 0 else None)
        mean = [statistics.mean(col) for col in zip(*runs)]
        sd = [statistics.pstdev(col) for col in zip(*runs)]
        mean_ax.plot(mean, color=color, label=f"{c} (mean of {len(runs)})")
        mean_ax.fill_between(range(len(mean)), [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)],
                             color=color, alpha=0.2)
    runs_ax.set(title="each run", xlabel="step", ylabel="reward/mean")
    mean_ax.set(title="mean ± sd over runs", xlabel="step")
    for ax in (runs_ax, mean_ax):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"GRPO on the same work: {a.prompts} prompts x {a.n} samples x {a.max_tokens} tokens, lr {a.lr:g}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()
