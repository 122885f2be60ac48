"""`vireo eval`: generate with the vLLM rollout engine (same chat template and image handling as
training), score with the same code as `vireo score` and the reward actor, write per-sample results."""
from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from learner.types import TrainSample
from reward import mmmu
from reward.benchmark import score_rows
from reward.format_scorer import score_format
from reward.types import ScoreRequest
from rollout.prompts import DEFAULT_SYSTEM_PROMPT, render_prompt
from rollout.types import RolloutRequest, SamplingConfig, Trajectory
from rollout.vllm_adapter import EngineOptions
from services.data.loading import DataError, load_problems
from services.data.problems import Problem
from services.run_dir import to_json, write_atomic
from services.scoring import clean_text, format_summary, progress_bar, write_jsonl


# "auto" resolves by the system prompt in use (resolve_mode); the others are reward.mmmu's modes.
EVAL_MODES = ("auto",) + mmmu.MODES


@dataclass
class EvalConfig:
    """How held-out sets are judged, by `vireo eval` and during training (the run config's `evaluation`):
    protocol "" picks mmmu for MMMU-schema data and math otherwise; mode auto|official|strict|r1v3, where
    auto (the default) is r1v3 when the system prompt asks for \\boxed{} (vireo's own does), else official.
    During training each problem also gets `samples` responses at `sample_temperature` (0: none): their
    accuracy, and the entropy figures measured on them (a greedy answer that never reflects leaves
    critical-token entropy undefined)."""

    protocol: str = ""
    mode: str = "auto"
    temperature: float = 0.0
    max_tokens: int = 48
    limit: int = 0
    samples: int = 4
    sample_temperature: float = 1.0
    before_train: bool = True  # evaluate the starting weights (verl's val_before_train); a run from a
    # checkpoint whose evaluation is already on record (bench/learning.py's arms) may skip it


@dataclass
class EvalOptions(EvalConfig):
    """One evaluation call: the settings plus what its caller decides (a run passes its seed and prompt)."""

    seed: int = 0
    batch_size: int = 64
    system_prompt: str = DEFAULT_SYSTEM_PROMPT


def rollout_requests(processor, problems: list[Problem], system_prompt: str) -> list[RolloutRequest]:
    """What the engines get for problems, in training, evaluation and make-coldstart alike: the
    chat-templated prompt and the images."""
    return [RolloutRequest(p.id, render_prompt(processor, p.question, system_prompt), p.images) for p in problems]


def score_requests(problems: dict[str, Problem], trajectories: list[Trajectory]) -> list[ScoreRequest]:
    """What the reward actor gets: each response with its own problem's answer (by prompt id)."""
    return [ScoreRequest(t.response_text, problems[t.prompt_id].answer, problems[t.prompt_id].answer_type,
                         problems[t.prompt_id].options) for t in trajectories]


def problem_row(problem: Problem, response: str) -> dict:
    """The row `vireo score` reads: response plus what the protocol needs to judge it."""
    return {"id": problem.id, "subject": problem.subject, "difficulty": problem.difficulty,
            "question_type": "multiple-choice" if problem.answer_type == "choice" else "open",
            "answer_type": problem.answer_type, "options": list(problem.options), "answer": problem.answer,
            "response": response}


Generate = Callable[[list[Problem], SamplingConfig], list[Trajectory]]
Score = Callable[[list[dict], str, str], tuple[list[dict], dict]]


def resolve_mode(mode: str, system_prompt: str) -> str:
    """The MMMU mode an evaluation scores in: an explicit official/strict/r1v3 as given; "auto" is r1v3
    (the last \\boxed{} read first) when the system prompt asks for \\boxed{}, else official."""
    if mode not in EVAL_MODES:
        raise ValueError(f"evaluation mode must be one of {EVAL_MODES}, got {mode!r}")
    if mode != "auto":
        return mode
    return "r1v3" if "\\boxed" in system_prompt else "official"


def protocol_for(problems: list[Problem], protocol: str = "") -> str:
    """The protocol asked for, else mmmu for MMMU-schema data and math otherwise."""
    return protocol or ("mmmu" if problems and problems[0].source == "MMMU" else "math")


def evaluate_problems(problems: list[Problem], generate: Generate, score: Score,
                      options: EvalOptions) -> tuple[list[dict], dict]:
    """The one judge: responses from `generate` (the rollout actors during training, a local engine in
    `vireo eval`), scored by the benchmark protocol through `score` (reward.benchmark.score_rows, in the
    reward actor during training). Returns the scored rows and the summary, which adds the format rate."""
    protocol = protocol_for(problems, options.protocol)
    sampling = SamplingConfig(n=1, temperature=options.temperature, max_tokens=options.max_tokens,
                              seed=options.seed)
    responses = {t.prompt_id: t.response_text for t in generate(problems, sampling)}
    mode = resolve_mode(options.mode, options.system_prompt)
    rows, summary = score([problem_row(p, responses[p.id]) for p in problems], protocol, mode)
    summary["format_rate"] = sum(score_format(p["response"]) for p in rows) / max(len(rows), 1)
    return rows, summary


