"""The learning proof (issue 18; R1V3 §6.1 "RL, not more SFT, lifts reasoning"): from one cold-start
checkpoint per seed, do matched arms that differ only in their training signal end apart on held-out
problems, in and out of distribution?

Per seed (model.seed = data.seed = trainer.seed): the seed's data (train, a fixed held-out set and an
out-of-distribution set, recorded in the output) and model are built once; the cold start runs
(`configs/proof.yaml`'s first stage: SFT on an imperfect teacher's traces, data.teacher_error_rate); then
every arm starts from that checkpoint as a one-stage run, so prompt order (the stage sampler's seed) and
sampling seeds (the stage's step) are the same in every arm:

| arm | what trains the model | the same in every arm |
|---|---|---|
| rl | GRPO, rule reward 0.8·accuracy + 0.2·format (R1V3 §3.1) | steps, prompts per step and their order, |
| random | GRPO, reward.kind=random (Bernoulli at the batch's mean rule reward) | responses sampled per prompt (8), |
| sft | the cold-start SFT continued on the same traces, same prompts | seeds, evaluation |

Every arm is evaluated every `eval_every` steps on the same problems: greedy accuracy (the benchmark's
protocol and mode, recorded) and temperature-1 accuracy averaged over `evaluation.samples` samples, with
critical-token entropy on the sampled responses. Figures are paired per item (the same problem in two
arms) and their 95 % intervals come from a bootstrap over seeds and, within each, over items. Nothing is
picked by held-out accuracy; the final step is reported.

    nice -n 5 python -m bench.learning [--seeds 0,1,2,3,4] [--arms rl,random,sft] [--out runs/learning] [k=v ...]

Prints per arm and seed the held-out curve, then the summary table and, as its last line, one JSON object:
gain_points per arm (mean and 95 % CI over seeds), rl_minus_sft_points, rl_minus_random_points,
ood_gain_points (each with its CI), the sampled-accuracy twins, the critical-token entropy findings (Spearman
with accuracy per seed, and the accuracy of the checkpoint it selects against the last one and the one with
the best reward), seeds, heldout_n, ood_n, minutes.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from services.run_dir import CHECKPOINTS_DIR, METRICS_FILE, REPORT_FILE, read_jsonl
from services.selection import spearman

HELDOUT, OOD = "heldout", "ood"
BOOTSTRAP_REPS = 4000


def _free_port() -> int:
    """A port nobody listens on now (for the Ray head)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_ray(attempts: int = 5, wait_s: float = 300) -> subprocess.Popen:
    """One Ray head for every run of the bench (`ray start --head --block`, ended with the bench). On a
    loaded 2-core machine a niced `ray.init()` mostly failed: the raylet gives up after ~16 s waiting for its
    dashboard agent's port file (node_manager.cc WaitForDashboardAgentPorts "Check failed"), and a niced
    agent takes longer to import. So the head's own processes run at the default priority; its workers still
    get Ray's worker niceness and the driver keeps the bench's."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a head of this process alone
    for attempt in range(1, attempts + 1):
        port = _free_port()
        cmd = ["nice", "-n", str(-os.nice(0)), str(Path(sys.executable).with_name("ray")), "start", "--head",
               "--block", f"--port={port}", f"--num-cpus={max(os.cpu_count() or 1, 4)}", "--include-dashboard=false",
               "--disable-usage-stats"]
        head = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + wait_s
        while head.poll() is None and time.time() < deadline:
            try:
                ray.init(address=f"127.0.0.1:{port}", log_to_driver=False)
                return head
            except Exception:  # not up yet
                time.sleep(5)
        head.terminate()
        print(f"# Ray head did not come up (attempt {attempt}/{attempts})", flush=True)
    raise RuntimeError("could not start a Ray head")


class Bench:
    """The bench's Ray head and one warm fleet (services/fleet.py) that every run of the bench is reset
    onto, so actor start-up is paid once, not per arm. The fleet's log lines go to the current run's log."""

    def __init__(self):
        self.head = start_ray()
        self.fleet = None
        self.log_file = sys.stdout

    def log(self, *parts) -> None:
        print(*parts, file=self.log_file, flush=True)

    def train(self, cfg, run_dir: Path, log: Path) -> dict:
        """`vireo train` of a loaded config into `run_dir` on the bench's fleet; returns the report. A run
        that already ended there (a bench re-run with --into) is read back; one cut short resumes."""
        from services.fleet import Fleet
        from services.run import Run, stage_table

        done = run_dir / REPORT_FILE
        if done.is_file() and "final_checkpoint" in (report := json.loads(done.read_text())):
            print(f"# {cfg.name}: done in {run_dir}, read back", flush=True)
            return report
        print(f"# {cfg.name} -> {run_dir}  (log: {log})", flush=True)
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        self.log_file = log.open("w")
        try:
            if self.fleet is None:
                self.fleet = Fleet(cfg, cfg.model.path, 0, run_dir.name, log=self.log)
            report = Run(cfg, run_dir, fleet=self.fleet, log=self.log).run()
            self.log(stage_table(report))
        finally:
            self.log_file.close()
            self.log_file = sys.stdout
        return report

    def close(self) -> None:
        if self.fleet is not None:
            self.fleet.close()
        self.head.terminate()


def seed_overrides(seed: int) -> list[str]:
    return [f"model.seed={seed}", f"data.seed={seed}", f"trainer.seed={seed}", f"reward.seed={seed}"]


def build_seed(cfg, out: Path) -> dict[str, str]:
    """The seed's model and data, built once: every arm of the seed reads these files."""
    from learner.model_factory import make_model
    from services.data.synthetic import make_dataset

    model = out / "model"
    if not model.is_dir():
        make_model(model, cfg.model.arch, cfg.model.seed)
    data = out / "data"
    summary_path = data / "summary.json"  # make_dataset writes it last
    if not summary_path.is_file():
        d = cfg.data
        make_dataset(data, d.n_train, d.n_heldout, d.tasks, image_size=d.image_size, seed=d.seed,
                     teacher_error_rate=d.teacher_error_rate, n_ood=d.n_ood, teacher_wrong=tuple(d.teacher_wrong))
    return {"model": str(model), "data": str(data), "train": str(data / "train.parquet"),
            "heldout": str(data / "heldout.parquet"), "ood": str(data / "ood.parquet"),
            "summary": json.loads(summary_path.read_text())}


