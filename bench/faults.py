"""What losing rollout actors costs: the demo's model and data, a short cold start, then 30 GRPO steps —
once undisturbed and once with a rollout actor SIGKILLed while it generates every 5 steps — on one fleet
(2 rollout actors, `--spares` warm spares, 2 learner ranks) that serves both runs. A lost actor's prompts
go to the live ones and a warm spare takes its slot at once; a new spare starts in the background. Prints
a table, then one JSON object as the last line: `fault_slowdown` (GRPO stage time with faults / without),
`steps_lost` (steps missing or repeated in the faulty run's metrics), `restarts`, and the cost of a
replacement: `replacement_wait_s` (time steps waited for one to come up) and `replacement_startup_s`
(median start-up of the actors started off the steps' path, until seen up).

    python -m bench.faults [--steps 30] [--every 5] [--coldstart 60] [--spares 1]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import tempfile
import threading
from pathlib import Path

import ray

from services.checks import load_config
from services.fleet import Fleet
from services.run import Run
from services.run_dir import METRICS_FILE, read_jsonl


def killing_every(every: int, fleet: Fleet, kills: list):
    """Wraps the fleet's generate: SIGKILLs a serving rollout actor's process shortly after every
    `every`-th GRPO rollout starts."""

    def wrapper(generate):
        calls = [0]

        def generate_and_kill(requests, sampling):
            if sampling.n > 1:
                calls[0] += 1
                if every and calls[0] % every == 0:
                    victim = fleet.pool.actors[len(kills) % len(fleet.pool.actors)]
                    pid = ray.get(victim.__ray_call__.remote(lambda actor: os.getpid()))
                    threading.Timer(0.2, os.kill, (pid, signal.SIGKILL)).start()
                    kills.append(pid)
            return generate(requests, sampling)

        return generate_and_kill

    return wrapper


def config(steps: int, coldstart: int, spares: int):
    return load_config("configs/demo.yaml", [
        f"stages.coldstart.end.max_steps={coldstart}", f"stages.grpo.end.max_steps={steps}",
        "stages.grpo.eval_every=0", "stages.grpo.save_every=0", "stages.connector.end.max_steps=1",
        "stages.connector.eval_every=0", "stages.connector.end.early_stop.metric=''", f"rollout.spares={spares}"])


def run(fleet: Fleet, every: int, steps: int, coldstart: int, spares: int, out: Path) -> dict:
    cfg = config(steps, coldstart, spares)
    kills: list[int] = []
    waits, startups = len(fleet.pool.replacement_waits), len(fleet.pool.startups)
    fleet.generate = killing_every(every, fleet, kills)(Fleet.generate.__get__(fleet))
    try:
        report = Run(cfg, out, fleet=fleet, log=lambda *_: None).run()
    finally:
        del fleet.generate
    grpo = next(s for s in report["stages"] if s["name"] == "grpo")
    rows = [r for r in read_jsonl(out / METRICS_FILE) if r.get("stage") == "grpo" and "reward/mean" in r]
    steps_seen = [r["step"] for r in rows]
    expected = list(range(grpo["start_step"] + 1, grpo["end_step"] + 1))
    return {"seconds": grpo["seconds"], "kills": len(kills), "restarts": rows[-1]["actors/restarts"],
            "steps_lost": len(set(expected) - set(steps_seen)) + (len(steps_seen) - len(set(steps_seen))),
            "reward_last5": sum(r["reward/mean"] for r in rows[-5:]) / 5,
            "replacement_waits": fleet.pool.replacement_waits[waits:], "startups": fleet.pool.startups[startups:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--coldstart", type=int, default=60)
    parser.add_argument("--spares", type=int, default=1)
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="vireo-bench-faults-"))
    cfg = config(args.steps, args.coldstart, args.spares)
    Run(cfg, out / "model").prepare()  # the demo's embedded model, built once; both runs build the same
    fleet = Fleet(cfg, cfg.model.path, log=lambda *_: None)
    try:
        clean = run(fleet, 0, args.steps, args.coldstart, args.spares, out / "clean")
        faulty = run(fleet, args.every, args.steps, args.coldstart, args.spares, out / "faulty")
    finally:
        fleet.close()
    print(f"{'run':<10}{'GRPO s':>9}{'s/step':>9}{'kills':>7}{'restarts':>10}{'steps lost':>12}{'reward (last 5)':>17}")
    for name, r in (("clean", clean), ("faulty", faulty)):
        print(f"{name:<10}{r['seconds']:>9.1f}{r['seconds'] / args.steps:>9.2f}{r['kills']:>7}{r['restarts']:>10}"
              f"{r['steps_lost']:>12}{r['reward_last5']:>17.3f}")
    waits, startups = faulty["replacement_waits"], faulty["startups"]
    print(f"\nreplacements: {len(waits)} waited for inside a step ({sum(waits):.1f} s in all); {len(startups)} "
          f"actors started off the step path came up after {statistics.median(startups) if startups else float('nan'):.1f} s "
          f"(median; steps went on meanwhile, on the live actors and any warm spare)")
    print(json.dumps({"fault_slowdown": round(faulty["seconds"] / clean["seconds"], 3),
                      "steps_lost": faulty["steps_lost"], "restarts": faulty["restarts"], "kills": faulty["kills"],
                      "spares": args.spares, "replacement_wait_s": round(sum(waits), 1),
                      "replacement_startup_s": round(statistics.median(startups), 1) if startups else None,
                      "grpo_steps": args.steps, "kill_every": args.every}))


if __name__ == "__main__":
    main()