@dataclass
class EvalResult:
    """One held-out set judged during training: the protocol's figures on the greedy answers (accuracy) and
    on `samples` sampled responses per problem (accuracy_sampled), and the learner's on the model's own
    responses (entropy, critical-token entropy: on the sampled ones when there are any) and on the reference
    solutions (sft_loss). `items`: one row per problem (id, subject, correct, sampled_correct)."""

    accuracy: float
    format_rate: float
    unparsed_rate: float
    n: int
    by_subject: dict[str, float]
    sft_loss: float = float("nan")
    entropy: float = float("nan")
    critical_entropy: float = float("nan")
    critical_token_rate: float = float("nan")
    high_entropy_fraction: float = float("nan")
    accuracy_sampled: float = float("nan")
    critical_entropy_after: float = float("nan")
    items: list[dict] = field(default_factory=list, repr=False)


LEARNER_FIGURES = ("sft_loss", "entropy", "critical_entropy", "critical_entropy_after", "critical_token_rate",
                   "high_entropy_fraction")


def _correct(row: dict) -> int | None:
    """A scored row's verdict as 0/1; None for a row the protocol skipped."""
    return None if row.get("correct") is None else int(bool(row["correct"]))


def _sampled(problems: list[Problem], options: EvalOptions, generate: Generate,
             score: Score) -> tuple[list[Trajectory], dict[str, list[int]], float]:
    """`options.samples` responses per problem at `options.sample_temperature` (one generate call), scored by
    the same protocol as the greedy answers, each row as its own problem's (same id, so the protocol judges
    it as that item): the trajectories, each problem's verdicts (0/1; rows the protocol skips left out) and
    the accuracy over all scored samples."""
    sampling = SamplingConfig(n=options.samples, temperature=options.sample_temperature,
                              max_tokens=options.max_tokens, seed=options.seed)
    trajectories = generate(problems, sampling)
    by_id = {p.id: p for p in problems}
    rows, summary = score([problem_row(by_id[t.prompt_id], t.response_text) for t in trajectories],
                          protocol_for(problems, options.protocol), resolve_mode(options.mode, options.system_prompt))
    verdicts: dict[str, list[int]] = {p.id: [] for p in problems}
    for t, row in zip(trajectories, rows):
        if (verdict := _correct(row)) is not None:
            verdicts[t.prompt_id].append(verdict)
    return trajectories, verdicts, summary["accuracy"] if summary["scored"] else float("nan")


def evaluate_with_learner(problems: list[Problem], options: EvalOptions, generate: Generate, score: Score,
                          evaluate_responses: Callable[[list[TrainSample]], dict[str, float]],
                          sft_sample: Callable[[Problem], TrainSample]) -> EvalResult:
    """Held-out accuracy as `vireo eval` computes it (evaluate_problems: the rollout actors generate, the
    reward actor judges by the benchmark protocol), the same on `options.samples` sampled responses per
    problem, plus the learner's forward pass over the model's own responses (the entropy figures, R1V3 §5.1:
    on the sampled ones, else on the greedy ones) and over the reference solutions (the validation loss an
    SFT stage's early stopping watches, R1V3 §3.4)."""
    responses: list[Trajectory] = []

    def generate_and_keep(batch: list[Problem], sampling: SamplingConfig) -> list[Trajectory]:
        out = generate(batch, sampling)
        responses.extend(out)
        return out

    rows, summary = evaluate_problems(problems, generate_and_keep, score, options)
    verdicts: dict[str, list[int]] | None = None
    accuracy_sampled = float("nan")
    if options.samples > 0:
        responses, verdicts, accuracy_sampled = _sampled(problems, options, generate, score)
    own = [TrainSample(t.prompt_token_ids, t.response_token_ids, t.images) for t in responses if t.response_token_ids]
    figures = evaluate_responses(own) if own else {}
    with_solution = [p for p in problems if p.solution]
    if with_solution:
        figures["sft_loss"] = evaluate_responses([sft_sample(p) for p in with_solution])["loss"]
    items = [{"id": row["id"], "subject": row.get("subject"), "correct": _correct(row),
              "sampled_correct": (sum(verdicts[row["id"]]) / len(verdicts[row["id"]])
                                  if verdicts is not None and verdicts[row["id"]] else None)} for row in rows]
    return EvalResult(accuracy=summary["accuracy"], format_rate=summary["format_rate"],
                      unparsed_rate=summary["unparsed_rate"], n=summary["scored"],
                      by_subject={s: v["acc"] for s, v in summary["subjects"].items()},
                      accuracy_sampled=accuracy_sampled, items=items,
                      **{k: figures[k] for k in LEARNER_FIGURES if k in figures})


