"""Anatomy of a GRPO step through the real service (Ray, 2 vLLM rollout actors, reward actor, 2 DeepSpeed
ZeRO-2 learner ranks), and how step time grows with batch size, group size, response length and model size.

- `overhead_fraction`: on the demo's step shape (32 prompts x 8 samples x 40 tokens, tiny InternVL), the
  share of the step outside generation, reward, training and sync (sync includes the logprob probe);
- ladders: one setting varied from a base while the others stay put (prompts x n x tokens, model), the
  median of `--steps` steps per point after one warm-up step. `vs linear` is (t/t0)/(x/x0): 1 is linear
  growth, below 1 means fixed costs dominate, above 1 superlinear. Random-init models answer nothing right,
  so dynamic filtering is off (every sample trains).

    python -m bench.step [--steps 3] [--models 128x2,256x4,512x8,768x12]

Prints tables, then one JSON line with `overhead_fraction` and each ladder's step times.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import ray

from bench.rollout import model_for
from services.checks import load_config
from services.run import Run
from services.stages import StageKind

PHASES = ("timing_s/gen", "timing_s/reward", "timing_s/train", "timing_s/sync")


def start(model_path: str, data_dir: Path | None, overrides: list[str]) -> tuple[Run, StageKind]:
    """A run on a fleet of its own, inside its GRPO stage: the run and the stage's kind, whose step() is timed."""
    cfg = load_config(None, [f"model.path={model_path}", "data.n_train=256", "data.n_heldout=8",
                             "stages.0.algo.drop_uniform_groups=false", "stages.0.optim.lr=1e-5",
                             "learner.optim.micro_batch_size=32"] + overrides)
    if data_dir is not None:
        cfg.data.train, cfg.data.heldout = str(data_dir / "train.parquet"), str(data_dir / "heldout.parquet")
    run = Run(cfg, Path(tempfile.mkdtemp(prefix="vireo-bench-step-")), log=lambda *_: None)
    plans = run.prepare()
    run.start_fleet(cfg.model.path)
    return run, run.begin_stage(0, plans[0])[0].kind


def measure(grpo: StageKind, steps: int, prompts: int, n: int, tokens: int) -> dict[str, float]:
    """Median phase times over `steps` GRPO steps of this shape, after one warm-up step."""
    stage = grpo.cfg
    stage.batch_size, stage.sampling.n, stage.sampling.max_tokens = prompts, n, tokens
    rows = [grpo.step(i + 1, i + 1) for i in range(steps + 1)][1:]
    med = {k: statistics.median(r[k] for r in rows) for k in ("timing_s/step",) + PHASES}
    med["overhead_fraction"] = statistics.median(1 - sum(r[k] for k in PHASES) / r["timing_s/step"] for r in rows)
    med["gen_tokens"] = statistics.median(r["response_length/mean"] * prompts * n for r in rows)
    return med


def ladder_table(name: str, unit: str, points: list[tuple[float, dict]]) -> list[dict]:
    x0, t0 = points[0][0], points[0][1]["timing_s/step"]
    print(f"\n{name}")
    print(f"{unit:>10} {'step s':>8} {'gen s':>7} {'train s':>8} {'sync s':>7} {'vs linear':>10}")
    out = []
    for x, m in points:
        vs_linear = (m["timing_s/step"] / t0) / (x / x0)
        print(f"{x:10g} {m['timing_s/step']:8.2f} {m['timing_s/gen']:7.2f} {m['timing_s/train']:8.2f} "
              f"{m['timing_s/sync']:7.2f} {vs_linear:10.2f}")
        out.append({unit: x, "step_s": round(m["timing_s/step"], 3), "vs_linear": round(vs_linear, 3)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--models", default="128x2,256x4,512x8,768x12", help="LLM hidden x layers")
    args = parser.parse_args()
    ray.init(num_cpus=max(os.cpu_count() or 1, 4), include_dashboard=False, log_to_driver=False)
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  load {os.getloadavg()[0]:.2f}  cores {os.cpu_count()}  "
          f"2 rollout actors + 2 learner ranks (ZeRO-2, gloo), medians of {args.steps} steps per point")
    tiny, tiny_params = model_for(args.models.split(",")[0])
    run, grpo = start(tiny, None, [])
    data_dir = Path(run.cfg.data.train).parent
    demo = measure(grpo, args.steps, 32, 8, 40)
    print(f"\ndemo step shape (32 prompts x 8 x 40 tokens, {tiny_params / 1e6:.2f} M params): step "
          f"{demo['timing_s/step']:.2f} s = gen {demo['timing_s/gen']:.2f} + reward {demo['timing_s/reward']:.2f} "
          f"+ train {demo['timing_s/train']:.2f} + sync {demo['timing_s/sync']:.2f} + rest; "
          f"overhead_fraction {demo['overhead_fraction']:.3f}")
    ladders = {
        "batch (prompts per step, n 8, 40 tokens)": ("prompts", [(p, measure(grpo, args.steps, p, 8, 40)) for p in (8, 16, 32)]),
        "group size (n, 16 prompts, 40 tokens)": ("n", [(n, measure(grpo, args.steps, 16, n, 40)) for n in (4, 8, 16)]),
        "response length (max tokens, 16 prompts x 8)": ("tokens", [(t, measure(grpo, args.steps, 16, 8, t)) for t in (20, 40, 80)]),
    }
    run.stop_fleet()
    model_points = []
    for spec in args.models.split(","):
        path, params = model_for(spec)
        run, grpo = start(path, data_dir, [])
        model_points.append((round(params / 1e6, 2), measure(grpo, args.steps, 8, 4, 20)))
        run.stop_fleet()
    ladders["model size (M params, 8 prompts x 4 x 20 tokens)"] = ("params_m", model_points)
    ray.shutdown()
    result = {"overhead_fraction": round(demo["overhead_fraction"], 4), "demo_step_s": round(demo["timing_s/step"], 3)}
    for name, (unit, points) in ladders.items():
        result[unit] = ladder_table(name, unit, points)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