def cold_start(bench: Bench, proof, seed_dir: Path) -> tuple[str, dict[str, dict], dict]:
    """The seed's model and data (built once, into SEED_DIR), set in `proof`; then its cold start. Returns
    the cold-start checkpoint, its final evaluation per set (every arm's step 0) and the data's summary."""
    files = build_seed(proof, seed_dir)
    proof.model.path, proof.data.train, proof.data.heldout = files["model"], files["train"], files["heldout"]
    proof.data.ood = files["ood"] if proof.data.n_ood else ""
    run_dir, stage = seed_dir / "coldstart", proof.stages[0].name
    report = bench.train(coldstart_config(proof), run_dir, seed_dir / "coldstart.log")
    return str(run_dir / CHECKPOINTS_DIR / stage), final_evals(report, run_dir, stage), files["summary"]


# ---- the arms: each a one-stage config from the cold-start checkpoint --------------------------------
def coldstart_config(proof):
    """The proof config's first stage alone: the seed's cold start, which every arm starts from."""
    cfg = copy.deepcopy(proof)
    cfg.stages = [cfg.stages[0]]
    cfg.evaluation.before_train = False  # a random-init model: nothing to compare against
    return cfg


def arm_config(proof, arm: str, checkpoint: str):
    """The proof config reduced to one stage from the cold-start checkpoint: the GRPO stage (rule or
    random reward) or the cold-start stage continued for as many steps, evaluated as often."""
    cfg = copy.deepcopy(proof)
    coldstart, grpo = cfg.stages[0], cfg.stages[1]
    if arm == "sft":
        stage = coldstart
        stage.name = "sft"
        stage.end = grpo.end
        stage.eval_every, stage.save_every = grpo.eval_every, grpo.save_every
    else:
        stage = grpo
    if arm == "random":
        cfg.reward = dataclasses.replace(cfg.reward, kind="random")
    cfg.stages = [stage]
    cfg.model.path = checkpoint
    cfg.evaluation.before_train = False  # step 0 is the cold start's own final evaluation
    cfg.name = f"{proof.name}-{arm}"
    return cfg


