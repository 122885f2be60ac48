"""The paper's ablations at small scale (issue 18), on the learning proof's protocol (bench/learning.py):
the same seeds, models, data, cold start and evaluation; each arm is a one-stage run (two for the
curriculum) from the seed's cold-start checkpoint, or from the rl arm's last one, and differs from its
reference in the one setting the finding is about. Differences are paired per held-out item at the final
step, with 95 % intervals from the bootstrap over seeds and items.

| finding | reference | variant | starts from | paper |
|---|---|---|---|---|
| connector_in_rl | rl (all modules train) | connector frozen | cold start | R1V3 §5.2 |
| curriculum | rl (mixed data) | easy (difficulty 1-2) then hard (3), same steps | cold start | R1V3 §5.3 |
| clip_higher | clip 0.2/0.2, 4 updates per batch | clip_high 0.28 | cold start | R1V3 §5.5 |
| last_stage | connector+LLM SFT | connector-only SFT (cosine, 3 % warm-up) | rl's last | R1V3 §3.4, Table 2 |
| rl_vs_sft | sft (the cold start continued) | rl | cold start | R1V3 §6.1 |

    nice -n 5 python -m bench.ablations [--seeds 0,1,2] [--only connector_in_rl,clip_higher] [k=v ...]

Prints each arm's held-out curve per seed, a table of the findings, then one JSON object as its last line:
per finding the variant-minus-reference points (mean, 95 % CI, by seed), seeds, heldout_n, minutes.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.learning import (Bench, Curve, arm_config, ci_text, cold_start, compare, curve_of, curve_table,
                            final_evals, seed_overrides)
from services.checks import load_config
from services.config import to_yaml
from services.run_dir import CHECKPOINTS_DIR


@dataclass(frozen=True)
class Arm:
    """base: the bench.learning arm it is built from; overrides: key=value on that one-stage config (its
    stage addressed as stages.0); start: the cold start, or the rl arm's last checkpoint."""

    base: str
    overrides: tuple[str, ...] = ()
    start: str = "coldstart"
    curriculum: bool = False


CLIP = ("stages.0.algo.updates_per_batch=4", "stages.0.algo.clip_low=0.2")
ARMS: dict[str, Arm] = {
    "rl": Arm("rl"),
    "sft": Arm("sft"),
    "connector_frozen": Arm("rl", ("stages.0.trainable=[vision,llm]",)),
    "curriculum": Arm("rl", curriculum=True),
    "clip_symmetric": Arm("rl", (*CLIP, "stages.0.algo.clip_high=0.2")),
    "clip_higher": Arm("rl", (*CLIP, "stages.0.algo.clip_high=0.28")),
    "last_connector_llm": Arm("sft", ("stages.0.trainable=[connector,llm]", "stages.0.optim.lr=1e-4",
                                      "stages.0.optim.schedule=cosine", "stages.0.optim.warmup_ratio=0.03"), "rl"),
    "last_connector": Arm("sft", ("stages.0.trainable=[connector]", "stages.0.optim.lr=1e-4",
                                  "stages.0.optim.schedule=cosine", "stages.0.optim.warmup_ratio=0.03"), "rl"),
}
# finding -> (reference arm, variant arm, paper)
FINDINGS: dict[str, tuple[str, str, str]] = {
    "connector_in_rl": ("rl", "connector_frozen", "R1V3 §5.2"),
    "curriculum": ("rl", "curriculum", "R1V3 §5.3"),
    "clip_higher": ("clip_symmetric", "clip_higher", "R1V3 §5.5"),
    "last_stage": ("last_connector_llm", "last_connector", "R1V3 §3.4, Table 2"),
    "rl_vs_sft": ("sft", "rl", "R1V3 §6.1"),
}


