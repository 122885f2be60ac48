"""Where overlapping generation with training pays (issue 19): steps per second of `trainer.mode=one_step` and
of `async` with max_staleness 2 over `sync` on the same work and layout, each side's idle share, and whether
the speed cost learning.

Two layouts of the same actors (2 rollout engines, 2 learner ranks, the demo's step: 32 prompts x 8 samples):
- colocated: every actor may run on every core (the demo's topology): on 2 cores both phases already use
  them all, so overlap can only hide what one phase leaves idle;
- disaggregated: the engines pinned to half the cores and the learner ranks to the other half
  (`rollout.cpu_affinity`, `learner.cpu_affinity`), the CPU analogue of separate GPU pools, where a
  synchronous step leaves one side idle while the other works.

Speed: one warm fleet per layout, from one cold-start checkpoint (so responses have the trained lengths);
`--runs` rounds of `--steps` GRPO steps per mode, the modes alternating (reversed on odd rounds), the batches
generated ahead let go at each switch and the first step of each round a discarded warm-up; the median step time per mode; each side's idle share is 1 - the CPU
seconds its processes used (psutil) over wall time x the cores its threads can use. Learning: from the same
checkpoint, one run per arm (ARMS: each mode, async with truncated IS and once more uncorrected) and seed of
`--learn-steps` steps on the colocated fleet; held-out accuracy at the end against sync's spread over seeds
and one evaluation's 95 % binomial half-width, and reward by wall-clock and by samples on one plot.

    python -m bench.overlap [--runs 3] [--steps 6] [--learn-steps 30] [--seeds 0,1] [--out runs/overlap]

Prints the tables, then one JSON object as the last line: overlap_speedup_colocated,
overlap_speedup_disaggregated (the better overlapping mode's), speedup (per layout and mode), idle_fraction
(per layout, mode and side), step_s, heldout_accuracy (per arm and seed), sync_seed_spread_points,
heldout_half_width_points, minus_sync_points (per arm), plot, minutes.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import time
from pathlib import Path

import psutil
import ray

from bench.learning import build_seed, start_ray
from services.run_dir import METRICS_FILE, read_jsonl

MODES = {"sync": ("sync", 1), "one_step": ("one_step", 1), "async_k2": ("async", 2)}  # trainer.mode, max_staleness
OVERLAPPING = [m for m in MODES if m != "sync"]
# The learning runs: each mode as a user would run it (async two updates behind with truncated IS, which it
# needs), and async uncorrected, to show what the correction is for.
CORRECTION = "stages.grpo.algo.offpolicy_correction"
ARMS = {"sync": ("sync", "none"), "one_step": ("one_step", "none"), "async_k2": ("async_k2", "tis"),
        "async_k2_uncorrected": ("async_k2", "none")}  # mode, correction
BASE = ["evaluation.samples=0", "evaluation.max_tokens=40", "rollout.spares=0", "tracking.backends=[jsonl]"]


def layouts() -> dict[str, list[str]]:
    cores = sorted(os.sched_getaffinity(0))
    half = max(1, len(cores) // 2)
    rollout, learner = cores[:half], cores[half:] or cores[:half]
    return {"colocated": [], "disaggregated": [f"rollout.cpu_affinity=[{','.join(map(str, rollout))}]",
                                              f"learner.cpu_affinity=[{','.join(map(str, learner))}]"]}


def grpo_only(demo, checkpoint: str, overrides: list[str]):
    """The demo's GRPO stage alone, from the cold-start checkpoint."""
    from services.checks import load_config

    cfg = load_config("configs/demo.yaml", [*BASE, *overrides])
    cfg.data.train, cfg.data.heldout = demo.data.train, demo.data.heldout
    cfg.model.path = checkpoint
    cfg.stages = [copy.deepcopy(cfg.stages[1])]
    cfg.evaluation.before_train = False
    return cfg


def cold_start(out: Path, fleet_for) -> tuple[object, str]:
    """The demo's data and model, and its first stage (SFT, 200 steps): the checkpoint every run starts from."""
    from services.checks import load_config
    from services.run import Run

    cfg = load_config("configs/demo.yaml", BASE)
    files = build_seed(cfg, out)
    cfg.model.path, cfg.data.train, cfg.data.heldout = files["model"], files["train"], files["heldout"]
    cfg.stages = [cfg.stages[0]]
    cfg.evaluation.before_train = False
    run = Run(cfg, out / "coldstart", fleet=fleet_for(cfg), log=lambda *_: None)
    report = run.run()
    return cfg, report["final_checkpoint"]


def pids(actors) -> list[int]:
    return ray.get([a.__ray_call__.remote(lambda self: os.getpid()) for a in actors])