ARMS = ("rl", "random", "sft")


@dataclass
class Curve:
    """One arm of one seed: per evaluated step (0 = the cold-start checkpoint), per set, the report's
    evaluation entry with its per-item results."""

    points: dict[int, dict[str, dict]] = field(default_factory=dict)
    rewards: dict[int, float] = field(default_factory=dict)  # mean reward of the steps up to each evaluation

    def accuracy(self, step: int, set_name: str = HELDOUT, key: str = "accuracy") -> float:
        return self.points[step][set_name][key]


def read_items(run_dir: Path, entry: dict) -> dict[str, tuple[float, float]]:
    """id -> (greedy correct, sampled fraction correct) of one evaluation."""
    rows = read_jsonl(run_dir / entry["items"])
    return {r["id"]: (float(r["correct"]), float("nan") if r["sampled_correct"] is None else float(r["sampled_correct"]))
            for r in rows}


def curve_of(report: dict, run_dir: Path, stages: list[str], start: dict[str, dict]) -> Curve:
    """An arm's evaluations by step (the run's steps: its stages start from the cold-start checkpoint),
    its step 0 the cold start's final evaluation."""
    curve = Curve(points={0: start})
    for ev in report["eval"]:
        if ev["stage"] in stages:
            curve.points.setdefault(ev["step"], {})[ev["set"]] = {**ev, "items_by_id": read_items(run_dir, ev)}
    metrics = [m for m in read_jsonl(run_dir / METRICS_FILE) if isinstance(m.get("reward/mean"), int | float)]
    for step in curve.points:
        recent = [m["reward/mean"] for m in metrics if step - 5 < m["step"] <= step]
        curve.rewards[step] = statistics.mean(recent) if recent else float("nan")
    return curve


def final_evals(report: dict, run_dir: Path, stage: str) -> dict[str, dict]:
    """The stage-end evaluation per set (the cold start's is every arm's step 0)."""
    return {ev["set"]: {**ev, "items_by_id": read_items(run_dir, ev)} for ev in report["eval"]
            if ev["stage"] == stage and ev["name"].endswith(" end")}


# ---- statistics -----------------------------------------------------------------------------------
def paired(a: dict, b: dict, index: int = 0) -> np.ndarray:
    """Per-item differences a - b (greedy: index 0, sampled: 1) over the items both evaluated."""
    ids = sorted(a.keys() & b.keys())
    return np.array([a[i][index] - b[i][index] for i in ids], dtype=np.float64)


def bootstrap_ci(per_seed: list[np.ndarray], reps: int = BOOTSTRAP_REPS, seed: int = 0) -> dict:
    """Mean over seeds of each seed's mean item difference, in points, with a 95 % interval from a two-level
    bootstrap: seeds with replacement, then items with replacement within each drawn seed."""
    per_seed = [d[~np.isnan(d)] for d in per_seed]
    per_seed = [d for d in per_seed if d.size]
    if not per_seed:
        return {"mean": None, "ci95": [None, None], "by_seed": []}
    rng = np.random.default_rng(seed)
    k = len(per_seed)
    stats = np.empty(reps)
    for r in range(reps):
        seeds = rng.integers(0, k, size=k)
        stats[r] = np.mean([per_seed[s][rng.integers(0, per_seed[s].size, size=per_seed[s].size)].mean()
                            for s in seeds])
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return {"mean": round(100 * float(np.mean([d.mean() for d in per_seed])), 1),
            "ci95": [round(100 * float(lo), 1), round(100 * float(hi), 1)],
            "by_seed": [round(100 * float(d.mean()), 1) for d in per_seed]}