def ablation_config(proof, name: str, checkpoint: str, out: Path):
    """The arm's config: bench.learning's one-stage arm (for the curriculum, its GRPO stage split in two by
    difficulty, same total steps), written to OUT/<arm>.yaml and loaded with the arm's overrides as
    `vireo train OUT/<arm>.yaml OVERRIDES` would (so the file reproduces the arm)."""
    arm = ARMS[name]
    cfg = arm_config(proof, arm.base, checkpoint)
    cfg.name = f"{proof.name}-{name}"
    if arm.curriculum:
        stage = cfg.stages[0]
        easy, hard = copy.deepcopy(stage), copy.deepcopy(stage)
        easy.name, hard.name = "easy", "hard"
        easy.data.filter.difficulty, hard.data.filter.difficulty = [1, 2], [3]
        easy.end.max_steps = stage.end.max_steps // 2
        hard.end.max_steps = stage.end.max_steps - easy.end.max_steps
        cfg.stages = [easy, hard]
    path = out / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(cfg))
    return load_config(str(path), list(arm.overrides))


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/proof.yaml")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--only", default="", help=f"comma-separated findings of {', '.join(FINDINGS)}")
    parser.add_argument("--out", default="runs/ablations", help="the bench writes into OUT/<time>/")
    parser.add_argument("--into", default="", help="this directory instead, e.g. a bench.learning output: its "
                        "seeds' data, cold starts and rl/sft arms are read back, not run again")
    parser.add_argument("overrides", nargs="*", help="key=value for every run")
    args = parser.parse_args(argv)
    findings = [f for f in args.only.split(",") if f] or list(FINDINGS)
    unknown = sorted(set(findings) - set(FINDINGS))
    if unknown:
        raise SystemExit(f"unknown findings {unknown}; known: {', '.join(FINDINGS)}")
    names = list(dict.fromkeys(a for f in findings for a in FINDINGS[f][:2]))
    if any(ARMS[n].start == "rl" for n in names) and "rl" not in names:
        names.insert(0, "rl")
    names.sort(key=lambda n: ARMS[n].start == "rl")  # the rl arm's checkpoint first
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.into) if args.into else Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    started, curves = time.time(), {}
    bench = Bench()
    try:
        for seed in seeds:
            curves[seed] = run_seed(bench, load_config(args.config, [*seed_overrides(seed), *args.overrides]),
                                    names, out / f"seed{seed}")
            print(curve_table({seed: curves[seed]}), flush=True)
    finally:
        bench.close()
    result = {"findings": {}, "seeds": seeds, "out": str(out)}
    print("\nvariant - reference at the final step, held-out accuracy points, paired per item; "
          "mean over seeds [95 % bootstrap CI over seeds and items]")
    for finding in findings:
        reference, variant, paper = FINDINGS[finding]
        fig = compare(curves, variant, reference)
        result["findings"][finding] = {"reference": reference, "variant": variant, "paper": paper,
                                       "variant_minus_reference_points": fig}
        print(f"{finding:<17}{variant + ' - ' + reference:<36}{ci_text(fig)}")
    result["heldout_n"] = min(len(next(iter(c.values())).points[0]["heldout"]["items_by_id"]) for c in curves.values())
    result["minutes"] = round((time.time() - started) / 60, 1)
    print(json.dumps(result))
    return result


def run_seed(bench: Bench, proof, names: list[str], out: Path) -> dict[str, Curve]:
    checkpoint, start, _ = cold_start(bench, proof, out)
    # the findings compare greedy held-out accuracy: the arms skip the sampled responses and the OOD set
    # (a greedy answer does not depend on them; the rl and sft arms of a bench.learning directory keep theirs)
    proof.evaluation.samples, proof.data.ood = 0, ""
    starts, checkpoints = {"coldstart": start}, {"coldstart": checkpoint}
    curves: dict[str, Curve] = {}
    for name in names:
        arm = ARMS[name]
        cfg = ablation_config(proof, name, checkpoints[arm.start], out)
        run_dir = out / name
        report = bench.train(cfg, run_dir, out / f"{name}.log")
        curves[name] = curve_of(report, run_dir, [s.name for s in cfg.stages], starts[arm.start])
        if name == "rl":  # the last-stage arms start from its final checkpoint and evaluation
            checkpoints["rl"] = str(run_dir / CHECKPOINTS_DIR / cfg.stages[-1].name)
            starts["rl"] = final_evals(report, run_dir, cfg.stages[-1].name)
    return curves


if __name__ == "__main__":
    main(sys.argv[1:])