def evaluate_model(model_path: str, data_path: str, options: EvalOptions, out_dir: str | None = None,
                   engine_options: EngineOptions | None = None) -> dict:
    from rollout.engine import RolloutEngine  # starts vLLM; imported here so `vireo score` stays light

    loaded = load_problems(data_path, limit=options.limit or None)
    problems = loaded.problems
    if not problems:
        raise DataError(f"no usable problems in {data_path} (skipped: {dict(loaded.skipped)})")
    import torch

    images = max(len(p.images) for p in problems) or 1
    engine = RolloutEngine(model_path, replace(engine_options or EngineOptions(), max_images_per_prompt=images),
                           on_gpu=torch.cuda.is_available())
    progress = progress_bar("[eval] generating")

    def generate(chunk_of: list[Problem], sampling: SamplingConfig) -> list[Trajectory]:
        out: list[Trajectory] = []
        for i in range(0, len(chunk_of), options.batch_size):
            chunk = chunk_of[i:i + options.batch_size]
            out += engine.generate(rollout_requests(engine.processor, chunk, options.system_prompt), sampling)
            progress(i + len(chunk), len(chunk_of))
        return out

    rows, summary = evaluate_problems(problems, generate, lambda r, protocol, mode: score_rows(r, protocol, mode),
                                      options)
    summary.update(model=model_path, data=str(data_path), data_skipped=dict(loaded.skipped),
                   sampling={"temperature": options.temperature, "max_tokens": options.max_tokens,
                             "seed": options.seed})
    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_jsonl(out / "results.jsonl", ({k: row.get(k) for k in ("id", "subject", "response", "pred", "correct",
                                                                     "reason", "answer")} for row in rows))
        write_atomic(out / "summary.json", clean_text(to_json(summary, indent=1, ensure_ascii=False)))
    return summary


def main(argv) -> int:
    import argparse

    from learner.types import DTYPES

    defaults = EvalOptions()
    parser = argparse.ArgumentParser(prog="vireo eval", description="Generate with vLLM and score a data set.")
    parser.add_argument("--model", required=True, help="HF checkpoint directory")
    parser.add_argument("--data", required=True, help="parquet file or directory (vireo, MMMU or math schema)")
    parser.add_argument("--protocol", choices=["mmmu", "math"], default="")
    parser.add_argument("--mode", choices=EVAL_MODES, default=defaults.mode,
                        help="official: the benchmark rules; strict: no random guess; r1v3: last \\boxed{} first; "
                             "auto: r1v3 when the system prompt asks for \\boxed{} (vireo's does), else official")
    parser.add_argument("--out", default=None, help="write results.jsonl and summary.json here")
    parser.add_argument("--temperature", type=float, default=defaults.temperature)
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--limit", type=int, default=defaults.limit)
    engine = EngineOptions()
    parser.add_argument("--dtype", choices=DTYPES, default=engine.dtype, help="weights and compute dtype")
    parser.add_argument("--max-model-len", type=int, default=engine.max_model_len,
                        help="context length: prompt (with image tokens) + --max-tokens must fit")
    parser.add_argument("--tensor-parallel-size", type=int, default=engine.tensor_parallel_size,
                        help="GPUs the engine shards over (one node)")
    args = parser.parse_args(argv)
    try:
        if args.max_tokens >= args.max_model_len:
            raise DataError(f"--max-tokens {args.max_tokens} leaves no room for the prompt in --max-model-len "
                            f"{args.max_model_len}")
        if args.model.startswith(("/", ".", "~")) and not Path(args.model).expanduser().is_dir():
            raise DataError(f"--model {args.model}: no such model directory (a path, not a hub id)")
        summary = evaluate_model(args.model, args.data, EvalOptions(
            protocol=args.protocol, mode=args.mode, temperature=args.temperature, max_tokens=args.max_tokens,
            seed=args.seed, limit=args.limit), args.out, EngineOptions(
            dtype=args.dtype, max_model_len=args.max_model_len, tensor_parallel_size=args.tensor_parallel_size,
            seed=args.seed))
    except DataError as exc:  # before any engine starts
        print(f"vireo eval: {exc}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0