def cpu_seconds(pid_list: list[int]) -> float:
    total = 0.0
    for pid in pid_list:
        times = psutil.Process(pid).cpu_times()
        total += times.user + times.system + times.children_user + times.children_system
    return total


def side_capacity(cfg, side: str) -> int:
    """Cores a side's threads can keep busy: its threads, capped by the cores it may run on."""
    cores = len(os.sched_getaffinity(0))
    if side == "rollout":
        threads, pinned = cfg.rollout.num_actors * cfg.rollout.engine.cpu_threads, cfg.rollout.cpu_affinity
    else:
        threads, pinned = cfg.learner.num_ranks, cfg.learner.cpu_affinity
    return max(1, min(threads, len(pinned) if pinned else cores))


def measure_speed(cfg, fleet, runs: int, steps: int, work: Path) -> dict[str, dict]:
    """Median step time and idle share per mode on one warm fleet, the modes alternating round by round."""
    from services.run import Run

    run = Run(cfg, work, fleet=fleet, log=lambda *_: None)
    plans = run.prepare()
    run.start_fleet(cfg.model.path)
    kind = run.begin_stage(0, plans[0])[0].kind
    sides = {"rollout": pids(fleet.pool.actors), "learner": pids(fleet.learners.actors)}
    out = {mode: {"step_s": [], "busy": {s: 0.0 for s in sides}, "wall": 0.0} for mode in MODES}
    step = 0
    for round_index in range(runs):
        for mode in (list(MODES) if round_index % 2 == 0 else list(MODES)[::-1]):
            kind.finish()  # the previous mode's batches generated ahead are let go
            run.cfg.trainer.mode, run.cfg.trainer.max_staleness = MODES[mode]  # read by the stage at every step
            step += 1
            kind.step(step, step)  # warm-up
            before, started = {s: cpu_seconds(p) for s, p in sides.items()}, time.time()
            for _ in range(steps):
                step += 1
                out[mode]["step_s"].append(kind.step(step, step)["timing_s/step"])
            out[mode]["wall"] += time.time() - started
            for s, p in sides.items():
                out[mode]["busy"][s] += cpu_seconds(p) - before[s]
    kind.finish()
    return {mode: {"step_s": statistics.median(m["step_s"]),
                   "idle": {s: round(max(0.0, 1 - m["busy"][s] / (m["wall"] * side_capacity(cfg, s))), 3)
                            for s in sides}}
            for mode, m in out.items()}


def learning_run(cfg, fleet, run_dir: Path) -> dict:
    """One run; its reward per step with cumulative wall-clock and samples, and its final held-out accuracy."""
    from services.run import Run

    report = Run(cfg, run_dir, fleet=fleet, log=lambda *_: None).run()
    rows = [r for r in read_jsonl(run_dir / METRICS_FILE) if isinstance(r.get("reward/mean"), int | float)]
    stage = cfg.stages[0]
    clock, samples, curve = 0.0, 0, []
    for r in rows:
        clock += r["timing_s/step"]
        samples += stage.batch_size * stage.sampling.n
        curve.append((round(clock, 2), samples, r["reward/mean"]))
    return {"accuracy": report["heldout_accuracy_final"], "curve": curve}