def compare(curves: dict[int, dict[str, Curve]], arm: str, against: str | None, set_name: str = HELDOUT,
            index: int = 0) -> dict:
    """arm's final step minus `against`'s final step (None: minus the cold start), per item, over seeds."""
    diffs = []
    for arms in curves.values():
        if arm not in arms or (against and against not in arms):
            continue
        a = arms[arm]
        if set_name not in a.points[0]:
            continue
        final_a = a.points[max(a.points)][set_name]["items_by_id"]
        if against is None:
            base = a.points[0][set_name]["items_by_id"]
        else:
            b = arms[against]
            base = b.points[max(b.points)][set_name]["items_by_id"]
        diffs.append(paired(final_a, base, index))
    return bootstrap_ci(diffs)


def entropy_selection(curves: dict[int, dict[str, Curve]]) -> dict:
    """Per seed: Spearman(critical-token entropy of the sampled responses, greedy held-out accuracy) over
    every evaluated checkpoint of every arm, and the held-out accuracy of the rl arm's checkpoint with the
    highest critical-token entropy, its last one and the one with the best recent reward (R1V3 §5.1)."""
    out = {}
    for seed, arms in curves.items():
        xs, ys = [], []
        for name, c in arms.items():
            for step, sets in c.points.items():
                if step == 0 and name != "rl":
                    continue  # the shared cold start once
                xs.append(_num(sets[HELDOUT].get("critical_entropy")))
                ys.append(sets[HELDOUT]["accuracy"])
        row = {"spearman": _round(spearman(xs, ys), 3), "checkpoints": len(xs),
               "defined": sum(not math.isnan(x) for x in xs)}
        rl = arms.get("rl")
        if rl:
            steps = [s for s in rl.points if s > 0]
            by_entropy = max(steps, key=lambda s: (_nan_low(_num(rl.points[s][HELDOUT].get("critical_entropy"))), s))
            by_reward = max(steps, key=lambda s: (_nan_low(rl.rewards.get(s, math.nan)), s))
            row.update({f"{k}_step": s for k, s in (("entropy", by_entropy), ("reward", by_reward))},
                       **{f"accuracy_{k}": rl.accuracy(s) for k, s in
                          (("by_entropy", by_entropy), ("last", max(steps)), ("by_reward", by_reward))})
        out[str(seed)] = row
    return out


def _num(value) -> float:
    return float(value) if isinstance(value, int | float) else math.nan


def _nan_low(value: float) -> float:
    return -math.inf if math.isnan(value) else value


def _round(value: float, digits: int = 3):
    return None if math.isnan(value) else round(value, digits)


# ---- output ---------------------------------------------------------------------------------------
def curve_table(curves: dict[int, dict[str, Curve]]) -> str:
    steps = sorted({s for arms in curves.values() for c in arms.values() for s in c.points})
    width = max(8, *(len(name) + 2 for arms in curves.values() for name in arms))
    head = f"{'seed':<6}{'arm':<{width}}{'set':<9}{'figure':<10}" + "".join(f"{s:>8}" for s in steps)
    lines = [head]
    for seed, arms in curves.items():
        for name, c in arms.items():
            for set_name in (HELDOUT, OOD):
                for key, label in (("accuracy", "greedy"), ("accuracy_sampled", "t=1"), ("critical_entropy", "crit.H")):
                    if set_name == OOD and key == "critical_entropy":
                        continue
                    vals = [c.points.get(s, {}).get(set_name, {}).get(key) for s in steps]
                    if all(v is None for v in vals):
                        continue
                    lines.append(f"{seed:<6}{name:<{width}}{set_name:<9}{label:<10}"
                                 + "".join(f"{v:>8.3f}" if isinstance(v, int | float) else f"{'-':>8}" for v in vals))
    return "\n".join(lines)


