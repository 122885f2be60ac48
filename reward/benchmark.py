"""Benchmark protocols: rows of responses scored exactly as the benchmarks' official code scores them —
the one judge behind `vireo score`, `vireo eval` and held-out accuracy during training.

Protocol "mmmu" judges the way the official MMMU evaluator does (reward.mmmu), over the full response as
the official code does: multiple-choice rows with parse_multi_choice, rows whose question_type is not
"multiple-choice" with parse_open (official rule). Mode "official" keeps its random guess when nothing
parses; mode "strict" scores such a row wrong instead. Variant "mmmu" is the MMMU evaluator,
"mmmu-pro" the MMMU-Pro one (reads the last "Answer:" first).

Protocol "math" scores with the training reward's accuracy scorers under the hard timeout
(reward.compose); it never guesses, so its two modes score alike.

A row that cannot be scored (missing response/answer, bad options) is written back with a reason and
counted as skipped, outside every accuracy.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from reward import mmmu
from reward.compose import ACCURACY_SCORERS, RewardConfig, RewardScorer
from reward.types import ScoreRequest

PROTOCOLS = ("mmmu", "math")
# The MMMU protocol vireo prompts for ("Answer: X" last line, as the R1V prompts ask, R1V §3) is the one
# the MMMU-Pro evaluator reads first; `mmmu` reproduces the original MMMU evaluator exactly.
DEFAULT_VARIANT = "mmmu-pro"
BATCH = 64  # math rows per sandbox batch (and per progress update)

Progress = Callable[[int, int], None]


class _Skip(Exception):
    """A row that cannot be scored; the message is the reason."""


def _options(row: dict[str, Any], required: bool) -> tuple[str, ...]:
    """Options as a list, or the Python-literal list string the MMMU files store."""
    options = row.get("options")
    if options is None and not required:
        return ()
    if isinstance(options, str):
        options = mmmu.read_literal(options)
    if not isinstance(options, list | tuple) or (required and not options):
        raise _Skip("bad options")
    return tuple(str(option) for option in options)


def _response(row: dict[str, Any]) -> str:
    response = row.get("response")
    if not isinstance(response, str):
        raise _Skip("missing response")
    return response


def _answer(row: dict[str, Any]) -> str | list[str]:
    """The gold answer as text (numbers become text), or a list of texts."""
    answer = row.get("answer")
    if answer is None or answer == "" or answer == []:
        raise _Skip("missing answer")
    return [str(a) for a in answer] if isinstance(answer, list) else str(answer)


def _score_mmmu_row(row: dict[str, Any], mode: str, variant: str) -> dict[str, Any]:
    """pred, correct and (when nothing parsed) reason for one MMMU row."""
    response = _response(row)
    gold = mmmu.gold_answers(_answer(row))
    if row.get("question_type", "multiple-choice") != "multiple-choice":
        preds = mmmu.parse_open(mmmu.boxed_open(response) if mode == "r1v3" else response)
        out: dict[str, Any] = {"pred": preds, "correct": mmmu.eval_open(gold, preds)}
        if not response.strip():
            out["reason"] = "no answer"
        return out
    index2ans, letters = mmmu.multi_choice_info(_options(row, required=True))
    pred = mmmu.parse_multi_choice(response, letters, index2ans, mode="strict", variant=variant)
    if mode == "r1v3":
        pred = mmmu.boxed_choice(response, letters, index2ans) or pred
    reason = None
    if pred is None and mode != "strict":
        pred, reason = mmmu.random_fallback(letters), "no answer parsed; official random guess"
    elif pred is None:
        reason = "no answer"
    out = {"pred": pred, "correct": pred is not None and mmmu.eval_multi_choice(gold, pred)}
    return out if reason is None else {**out, "reason": reason}


def _math_request(row: dict[str, Any]) -> ScoreRequest:
    response = _response(row)
    answer = _answer(row)
    if isinstance(answer, list):
        raise _Skip("list answer (math rows take one ground truth)")
    answer_type = row.get("answer_type") or "math"
    if answer_type not in ACCURACY_SCORERS:
        raise _Skip(f"unknown answer_type {answer_type!r}")
    options = _options(row, required=False)
    return ScoreRequest(response, answer, answer_type, options)


def _score_math_rows(
    rows: Sequence[dict[str, Any]], timeout_s: float, progress: Progress | None, scorer: RewardScorer | None
) -> list[dict[str, Any]]:
    """Per row: the scored fields, or {"skip": reason}. Uses `scorer`'s worker pool when given."""
    outs: list[dict[str, Any]] = [{} for _ in rows]
    requests = []
    for i, row in enumerate(rows):
        try:
            requests.append((i, _math_request(row)))
        except _Skip as skip:
            outs[i] = {"skip": str(skip)}
    own = scorer is None
    scorer = scorer or RewardScorer(RewardConfig(timeout_s=timeout_s))
    try:
        for start in range(0, len(requests), BATCH):
            chunk = requests[start:start + BATCH]
            for (i, _), result in zip(chunk, scorer.accuracy_batch([r for _, r in chunk])):
                outs[i] = {"pred": result.parsed, "correct": result.parts["accuracy"] == 1.0}
                if result.error is not None:
                    outs[i]["reason"] = result.error
            if progress:
                progress(min(start + BATCH, len(requests)), len(requests))
    finally:
        if own:
            scorer.close()
    return outs


