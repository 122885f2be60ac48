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
one contender (an overlap variant of vireo is one more row).

Prints a table and both reward curves, then one JSON line with `vireo_over_trl_step_speed` (TRL's median
step time over vireo's; above 1 means vireo is faster).
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
}


# ---- vireo --------------------------------------------------------------------------------------
def run_vireo(model: str, data: Path, a: argparse.Namespace, overrides: list[str]) -> list[dict]:
    import ray

    from services.config import load_config
    from services.controller import Controller

    cfg = load_config(str(REPO / "configs" / "demo.yaml"), [
        f"model.path={model}", f"data.train={data / 'train.parquet'}", f"data.heldout={data / 'heldout.parquet'}",
        f"stages.grpo.batch_size={a.prompts}", f"stages.grpo.sampling.n={a.n}",
        f"stages.grpo.sampling.max_tokens={a.max_tokens}", f"stages.grpo.optim.lr={a.lr}", "stages.grpo.algo.kl_coef=0.0",
        "stages.grpo.algo.drop_uniform_groups=false", "trainer.probe_every=0", f"trainer.seed={a.seed}"] + overrides)
    cfg.stages = [s for s in cfg.stages if s.name == "grpo"]
    controller = Controller(cfg, Path(tempfile.mkdtemp(prefix="vireo-vs-trl-")), log=lambda *_: None)
    plans = controller.prepare()
    controller.start_actors()
    grpo, _, _ = controller.begin_stage(0, plans[0])
    rows = []
    for step in range(1, a.steps + 2):
        m = grpo.step(step, step)
        rows.append({"step_s": m["timing_s/step"], "gen_s": m["timing_s/gen"],
                     "train_s": m["timing_s/train"] + m["timing_s/sync"],
                     "gen_tokens": m["response_length/mean"] * a.prompts * a.n, "reward": m["reward/mean"]})
    ray.shutdown()
    return rows


# ---- TRL ----------------------------------------------------------------------------------------
def run_trl(model: str, data: Path, a: argparse.Namespace) -> list[dict]:
    import torch
    from datasets import Dataset
    from transformers import AutoProcessor, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from reward.compose import RewardConfig, RewardScorer
    from reward.types import ScoreRequest
    from rollout.prompts import chat_messages, decode_images
    from services.config import DataConfig
    from services.data.loading import load_problems

    torch.set_num_threads(2)
    problems = load_problems(str(data / "train.parquet")).problems
    by_question = {p.question: p for p in problems}
    system = DataConfig().system_prompt  # the same chat messages vireo renders
    def listed(messages):  # Arrow needs every message's content as a list of parts
        return [{**m, "content": [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str)
                 else m["content"]} for m in messages]

    rows = [{"prompt": listed(chat_messages(p.question, system)), "image": decode_images(p.images)[0],
             "question": p.question} for p in problems]
    scorer = RewardScorer(RewardConfig())

    def reward(completions, question, **_):
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        reqs = [ScoreRequest(t, by_question[q].answer, by_question[q].answer_type, by_question[q].options)
                for t, q in zip(texts, question)]
        return [r.score for r in scorer.score_batch(reqs)]

    timings: list[dict] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start, timings_gen[:] = time.perf_counter(), []

        def on_step_end(self, *_, **__):
            timings.append({"step_s": time.perf_counter() - self.start, "gen_s": sum(timings_gen)})

    timings_gen: list[float] = []
    args = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="trl-"), per_device_train_batch_size=a.prompts * a.n,
                      num_generations=a.n, max_completion_length=a.max_tokens, learning_rate=a.lr, beta=0.0,
                      max_steps=a.steps + 1, temperature=1.0, logging_steps=1, report_to=[], save_strategy="no",
                      seed=a.seed, use_cpu=True, bf16=False, dataloader_num_workers=0, lr_scheduler_type="constant",
                      warmup_steps=0)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=AutoProcessor.from_pretrained(model), callbacks=[Clock()])
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
                 gen_tokens=log.get("completions/mean_length", float("nan")) * a.prompts * a.n)
    return timings


# ---- driver -------------------------------------------------------------------------------------
def warm_model(a: argparse.Namespace, out: Path) -> tuple[str, Path]:
    """vireo's own warm-up (SFT) of the embedded default, once; its checkpoint is every run's start."""
    from services.config import load_config
    from services.controller import Controller

    cfg = load_config(str(REPO / "configs" / "demo.yaml"), [f"stages.coldstart.end.max_steps={a.warm_steps}",
                                                           "evaluation.limit=1"])
    cfg.stages = cfg.stages[:1]
    report = Controller(cfg, out, log=lambda *_: None).run()
    return report["final_checkpoint"], out / "data"


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
    work = Path(tempfile.mkdtemp(prefix="vireo-vs-trl-"))
    model, data = warm_model(a, work / "warm")
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
    print(f"{'':>8} {'step s':>8} {'gen s':>7} {'train s':>8} {'gen tok/s':>10}   per-run step s")
    summary = {}
    for c in contenders:
        runs = [summarise(r, a) for r in results[c]]
        summary[c] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"{c:>8} {summary[c]['step_s']:8.2f} {summary[c]['gen_s']:7.2f} {summary[c]['train_s']:8.2f} "
              f"{summary[c]['gen_tok_s']:10.0f}   " + " ".join(f"{r['step_s']:.2f}" for r in runs))
    print("\nreward/mean per step (mean over runs; step 0 is the untimed warm-up step)")
    curves = {c: [statistics.mean(run[i]["reward"] for run in results[c]) for i in range(a.steps + 1)] for c in contenders}
    print("step " + " ".join(f"{i:>5d}" for i in range(a.steps + 1)))
    for c in contenders:
        print(f"{c:>5}" + " ".join(f"{v:5.2f}" for v in curves[c]))
    headline = {f"{c}_over_trl_step_speed": round(summary["trl"]["step_s"] / summary[c]["step_s"], 3)
                for c in contenders if c != "trl" and "trl" in summary}
    print(json.dumps({**headline, **{f"{c}_{k}": round(v, 3) for c in contenders for k, v in summary[c].items()},
                      "reward_curves": {c: [round(v, 3) for v in curves[c]] for c in contenders}}))


if __name__ == "__main__":
    main()
