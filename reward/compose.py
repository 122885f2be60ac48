"""The reward: R = 0.8·R_acc + 0.2·R_format (R1V3 §3.1, ε = 0.8), for batches of responses.

Accuracy runs in a reward.sandbox pool (hostile answers cannot hang or crash the caller); format is a
linear string check and runs here, on the full response.
"""
from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from common.registry import Registry
from reward.choice_scorer import score_choice
from reward.format_scorer import score_format
from reward.math_scorer import score_math
from reward.open_scorer import score_open
from reward.sandbox import Sandbox
from reward.types import RewardResult, ScoreRequest

@dataclass(frozen=True)
class RewardConfig:
    """Weights from R1V3 §3.1. max_response_chars: longer responses are cut to their last that many
    characters before accuracy scoring, since the answer sits at the end (16k chars ≈ 4k tokens, far more
    than any answer section); this bounds the parsers' input. Format always sees the full response.
    worker_memory_mb: memory one scoring worker may allocate beyond its start-up size.
    kind names the registered reward (REWARD_KINDS): "rule" is the paper's, "random" the no-signal control."""

    kind: str = "rule"
    seed: int = 0
    accuracy_weight: float = 0.8
    format_weight: float = 0.2
    timeout_s: float = 5.0
    max_response_chars: int = 16_000
    workers: int = 2
    worker_memory_mb: int | None = 2048

    def __post_init__(self) -> None:
        if self.max_response_chars < 1:
            raise ValueError("max_response_chars must be >= 1")


RewardKind = Callable[[list[float], random.Random], list[float]]
#: fn(rule scores of a batch, rng) -> the scores training sees.
REWARD_KINDS: Registry[RewardKind] = Registry("reward kind")
register_reward = REWARD_KINDS.register


@register_reward("rule")
def rule_reward(scores: list[float], rng: random.Random) -> list[float]:
    """The rule-based reward as scored (R1V3 §3.1)."""
    return scores


@register_reward("random")
def random_reward(scores: list[float], rng: random.Random) -> list[float]:
    """The spurious-reward control: Bernoulli draws with the batch's mean rule reward, independent of
    the responses. A gain that also appears under it is not the reward's doing."""
    p = sum(scores) / len(scores) if scores else 0.0
    return [float(rng.random() < p) for _ in scores]


#: answer type -> its accuracy scorer; the names are every answer type a problem may have.
ACCURACY_SCORERS: Registry[Callable[[ScoreRequest], RewardResult]] = Registry("answer_type")
register_answer_type = ACCURACY_SCORERS.register


@register_answer_type("math")
@register_answer_type("numeric")
def _math_accuracy(request: ScoreRequest) -> RewardResult:
    return score_math(request.response, request.ground_truth)


@register_answer_type("choice")
def _choice_accuracy(request: ScoreRequest) -> RewardResult:
    return score_choice(request.response, request.ground_truth, request.options)


@register_answer_type("open")
def _open_accuracy(request: ScoreRequest) -> RewardResult:
    return score_open(request.response, request.ground_truth)


def score_accuracy(request: ScoreRequest) -> RewardResult:
    """The request's answer-type scorer (runs inside a sandbox worker)."""
    return ACCURACY_SCORERS.lookup(request.answer_type)(request)


def check_answer_types(requests: Sequence[ScoreRequest]) -> None:
    """Reject a batch holding an unknown answer_type up front, naming it, before any worker sees it."""
    for answer_type in sorted({r.answer_type for r in requests}):
        ACCURACY_SCORERS.lookup(answer_type)


def _rejected(response: object) -> str | None:
    """Why a response is not scored at all, or None."""
    if not isinstance(response, str):
        return f"response is {type(response).__name__}, not text"
    return "NUL byte in response" if "\x00" in response else None


class RewardScorer:
    """Scores batches of ScoreRequest; keeps its worker pool between batches. Call close() when done."""

    def __init__(self, config: RewardConfig = RewardConfig()) -> None:
        REWARD_KINDS.lookup(config.kind)
        self.config = config
        self._sandbox = Sandbox(
            score_accuracy, workers=config.workers, timeout_s=config.timeout_s, memory_mb=config.worker_memory_mb
        )

    def accuracy_batch(self, requests: Sequence[ScoreRequest]) -> list[RewardResult]:
        """parts == {"accuracy": 0|1}. A response that is not text, or holds a NUL byte, is rejected unscored
        (no model emits one; NULs only reach C-level parsers); "timeout" and worker failures score 0."""
        check_answer_types(requests)
        results: list[RewardResult | None] = [None] * len(requests)
        calls, where = [], []
        for i, request in enumerate(requests):
            rejected = _rejected(request.response)
            if rejected:
                results[i] = RewardResult(0.0, {"accuracy": 0.0}, None, rejected)
                continue
            response = request.response[-self.config.max_response_chars:]
            calls.append((dataclasses.replace(request, response=response, meta={}),))
            where.append(i)
        for i, outcome in zip(where, self._sandbox.map(calls)):
            failed = RewardResult(0.0, {"accuracy": 0.0}, None, outcome.error)
            results[i] = outcome.value if outcome.error is None else failed
        return results  # type: ignore[return-value]

    def score_batch(self, requests: Sequence[ScoreRequest], draw: int = 0) -> list[RewardResult]:
        """score = accuracy_weight·accuracy + format_weight·format, passed through the configured reward kind;
        parts keeps the rule scores (so a control run still logs its real accuracy); parsed and error come
        from the accuracy scorer. A reward kind's random draws come from (seed, draw) — the controller
        passes the step — so a restarted reward actor or a resumed run draws exactly what it would have."""
        scored = []
        for request, accuracy in zip(requests, self.accuracy_batch(requests)):
            text = request.response if isinstance(request.response, str) else ""
            parts = {"accuracy": accuracy.parts["accuracy"], "format": score_format(text)}
            score = self.config.accuracy_weight * parts["accuracy"] + self.config.format_weight * parts["format"]
            scored.append(RewardResult(score, parts, accuracy.parsed, accuracy.error))
        final = REWARD_KINDS[self.config.kind]([r.score for r in scored], random.Random(f"{self.config.seed}/{draw}"))
        return [dataclasses.replace(r, score=f) for r, f in zip(scored, final)]

    def close(self) -> None:
        self._sandbox.close()

    def __enter__(self) -> RewardScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
