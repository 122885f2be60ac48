"""The paper's ablations at small scale (issue 10), each from one shared proof run's checkpoints.

Every arm is `vireo train configs/ablations/<name>.yaml [override]` started from a checkpoint of one proof
run (bench/learning.py or `vireo train configs/proof.yaml`) on that run's data files, so no arm pays for a
cold start and all arms start from the same weights. The arms run one after the other in this process and
one local Ray cluster (each with its own actors), so Ray starts once:

| ablation | arms | starts from | paper |
|---|---|---|---|
| connector in RL | rl_reference (all train) / rl_connector_frozen | cold start | R1V3 §5.2 |
| curriculum | rl_reference (mixed) / rl_curriculum (easy -> hard) | cold start | R1V3 §5.3 |
| clip-higher | rl_clip_higher (0.28) / same with clip_high=0.2 | cold start | R1V3 §5.5 |
| last stage | last_connector_only / same with connector+LLM | GRPO end | R1V3 §3.4, Table 2 |

    nice -n 5 python -m bench.ablations --from runs/learning/<time>/proof-<time> [--only reference,frozen]

Prints one row per arm (held-out accuracy at the start and at each evaluation, per subject, the mean reward
of the last 5 steps, the largest gradient norm), then one JSON line with every arm's figures.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from bench.learning import start_ray, vireo_train
from services.run_dir import METRICS_FILE, REPORT_FILE, read_jsonl

ABLATIONS = "configs/ablations"
# name -> (config, overrides, checkpoint of the proof run it starts from)
ARMS: dict[str, tuple[str, list[str], str]] = {
    "reference": ("rl_reference", [], "coldstart"),
    "connector_frozen": ("rl_connector_frozen", [], "coldstart"),
    "curriculum": ("rl_curriculum", [], "coldstart"),
    "clip_higher": ("rl_clip_higher", [], "coldstart"),
    "clip_symmetric": ("rl_clip_higher", ["stages.grpo.algo.clip_high=0.2"], "coldstart"),
    "last_connector": ("last_connector_only", [], "grpo"),
    "last_connector_llm": ("last_connector_only", ["stages.connector.trainable=[connector,llm]"], "grpo"),
}


def summarise(run: Path) -> dict:
    """Held-out accuracy per evaluation (step within the run, overall and by subject) and the training
    signals the paper reads (reward, gradient norm)."""
    report = json.loads((run / REPORT_FILE).read_text())
    evals = [{"step": ev["step"], "stage": ev["stage"] or "(start)", "accuracy": ev["accuracy"],
              "by_subject": ev["by_subject"]} for ev in report["eval"] if ev["set"] == "heldout"]
    steps = [m for m in read_jsonl(run / METRICS_FILE) if "actor/loss" in m]
    rewards = [m["reward/mean"] for m in steps if "reward/mean" in m]
    norms = [m["actor/grad_norm"] for m in steps if not math.isnan(m.get("actor/grad_norm", math.nan))]
    return {"run": str(run), "evals": evals, "reward_last5": sum(rewards[-5:]) / len(rewards[-5:]) if rewards else None,
            "grad_norm_max": max(norms) if norms else None,
            "gain_points": round(100 * (evals[-1]["accuracy"] - evals[0]["accuracy"]), 1)}


def row(name: str, s: dict) -> str:
    curve = " ".join(f"{e['step']}:{e['accuracy']:.3f}" for e in s["evals"])
    subjects = sorted(s["evals"][0]["by_subject"])
    by = " ".join(f"{k} {s['evals'][0]['by_subject'][k]:.2f}->{s['evals'][-1]['by_subject'][k]:.2f}" for k in subjects)
    reward = f"{s['reward_last5']:.3f}" if s["reward_last5"] is not None else "  -  "
    norm = f"{s['grad_norm_max']:.2f}" if s["grad_norm_max"] is not None else "-"
    return f"{name:<20}{s['gain_points']:>+7.1f}  reward {reward}  |g|max {norm:<7} {curve}   {by}"


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="source", required=True, help="a proof run directory (checkpoints/, data/)")
    parser.add_argument("--only", default="", help=f"comma-separated arms of {', '.join(ARMS)}")
    parser.add_argument("--seed", type=int, default=0, help="trainer.seed (sampling and data order)")
    parser.add_argument("--out", default="runs/ablations")
    args = parser.parse_args(argv)
    source = Path(args.source)
    names = [n for n in args.only.split(",") if n] or list(ARMS)
    unknown = set(names) - set(ARMS)
    if unknown:
        raise SystemExit(f"unknown arms {sorted(unknown)}; known: {', '.join(ARMS)}")
    out = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    started, results = time.time(), {}
    head = start_ray()
    try:
        run_arms(names, source, args.seed, out, results)
    finally:
        head.terminate()
    print(f"\nfrom {source} (seed {args.seed}); gain = last held-out evaluation - first (the starting checkpoint), "
          f"points; step:accuracy per evaluation")
    for name, s in results.items():
        print(row(name, s))
    result = {"source": str(source), "seed": args.seed, "minutes": round((time.time() - started) / 60, 1),
              "arms": results}
    print(json.dumps(result))
    return result


def run_arms(names: list[str], source: Path, seed: int, out: Path, results: dict) -> None:
    for name in names:
        config, overrides, checkpoint = ARMS[name]
        run = vireo_train(f"{ABLATIONS}/{config}.yaml", [
            f"model.path={source / 'checkpoints' / checkpoint}", f"data.train={source / 'data' / 'train.parquet'}",
            f"data.heldout={source / 'data' / 'heldout.parquet'}", f"trainer.seed={seed}", *overrides],
            out / f"{name}.log", out / name)
        results[name] = summarise(run)
        print(row(name, results[name]), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