def subject_table(curves: dict[int, dict[str, Curve]]) -> str:
    """Final greedy held-out accuracy by subject, per arm, mean over seeds (color reported apart)."""
    subjects = sorted({k for arms in curves.values() for c in arms.values()
                       for k in c.points[0][HELDOUT]["by_subject"]})
    lines = [f"{'arm':<12}" + "".join(f"{s:>12}" for s in subjects)]
    start = {s: statistics.mean(arms["rl"].points[0][HELDOUT]["by_subject"].get(s, math.nan)
                                for arms in curves.values() if "rl" in arms) for s in subjects}
    lines.append(f"{'cold start':<12}" + "".join(f"{start[s]:>12.3f}" for s in subjects))
    for name in ARMS:
        got = [arms[name] for arms in curves.values() if name in arms]
        if got:
            lines.append(f"{name:<12}" + "".join(
                f"{statistics.mean(c.points[max(c.points)][HELDOUT]['by_subject'].get(s, math.nan) for c in got):>12.3f}"
                for s in subjects))
    return "\n".join(lines)


def plot(curves: dict[int, dict[str, Curve]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(HELDOUT, "accuracy", "held-out, greedy"), (HELDOUT, "accuracy_sampled", "held-out, t=1"),
              (OOD, "accuracy", "out of distribution, greedy"), (HELDOUT, "critical_entropy", "critical-token entropy")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.3), constrained_layout=True)
    colours = {"rl": "tab:blue", "random": "tab:red", "sft": "tab:green"}
    for ax, (set_name, key, title) in zip(axes, panels):
        for name in ARMS:
            per_seed = [arms[name] for arms in curves.values() if name in arms]
            if not per_seed:
                continue
            steps = sorted(per_seed[0].points)
            for c in per_seed:
                ax.plot(steps, [_num(c.points[s].get(set_name, {}).get(key)) for s in steps], color=colours[name],
                        alpha=0.25, linewidth=0.8)
            mean = [np.nanmean([_num(c.points[s].get(set_name, {}).get(key)) for c in per_seed]) for s in steps]
            ax.plot(steps, mean, color=colours[name], marker=".", label=name)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("steps after the cold start")
    axes[0].legend(fontsize=8)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ---- the bench ------------------------------------------------------------------------------------
def main(argv: list[str]) -> dict:
    from services.checks import load_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/proof.yaml")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--out", default="runs/learning", help="the bench writes into OUT/<time>/")
    parser.add_argument("--into", default="", help="this directory instead: runs already done there are read back")
    parser.add_argument("--plot", default="", help="write the curves here (PNG); default OUT/curves.png")
    parser.add_argument("overrides", nargs="*", help="key=value for every run, e.g. stages.grpo.end.max_steps=20")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise SystemExit(f"unknown arms {unknown}; known: {', '.join(ARMS)}")
    out = Path(args.into) if args.into else Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    bench = Bench()
    curves: dict[int, dict[str, Curve]] = {}
    datasets = {}
    try:
        for seed in seeds:
            proof = load_config(args.config, [*seed_overrides(seed), *args.overrides])
            seed_dir = out / f"seed{seed}"
            checkpoint, start, datasets[str(seed)] = cold_start(bench, proof, seed_dir)
            curves[seed] = {}
            for arm in arms:
                cfg = arm_config(proof, arm, checkpoint)
                report = bench.train(cfg, seed_dir / arm, seed_dir / f"{arm}.log")
                curves[seed][arm] = curve_of(report, seed_dir / arm, [s.name for s in cfg.stages], start)
            print(curve_table({seed: curves[seed]}), flush=True)
    finally:
        bench.close()
    return summarise(curves, proof, seeds, datasets, out, Path(args.plot) if args.plot else out / "curves.png",
                     started)


