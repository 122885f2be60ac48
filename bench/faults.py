"""What losing rollout actors costs: the demo's model and data, a short cold start, then 30 GRPO steps —
once undisturbed and once with a rollout actor SIGKILLed while it generates every 5 steps (its prompts go
to the live actor, a replacement starts and is brought to the current weights). Prints a table, then one
JSON object as the last line: `fault_slowdown` (GRPO stage time with faults / without), `steps_lost`
(steps missing or repeated in the faulty run's metrics), `restarts`.

    python -m bench.faults [--steps 30] [--every 5] [--coldstart 60]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import threading
from pathlib import Path

import ray

from services.checks import load_config
from services.controller import Controller
from services.tracking import read_metrics


class KillsRolloutActors(Controller):
    """SIGKILLs a rollout actor's process shortly after every `every`-th GRPO rollout starts."""

    def __init__(self, *args, every: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.every, self.rollout_calls, self.kills = every, 0, 0

    def generate(self, problems, sampling):
        if sampling.n > 1:
            self.rollout_calls += 1
            if self.every and self.rollout_calls % self.every == 0:
                victim = self.rollouts[self.kills % len(self.rollouts)]
                pid = ray.get(victim.__ray_call__.remote(lambda actor: os.getpid()))
                threading.Timer(0.2, os.kill, (pid, signal.SIGKILL)).start()
                self.kills += 1
        return super().generate(problems, sampling)


def run(every: int, steps: int, coldstart: int, out: Path) -> dict:
    cfg = load_config("configs/demo.yaml", [
        f"stages.coldstart.end.max_steps={coldstart}", f"stages.grpo.end.max_steps={steps}",
        "stages.grpo.eval_every=0", "stages.grpo.save_every=0", "stages.connector.end.max_steps=1",
        "stages.connector.eval_every=0", "stages.connector.end.early_stop.metric=''"])
    controller = KillsRolloutActors(cfg, out, log=lambda *_: None, every=every)
    try:
        report = controller.run()
    finally:
        controller.stop_actors()
    grpo = next(s for s in report["stages"] if s["name"] == "grpo")
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r.get("stage") == "grpo" and "reward/mean" in r]
    steps_seen = [r["step"] for r in rows]
    expected = list(range(grpo["start_step"] + 1, grpo["end_step"] + 1))
    return {"seconds": grpo["seconds"], "kills": controller.kills, "restarts": rows[-1]["actors/restarts"],
            "steps_lost": len(set(expected) - set(steps_seen)) + (len(steps_seen) - len(set(steps_seen))),
            "reward_last5": sum(r["reward/mean"] for r in rows[-5:]) / 5}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--coldstart", type=int, default=60)
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="vireo-bench-faults-"))
    clean = run(0, args.steps, args.coldstart, out / "clean")
    faulty = run(args.every, args.steps, args.coldstart, out / "faulty")
    print(f"{'run':<10}{'GRPO s':>9}{'s/step':>9}{'kills':>7}{'restarts':>10}{'steps lost':>12}{'reward (last 5)':>17}")
    for name, r in (("clean", clean), ("faulty", faulty)):
        print(f"{name:<10}{r['seconds']:>9.1f}{r['seconds'] / args.steps:>9.2f}{r['kills']:>7}{r['restarts']:>10}"
              f"{r['steps_lost']:>12}{r['reward_last5']:>17.3f}")
    print(json.dumps({"fault_slowdown": round(faulty["seconds"] / clean["seconds"], 3),
                      "steps_lost": faulty["steps_lost"], "restarts": faulty["restarts"], "kills": faulty["kills"],
                      "grpo_steps": args.steps, "kill_every": args.every}))


if __name__ == "__main__":
    main()
