"""`vireo eval`: generate with the vLLM rollout engine (same chat template and image handling as
training), score with the same code as `vireo score` and the reward actor, write per-sample results."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rollout.prompts import DEFAULT_SYSTEM_PROMPT, render_prompt
from rollout.types import RolloutRequest, SamplingConfig
from rollout.vllm_adapter import EngineOptions
from services.datasets import load_problems
from services.problems import Problem
from services.scoring import format_summary, progress_bar, score_rows


@dataclass
class EvalOptions:
    protocol: str = ""  # "" = mmmu for MMMU-schema data, math otherwise
    mode: str = "official"
    temperature: float = 0.0
    max_tokens: int = 48
    seed: int = 0
    limit: int = 0
    batch_size: int = 64
    system_prompt: str = DEFAULT_SYSTEM_PROMPT


def problem_row(problem: Problem, response: str) -> dict:
    """The row `vireo score` reads: response plus what the protocol needs to judge it."""
    return {"id": problem.id, "subject": problem.subject, "difficulty": problem.difficulty,
            "question_type": "multiple-choice" if problem.answer_type == "choice" else "open",
            "answer_type": problem.answer_type, "options": list(problem.options), "answer": problem.answer,
            "response": response}


def evaluate_model(model_path: str, data_path: str, options: EvalOptions, out_dir: str | None = None,
                   engine_options: EngineOptions | None = None) -> dict:
    from rollout.engine import RolloutEngine  # starts vLLM; imported here so `vireo score` stays light

    loaded = load_problems(data_path, limit=options.limit or None)
    problems = loaded.problems
    if not problems:
        raise ValueError(f"no usable problems in {data_path} (skipped: {dict(loaded.skipped)})")
    protocol = options.protocol or ("mmmu" if problems[0].source == "MMMU" else "math")
    engine = RolloutEngine(model_path, engine_options or EngineOptions(max_images_per_prompt=max(
        len(p.images) for p in problems) or 1))
    sampling = SamplingConfig(n=1, temperature=options.temperature, max_tokens=options.max_tokens,
                              seed=options.seed)
    responses: dict[str, str] = {}
    progress = progress_bar("[eval] generating")
    for i in range(0, len(problems), options.batch_size):
        chunk = problems[i:i + options.batch_size]
        requests = [RolloutRequest(p.id, render_prompt(engine.processor, p.question, options.system_prompt),
                                   p.images) for p in chunk]
        for traj in engine.generate(requests, sampling):
            responses[traj.prompt_id] = traj.response_text
        progress(i + len(chunk), len(problems))
    rows, summary = score_rows([problem_row(p, responses[p.id]) for p in problems], protocol, options.mode)
    summary.update(model=model_path, data=str(data_path), data_skipped=dict(loaded.skipped),
                   sampling={"temperature": options.temperature, "max_tokens": options.max_tokens,
                             "seed": options.seed})
    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with (out / "results.jsonl").open("w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps({k: row.get(k) for k in ("id", "subject", "response", "pred", "correct",
                                                                   "reason", "answer")}) + "\n")
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="vireo eval", description="Generate with vLLM and score a data set.")
    parser.add_argument("--model", required=True, help="HF checkpoint directory")
    parser.add_argument("--data", required=True, help="parquet file or directory (vireo, MMMU or math schema)")
    parser.add_argument("--protocol", choices=["mmmu", "math"], default="")
    parser.add_argument("--mode", choices=["official", "strict"], default="official")
    parser.add_argument("--out", default=None, help="write results.jsonl and summary.json here")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=0)
    args = parser.parse_args(argv)
    summary = evaluate_model(args.model, args.data, EvalOptions(
        protocol=args.protocol, mode=args.mode, temperature=args.temperature, max_tokens=args.max_tokens,
        seed=args.seed, limit=args.limit), args.out)
    print(format_summary(summary))
    return 0
