"""`vireo make-coldstart`: cold-start SFT data by rejection sampling (R1V3 §2 distils its traces so).

K responses per problem from the same vLLM rollout actors training uses, scored by the reward actor;
a response is kept when it is correct and in the `<think>…</think> \\boxed{}` format (format score 1),
at most M distinct ones per problem. Each kept trace is one row in vireo's schema with the trace as its
`solution`, so the file is directly an SFT stage's data.
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
import ray

from rollout.types import SamplingConfig
from actors.supervision import RestartBudget
from services.checks import load_config
from services.data.loading import load_problems, write_problems
from services.data.problems import Problem
from services.evaluation import rollout_requests, score_requests
from services.fleet import Fleet

BATCH_PROBLEMS = 64


def make_coldstart(model: str, data: str, out: str, *, samples: int = 8, max_per_problem: int = 2,
                   temperature: float = 1.0, max_tokens: int = 48, num_actors: int = 2, limit: int = 0,
                   seed: int = 0, fleet: Fleet | None = None, log=print) -> dict:
    """`fleet`: warm actors to sample and score with, reset to `model` (else a generation-only fleet of
    `num_actors` starts for the call and goes with it)."""
    if samples < 1 or max_per_problem < 1:
        raise ValueError("--samples and --max-per-problem must be >= 1")
    loaded = load_problems(data, limit=limit or None)
    if not loaded.problems:
        raise ValueError(f"no usable problems in {data} (skipped: {dict(loaded.skipped)})")
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model)
    started_ray = not ray.is_initialized()
    own = fleet is None
    if own:
        cfg = load_config(None, [f"model.path={model}", f"data.train={data}", f"rollout.num_actors={num_actors}",
                                 f"trainer.seed={seed}"])
        fleet = Fleet(cfg, model, log=log, learners=False)
    else:
        cfg = copy.deepcopy(fleet.cfg)
        cfg.model.path, cfg.data.train, cfg.trainer.seed = model, data, seed
        fleet.reset(cfg, model, 0, Path(out).stem, RestartBudget(cfg.faults.max_restarts))
    kept: list[Problem] = []
    solved = scored = 0
    try:
        for i in range(0, len(loaded.problems), BATCH_PROBLEMS):
            chunk = loaded.problems[i:i + BATCH_PROBLEMS]
            sampling = SamplingConfig(n=samples, temperature=temperature, max_tokens=max_tokens, seed=seed + i)
            trajectories = fleet.generate(rollout_requests(processor, chunk, cfg.data.system_prompt), sampling)
            by_id = {p.id: p for p in chunk}
            results = fleet.score(score_requests(by_id, trajectories))
            scored += len(results)
            traces: dict[str, list[str]] = {}
            for traj, result in zip(trajectories, results):
                good = result.parts["accuracy"] == 1.0 and result.parts["format"] == 1.0
                mine = traces.setdefault(traj.prompt_id, [])
                if good and traj.response_text not in mine and len(mine) < max_per_problem:
                    mine.append(traj.response_text)
            for pid, texts in traces.items():
                solved += bool(texts)
                kept += [dataclasses.replace(by_id[pid], id=f"{pid}#{k}", solution=text)
                         for k, text in enumerate(texts)]
            log(f"[coldstart] {min(i + BATCH_PROBLEMS, len(loaded.problems))}/{len(loaded.problems)} problems, "
                f"{solved} with a kept trace")
    finally:
        if own:
            fleet.close()
        if started_ray:
            ray.shutdown()
    write_problems(out, kept)
    return {"problems": len(loaded.problems), "problems_kept": solved, "traces": len(kept), "samples": scored,
            "skipped": dict(loaded.skipped)}