def plot(learning: dict[str, dict[int, dict]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.3), constrained_layout=True)
    colours = {"sync": "tab:blue", "one_step": "tab:orange", "async_k2": "tab:green", "async_k2_uncorrected": "tab:red"}
    for mode, by_seed in learning.items():
        for i, result in enumerate(by_seed.values()):
            clock, samples, reward = zip(*result["curve"])
            label = mode if i == 0 else None
            axes[0].plot(clock, reward, color=colours[mode], alpha=0.8, label=label)
            axes[1].plot(samples, reward, color=colours[mode], alpha=0.8, label=label)
    axes[0].set_xlabel("seconds of GRPO steps")
    axes[1].set_xlabel("samples trained on")
    for ax in axes:
        ax.set_ylabel("mean reward")
    axes[0].legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    from services.fleet import Fleet

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--learn-steps", type=int, default=30)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--out", default="runs/overlap")
    args = parser.parse_args()
    started = time.time()
    out = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  cores {len(os.sched_getaffinity(0))}  load "
          f"{os.getloadavg()[0]:.2f}  2 rollout engines + 2 learner ranks (ZeRO-2, gloo), 32 prompts x 8 samples; "
          f"{args.runs} alternating rounds of {args.steps} steps per mode", flush=True)
    head = start_ray()
    fleets: dict[str, Fleet] = {}

    def fleet_for(cfg, layout: str = "colocated") -> Fleet:
        for name in [n for n in fleets if n != layout]:  # one layout's actors at a time on the cores
            fleets.pop(name).close()
        if layout not in fleets:
            fleets[layout] = Fleet(cfg, cfg.model.path, 0, layout, log=lambda *_: None)
        return fleets[layout]

    try:
        demo, checkpoint = cold_start(out, fleet_for)
        learning: dict[str, dict[int, dict]] = {arm: {} for arm in ARMS}
        for seed in seeds:
            for arm, (mode, correction) in ARMS.items():
                trainer_mode, staleness = MODES[mode]
                cfg = grpo_only(demo, checkpoint, [*layouts()["colocated"], f"trainer.mode={trainer_mode}",
                                                   f"trainer.max_staleness={staleness}", f"{CORRECTION}={correction}", f"trainer.seed={seed}",
                                                   f"stages.grpo.end.max_steps={args.learn_steps}"])
                learning[arm][seed] = learning_run(cfg, fleet_for(cfg), out / f"learn-{arm}-seed{seed}")
                print(f"# learning {arm} seed {seed}: held-out {learning[arm][seed]['accuracy']:.3f}", flush=True)
        speed = {}
        for layout, overrides in layouts().items():
            cfg = grpo_only(demo, checkpoint, overrides)
            speed[layout] = measure_speed(cfg, fleet_for(cfg, layout), args.runs, args.steps, out / f"speed-{layout}")
            print(f"# speed {layout}: " + ", ".join(f"{m} {s['step_s']:.2f} s/step" for m, s in speed[layout].items()),
                  flush=True)
    finally:
        for fleet in fleets.values():
            fleet.close()
        ray.shutdown()
        head.terminate()

    speedup = {layout: {m: s["sync"]["step_s"] / s[m]["step_s"] for m in MODES} for layout, s in speed.items()}
    print(f"\n{'layout':<15}{'mode':<10}{'s/step':>8}{'steps/s':>9}{'speed-up':>10}{'rollout idle':>14}{'learner idle':>14}")
    for layout, by_mode in speed.items():
        for mode, s in by_mode.items():
            print(f"{layout:<15}{mode:<10}{s['step_s']:8.2f}{1 / s['step_s']:9.3f}{speedup[layout][mode]:10.2f}"
                  f"{s['idle']['rollout']:14.2f}{s['idle']['learner']:14.2f}")
    print(f"\n{'arm':<22}" + "".join(f"{'seed ' + str(s):>10}" for s in seeds) + f"{'mean':>10}")
    accuracy = {mode: {seed: r["accuracy"] for seed, r in by_seed.items()} for mode, by_seed in learning.items()}
    for mode, by_seed in accuracy.items():
        print(f"{mode:<22}" + "".join(f"{a:10.3f}" for a in by_seed.values()) + f"{statistics.mean(by_seed.values()):10.3f}")
    spread = 100 * (max(accuracy["sync"].values()) - min(accuracy["sync"].values()))
    sync_mean = statistics.mean(accuracy["sync"].values())
    half_width = 100 * 1.96 * math.sqrt(sync_mean * (1 - sync_mean) / demo.data.n_heldout)
    diff = {arm: 100 * statistics.mean(accuracy[arm][s] - accuracy["sync"][s] for s in seeds) for arm in ARMS if arm != "sync"}
    print(f"\nheld-out accuracy after {args.learn_steps} steps, mean over seeds: "
          + ", ".join(f"{m} - sync {d:+.1f} points" for m, d in diff.items())
          + f"; sync's own spread over seeds {spread:.1f} points, one evaluation's 95 % binomial half-width "
            f"{half_width:.1f} points ({demo.data.n_heldout} items)")
    print(json.dumps({
        "overlap_speedup_colocated": round(max(speedup["colocated"][m] for m in OVERLAPPING), 3),
        "overlap_speedup_disaggregated": round(max(speedup["disaggregated"][m] for m in OVERLAPPING), 3),
        "speedup": {layout: {m: round(v, 3) for m, v in by_mode.items()} for layout, by_mode in speedup.items()},
        "idle_fraction": {layout: {mode: s["idle"] for mode, s in by_mode.items()} for layout, by_mode in speed.items()},
        "step_s": {layout: {mode: round(s["step_s"], 3) for mode, s in by_mode.items()} for layout, by_mode in speed.items()},
        "heldout_accuracy": accuracy, "sync_seed_spread_points": round(spread, 1),
        "heldout_half_width_points": round(half_width, 1),
        "minus_sync_points": {m: round(d, 1) for m, d in diff.items()}, "learn_steps": args.learn_steps,
        "plot": str(plot(learning, out / "reward.png")), "out": str(out),
        "minutes": round((time.time() - started) / 60, 1)}))


if __name__ == "__main__":
    main()