@dataclass
class _Tally:
    """Running counts for the summary; a group is {key: [correct, total]}."""

    protocol: str
    rows: int = 0
    correct: int = 0
    unparsed: int = 0
    skips: Counter = field(default_factory=Counter)
    subjects: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))
    difficulty: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))

    def add(self, row: dict[str, Any], out: dict[str, Any]) -> None:
        self.rows += 1
        if "skip" in out:
            self.skips[out["skip"]] += 1
            return
        self.correct += bool(out["correct"])
        self.unparsed += "reason" in out
        subject = mmmu.subject_of(row) if self.protocol == "mmmu" else row.get("subject")
        keyed = [(self.subjects, subject)]
        if self.protocol == "math":
            keyed.append((self.difficulty, row.get("difficulty")))
        for group, key in keyed:
            if key not in (None, ""):
                group[str(key)][0] += bool(out["correct"])
                group[str(key)][1] += 1

    def summary(self, mode: str, variant: str) -> dict[str, Any]:
        """Counts and accuracy overall and per subject; MMMU adds the six disciplines (official
        aggregation), math adds per-difficulty accuracy. Rows without a subject count in the overall only."""
        skipped = sum(self.skips.values())
        scored = self.rows - skipped
        table = mmmu.aggregate({s: (c, n) for s, (c, n) in self.subjects.items()})
        summary: dict[str, Any] = {
            "protocol": self.protocol, "mode": mode, "rows": self.rows, "scored": scored, "skipped": skipped,
            "skip_reasons": dict(self.skips), "unparsed": self.unparsed,
            "unparsed_rate": self.unparsed / scored if scored else 0.0, "subjects": table["subjects"],
        }
        if self.protocol == "mmmu":
            summary.update(variant=variant, disciplines=table["disciplines"])
        else:
            summary["difficulty"] = mmmu.aggregate({d: (c, n) for d, (c, n) in self.difficulty.items()})["subjects"]
        summary.update(correct=self.correct, accuracy=self.correct / scored if scored else 0.0)
        return summary


def _score_mmmu_rows(
    rows: Sequence[dict[str, Any]], mode: str, variant: str, progress: Progress | None
) -> list[dict[str, Any]]:
    """Per row: the scored fields, or {"skip": reason}."""
    outs = []
    for i, row in enumerate(rows, 1):
        try:
            outs.append(_score_mmmu_row(row, mode, variant))
        except _Skip as skip:
            outs.append({"skip": str(skip)})
        if progress and (i % BATCH == 0 or i == len(rows)):
            progress(i, len(rows))
    return outs


def score_rows(
    rows: Iterable[Any],
    protocol: str,
    mode: str = "official",
    *,
    variant: str = DEFAULT_VARIANT,
    timeout_s: float = 5.0,
    progress: Progress | None = None,
    scorer: RewardScorer | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Score rows (dicts holding `response` and `answer`, plus `options` for MMMU multiple choice) and
    return (each row with pred/correct/reason added, summary). A row that is not a dict is skipped.
    The math protocol runs in `scorer`'s sandbox pool when given (the reward actor's), else in its own."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if mode not in mmmu.MODES or variant not in mmmu.VARIANTS:
        raise ValueError(f"mode must be one of {mmmu.MODES} and variant one of {mmmu.VARIANTS}")
    rows = list(rows)
    dicts = [row for row in rows if isinstance(row, dict)]
    if protocol == "math":
        outs = iter(_score_math_rows(dicts, timeout_s, progress, scorer))
    else:
        outs = iter(_score_mmmu_rows(dicts, mode, variant, progress))
    tally, scored = _Tally(protocol), []
    for row in rows:
        if not isinstance(row, dict):
            row, out = {"raw": row}, {"skip": "row is not a JSON object"}
        else:
            out = next(outs)
        tally.add(row, out)
        if "skip" in out:
            out = {"pred": None, "correct": None, "reason": f"skipped: {out['skip']}"}
        scored.append({**row, **out})
    return scored, tally.summary(mode, variant)