def summarise(curves, proof, seeds, datasets, out: Path, plot_path: Path, started: float) -> dict:
    figure = {}
    for name in curves[seeds[0]]:
        figure[name] = compare(curves, name, None)
    result = {
        "gain_points": figure,
        "rl_minus_sft_points": compare(curves, "rl", "sft"),
        "rl_minus_random_points": compare(curves, "rl", "random"),
        "ood_gain_points": compare(curves, "rl", None, OOD),
        "ood_rl_minus_sft_points": compare(curves, "rl", "sft", OOD),
        "sampled": {"gain_points": {name: compare(curves, name, None, index=1) for name in curves[seeds[0]]},
                    "rl_minus_sft_points": compare(curves, "rl", "sft", index=1),
                    "rl_minus_random_points": compare(curves, "rl", "random", index=1)},
        "critical_entropy": entropy_selection(curves),
        "seeds": seeds,
        "heldout_n": min(len(arms["rl" if "rl" in arms else next(iter(arms))].points[0][HELDOUT]["items_by_id"])
                         for arms in curves.values()),
        "ood_n": min((len(next(iter(arms.values())).points[0].get(OOD, {}).get("items_by_id", {}))
                      for arms in curves.values()), default=0),
        "final_step": max(max(c.points) for arms in curves.values() for c in arms.values()),
        "eval_mode": next(iter(next(iter(curves.values())).values())).points[0][HELDOUT].get("mode"),
        "teacher_error_rate": proof.data.teacher_error_rate,
        "teacher_wrong": list(proof.data.teacher_wrong),
        "teacher_error_share": {s: {task: t["error_share"] for task, t in d.get("teacher", {}).items()}
                                for s, d in datasets.items()},
        "plot": str(plot(curves, plot_path)),
        "out": str(out),
        "minutes": round((time.time() - started) / 60, 1),
    }
    print(f"\nheld-out accuracy per arm and seed (step 0 = the cold-start checkpoint; greedy, t=1 = mean over "
          f"{proof.evaluation.samples} samples at temperature {proof.evaluation.sample_temperature}, crit.H = "
          "critical-token entropy of the sampled responses)")
    print(curve_table(curves))
    print("\nfinal greedy held-out accuracy by subject, mean over seeds")
    print(subject_table(curves))
    print("\npoints at the final step, paired per item; mean over seeds [95 % bootstrap CI over seeds and items]")
    rows = [(f"{name} gain", figure[name]) for name in figure] + [
        ("rl - sft", result["rl_minus_sft_points"]), ("rl - random", result["rl_minus_random_points"]),
        ("ood: rl gain", result["ood_gain_points"]), ("ood: rl - sft", result["ood_rl_minus_sft_points"])]
    for label, fig in rows:
        print(f"{label:<16}{ci_text(fig)}")
    for label, fig in (("t=1: rl - sft", result["sampled"]["rl_minus_sft_points"]),
                       ("t=1: rl - random", result["sampled"]["rl_minus_random_points"])):
        print(f"{label:<16}{ci_text(fig)}")
    print("\ncritical-token entropy per seed: Spearman with held-out accuracy, and the rl arm's checkpoint it "
          "selects (accuracy) against the last and the best-by-reward")
    for seed, row in result["critical_entropy"].items():
        print(f"seed {seed}: {json.dumps(row)}")
    print(json.dumps(result))
    return result


def ci_text(fig: dict) -> str:
    if fig["mean"] is None:
        return "-"
    return f"{fig['mean']:+6.1f}  [{fig['ci95'][0]:+.1f}, {fig['ci95'][1]:+.1f}]  by seed {fig['by_seed']}"


if __name__ == "__main__":
    main(sys.argv[1:])
