"""Strict multiple-choice accuracy: the reward used in training (RL data is multiple-choice and
fill-in-the-blank, R1V3 §2).

Strict means: the letter must be stated as an answer (the last `\\boxed{X}`, else the last `Answer: X`)
and be a valid option letter; a response that states none scores 0 with an error, never a guess (the
official evaluator guesses at random). And it must not contradict the official MMMU-Pro parser
(reward.mmmu, strict mode) on the same text: if that parser reads a different letter, the response scores
0, so the policy is never paid for an answer that the benchmark evaluator reads as another letter. Where
the official parser reads nothing (a bare `\\boxed{B}` has no pattern it knows) it would guess at random,
so there is nothing to contradict and the stated letter stands.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

from reward import mmmu
from reward.format_scorer import ANSWER_LABEL, answer_section, stated_answer
from reward.types import RewardResult

DEFAULT_LETTERS = tuple("ABCDEFGHIJ")  # MMMU-Pro's ten options, when the options are not known

_LATEX_WRAPPER = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_MATH_DELIMITERS = re.compile(r"\$|\\[()\[\]]")
_LEADING_LETTER = re.compile(r"(?:\((?P<paren>[A-Z])\)|(?P<bare>[A-Z]))(?P<rest>.*)", re.DOTALL)


def option_letters(options: Sequence[str]) -> tuple[str, ...]:
    """A, B, … one per option; A–J when the options are unknown."""
    return tuple(chr(ord("A") + i) for i in range(len(options))) if options else DEFAULT_LETTERS


def read_letter(text: str) -> str | None:
    """The option letter a stated answer names: "B", "(B)", "B.", "B. text", "(B) text", "\\text{B}",
    "\\(B\\)", "**B**"; None for anything else ("Both", "A and B", "B because", "42")."""
    text = _MATH_DELIMITERS.sub("", _LATEX_WRAPPER.sub(r"\1", text)).strip(" \t*_{}")
    label = ANSWER_LABEL.match(text)  # \boxed{\text{Answer: } B}
    if label:
        text = text[label.end():].strip(" \t*_{}")
    match = _LEADING_LETTER.fullmatch(text)
    if match is None:
        return None
    rest = match["rest"]
    if rest == "" or rest[0] in ".:" or (match["bare"] and rest[0] == ")") or (match["paren"] and rest[0].isspace()):
        return match["paren"] or match["bare"]
    return None


def score_choice(response: str, ground_truth: str, options: Sequence[str] = ()) -> RewardResult:
    """accuracy 1 iff the stated letter is valid, equals the gold letter and the official parse reads no
    other letter."""
    letters = option_letters(options)
    gold = read_letter(ground_truth)
    if gold not in letters:
        return RewardResult(0.0, {"accuracy": 0.0}, None, f"ground truth {ground_truth!r} is not an option letter")
    section = answer_section(response)
    stated = stated_answer(section)
    if stated is None:
        return RewardResult(0.0, {"accuracy": 0.0}, None, "no answer")
    letter = read_letter(stated)
    if letter not in letters:
        return RewardResult(0.0, {"accuracy": 0.0}, None, "answer is not a valid option letter")
    index2ans = dict(zip(letters, options)) if options else {}
    official = mmmu.parse_multi_choice(section, letters, index2ans, mode="strict", variant="mmmu-pro")
    if official is not None and official != letter:
        return RewardResult(0.0, {"accuracy": 0.0}, None, f"official parse reads {official}, not {letter}")
    accuracy = 1.0 if letter == gold else 0.0
    return RewardResult(accuracy, {"accuracy": accuracy}, letter)
