"""R_format (R1V3 §3.1) and the helpers that define where a response keeps its answer.

The response template is `<think>reasoning</think>answer`, the answer holding a `\\boxed{…}` (the R1V3 §6.6 prompt:
"The final answer MUST BE put in \\boxed."). Every scorer reads the answer the same way, so the helpers live
with the template they describe. All of it is linear-time string work: it runs in the caller's process on the
full, untruncated response.
"""
from __future__ import annotations

import re

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

# `\boxed{` opens a box; a bare `{`/`}` opens/closes a group; `\{`/`\}` are literal braces and are skipped.
_BRACE_TOKENS = re.compile(r"\\boxed\s*\{|\\[{}]|[{}]")
# "Answer:", "answer :", "**Answer**:", full-width colon; the R1V/MMMU-Pro prompts ask for an "Answer: …" line.
ANSWER_LABEL = re.compile(r"answer[*_\s]*[:：]", re.IGNORECASE)


def answer_section(response: str) -> str:
    """The text after the last `</think>` (the whole response when there is none): reasoning may
    mention tentative answers, only the part after it is the answer."""
    return response.rpartition(THINK_CLOSE)[2]


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{…}` whose braces balance, or None. One pass with a stack, so an
    adversarial run of unclosed boxes stays linear."""
    stack: list[tuple[bool, int]] = []  # (opens a box, index where its content starts)
    best: tuple[int, str] | None = None  # (start of the box, its content)
    for token in _BRACE_TOKENS.finditer(text):
        piece = token.group()
        if piece.startswith("\\boxed"):
            stack.append((True, token.end()))
        elif piece == "{":
            stack.append((False, token.end()))
        elif piece == "}" and stack:
            is_box, start = stack.pop()
            if is_box and (best is None or start > best[0]):
                best = (start, text[start:token.start()])
    return None if best is None else best[1]


def stated_answer(section: str) -> str | None:
    """What an answer section states as its answer: the last balanced `\\boxed{…}` content, else the
    rest of the line after the last "Answer:" label; None when it has neither."""
    boxed = last_boxed(section)
    if boxed is not None:
        return boxed
    labels = list(ANSWER_LABEL.finditer(section))
    return section[labels[-1].end():].split("\n", 1)[0] if labels else None


def score_format(response: str) -> float:
    """1.0 iff the response is exactly one non-empty `<think>…</think>` block at its start (leading
    whitespace allowed) followed by text holding a non-empty `\\boxed{…}`; else 0.0 (R1V3 §3.1 R_format)."""
    body = response.lstrip()
    if not body.startswith(THINK_OPEN) or body.count(THINK_OPEN) != 1 or body.count(THINK_CLOSE) != 1:
        return 0.0
    reasoning, _, answer = body[len(THINK_OPEN):].partition(THINK_CLOSE)
    boxed = last_boxed(answer)
    return 1.0 if reasoning.strip() and boxed is not None and boxed.strip() else 0.0
