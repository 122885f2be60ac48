"""The official MMMU answer parsing, judging and aggregation, ported by behaviour.

Source: MMMU-Benchmark/MMMU, `mmmu/utils/eval_utils.py` and `mmmu/utils/data_utils.py` (variant "mmmu"),
and `mmmu-pro/evaluate.py` (variant "mmmu-pro", whose multi-choice parser first reads the last "Answer:"
and also accepts `X ` / `X.` without a leading space). Quirks of the official code are kept on purpose, since
scores must be comparable with published numbers; each is noted where it happens.

Mode "r1v3" is the paper's evaluation rule on top of the official parser (R1V3 reads the last `\\boxed{}`
first, since RL-trained models often answer only there): a boxed option letter, `(X)` or option text wins;
without one the official parse and random guess follow. Open answers are parsed from the boxed content.

Only departure: the official code calls `random.choice` on a module-level stream seeded once at import, so
a fallback's letter depends on how many fallbacks came before it in the run. Here mode "official" draws
from `random.Random(seed)` per call (seed 42, the official seed), which is reproducible item by item;
mode "strict" returns None instead of guessing.
"""
from __future__ import annotations

import ast
import random
import re
from collections.abc import Callable, Mapping, Sequence

from reward.format_scorer import last_boxed

MODES = ("official", "strict", "r1v3")
VARIANTS = ("mmmu", "mmmu-pro")
OFFICIAL_SEED = 42

# data_utils.py DOMAIN_CAT2SUB_CAT: the six disciplines and their subjects, in the official print order.
DISCIPLINES: dict[str, tuple[str, ...]] = {
    "Art and Design": ("Art", "Art_Theory", "Design", "Music"),
    "Business": ("Accounting", "Economics", "Finance", "Manage", "Marketing"),
    "Science": ("Biology", "Chemistry", "Geography", "Math", "Physics"),
    "Health and Medicine": (
        "Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine", "Pharmacy",
        "Public_Health",
    ),
    "Humanities and Social Science": ("History", "Literature", "Sociology", "Psychology"),
    "Tech and Engineering": (
        "Agriculture", "Architecture_and_Engineering", "Computer_Science", "Electronics", "Energy_and_Power",
        "Materials", "Mechanical_Engineering",
    ),
}

# data_utils.py CAT_SHORT2LONG: the short subject names the official CLI accepts.
CAT_SHORT2LONG: dict[str, str] = {
    "acc": "Accounting", "agri": "Agriculture", "arch": "Architecture_and_Engineering", "art": "Art",
    "art_theory": "Art_Theory", "bas_med": "Basic_Medical_Science", "bio": "Biology", "chem": "Chemistry",
    "cli_med": "Clinical_Medicine", "cs": "Computer_Science", "design": "Design",
    "diag_med": "Diagnostics_and_Laboratory_Medicine", "econ": "Economics", "elec": "Electronics",
    "ep": "Energy_and_Power", "fin": "Finance", "geo": "Geography", "his": "History", "liter": "Literature",
    "manage": "Manage", "mark": "Marketing", "mate": "Materials", "math": "Math", "mech": "Mechanical_Engineering",
    "music": "Music", "phar": "Pharmacy", "phys": "Physics", "psy": "Psychology", "pub_health": "Public_Health",
    "socio": "Sociology",
}

_EDGE_PUNCT = (",", ".", "!", "?", ";", ":", "'")
_KEY_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
_TRIVIAL_KEYS = frozenset({":", ",", ".", "!", "?", ";", "'"})
# The official number patterns, with `(?<!\d)` before each `\d+` that starts a match. The official ones retry
# from every digit of a run that failed to match, which is quadratic (a 200k-digit answer ran past 300 s).
# A match from inside a run can only succeed where one from the run's start does, and no match ends just
# before a digit, so findall returns the same list (tests/test_hostile_answers.py compares them).
_NUM_COMMAS = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
_NUM_SCIENTIFIC = re.compile(r"-?(?<!\d)\d+(?:\.\d+)?[eE][+-]?\d+")
_NUM_SIMPLE = re.compile(r"-?(?:(?<!\d)\d+\.\d+|\.\d+|(?<!\d)\d+\b)(?![eE][+-]?\d+)(?![,\d])")
# The parsers read only a response's last MAX_PARSE_CHARS characters, which bounds their time on hostile
# text: the official rules favour what is said last (the last "Answer:", the latest option mention, "=" on
# the last line), and the cap is 30x the longest of 1,730 real GPT-4o chain-of-thought answers (3.3k).
MAX_PARSE_CHARS = 100_000


def multi_choice_info(options: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """(index2ans, all_choices): option i gets letter chr(ord('A') + i) (data_utils.get_multi_choice_info).
    A non-text option (one MMMU-Pro item nests a list) is turned into text, where the official would fail."""
    index2ans = {chr(ord("A") + i): str(text) for i, text in enumerate(options)}
    return index2ans, list(index2ans)


def _check(mode: str, variant: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


def _last_of(candidates: list[str], position: Callable[[str], int]) -> str:
    """The candidate found latest; ties (e.g. several -1 from a pattern that was not the one that
    matched) go to the earliest candidate, as numpy.argmax does in the official code."""
    return max(candidates, key=position)


def _candidates(padded: str, all_choices: Sequence[str], index2ans: Mapping[str, str], variant: str) -> str | None:
    """The official search order: `(X)`, then a bare letter, then (for >5 words) option text."""
    bracketed = [c for c in all_choices if f"({c})" in padded]
    if bracketed:
        return _last_of(bracketed, lambda c: padded.rfind(f"({c})"))
    if variant == "mmmu":
        bare = [c for c in all_choices if f" {c} " in padded]
    else:  # mmmu-pro drops the leading space (so "DNA " counts as "A ") and then tries "X."
        bare = [c for c in all_choices if f"{c} " in padded] or [c for c in all_choices if f"{c}." in padded]
    if bare:
        # Both variants rank by " X " even when "X " / "X." was what matched (-1 then, see _last_of).
        return _last_of(bare, lambda c: padded.rfind(f" {c} "))
    if len(padded.split()) > 5:
        lowered = padded.lower()
        by_text = [c for c, text in index2ans.items() if text.lower() in lowered]
        if by_text:
            return _last_of(by_text, lambda c: lowered.rfind(index2ans[c].lower()))
    return None


def parse_multi_choice(
    response: str,
    all_choices: Sequence[str],
    index2ans: Mapping[str, str],
    *,
    mode: str = "official",
    variant: str = "mmmu",
    seed: int = OFFICIAL_SEED,
) -> str | None:
    """The letter the official parse_multi_choice_response extracts; when nothing parses, a seeded random
    letter (mode "official") or None (mode "strict")."""
    _check(mode, variant)
    if not all_choices:
        raise ValueError("a multiple-choice question needs at least one option")
    response = response[-MAX_PARSE_CHARS:]
    if mode == "r1v3":
        boxed = boxed_choice(response, all_choices, index2ans)
        if boxed is not None:
            return boxed
    if variant == "mmmu-pro":
        cut = response.rfind("Answer:")
        if cut != -1:
            tail = response[cut + len("Answer:"):].strip()
            in_tail = [c for c in all_choices if c in tail]  # plain substring test, as official
            if len(in_tail) == 1:
                return in_tail[0]
    for char in _EDGE_PUNCT:  # one strip per character, in this order, as official
        response = response.strip(char)
    found = _candidates(f" {response} ", all_choices, index2ans, variant)
    if found is None and mode != "strict":
        return random_fallback(all_choices, seed)
    return found


def boxed_choice(response: str, all_choices: Sequence[str], index2ans: Mapping[str, str]) -> str | None:
    """The option the last balanced `\\boxed{…}` names: a letter (`B`, `(B)`, `B.`) or an option's text."""
    content = last_boxed(response)
    if content is None:
        return None
    text = content.strip().strip(".").strip()
    letter = text[1:-1].strip() if text.startswith("(") and text.endswith(")") else text
    if letter in all_choices:
        return letter
    by_text = [c for c in all_choices if index2ans.get(c, "").strip().lower() == text.lower()]
    return by_text[0] if len(by_text) == 1 else None


def boxed_open(response: str) -> str:
    """What an open answer is parsed from in mode "r1v3": the last boxed content, else the response."""
    content = last_boxed(response)
    return response if content is None else content


def random_fallback(all_choices: Sequence[str], seed: int = OFFICIAL_SEED) -> str:
    """The official answer to "nothing parsed": a random letter, here from a per-call seeded stream."""
    return random.Random(seed).choice(list(all_choices))


def check_is_number(text: str) -> bool:
    """True when float() accepts the text with commas removed (so "1e3", "inf" and "nan" count, as official)."""
    try:
        float(text.replace(",", ""))
    except ValueError:
        return False
    return True


def normalize_str(text: str) -> list[str | float]:
    """A number becomes [float rounded to 2 decimals]; other text is lower-cased, and a single character
    becomes [" x", "x "] so it only matches as a separate word."""
    text = text.strip()
    if check_is_number(text):
        return [round(float(text.replace(",", "")), 2)]
    text = text.lower()
    return [" " + text, text + " "] if len(text) == 1 else [text]


def extract_numbers(text: str) -> list[str]:
    """Every number in the text: comma-grouped ones, then scientific notation, then plain ones."""
    return _NUM_COMMAS.findall(text) + _NUM_SCIENTIFIC.findall(text) + _NUM_SIMPLE.findall(text)


def _key_subresponses(response: str) -> list[str]:
    """Per line, the shortest tail after an indicator such as "is " or "answer " ("=" too on the last line)."""
    text = response.strip().strip(".").lower()
    # The official splits on r"\.\s(?=[A-Z])|\n" after lower-casing, so only the newline split can fire.
    lines = text.split("\n")
    keys = []
    for index, line in enumerate(lines):
        indicators = _KEY_INDICATORS + (("=",) if index == len(lines) - 1 else ())
        shortest: str | None = None
        for indicator in indicators:
            if indicator in line:
                tail = line.split(indicator)[-1].strip()
                if not shortest or len(tail) < len(shortest):  # an empty tail is replaced, as official
                    shortest = tail
        if shortest and shortest.strip() not in _TRIVIAL_KEYS:
            keys.append(shortest)
    return keys or [text]


def parse_open(response: str) -> list[str | float]:
    """The official parse_open_response: key sub-responses and the numbers in them, normalised and
    de-duplicated (kept in first-seen order; the official returns a set's order, which eval_open ignores)."""
    keys = _key_subresponses(response[-MAX_PARSE_CHARS:])
    raw = keys + [number for key in keys for number in extract_numbers(key)]
    return list(dict.fromkeys(item for piece in raw for item in normalize_str(piece)))


def read_literal(text: str) -> object:
    """A Python literal as MMMU's files store lists ("['A', 'B']"), or None when the text is not one.
    Hostile text makes the parser raise more than SyntaxError (deep nesting: MemoryError, RecursionError)."""
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None


def gold_answers(answer: str | list[str]) -> str | list[str]:
    """A gold answer as the official judges take it. The official answer file holds real lists for
    questions with several accepted answers; the released dataset stores those as a Python-literal
    string ("['24/7', '3.429']"), which is read back into the list here."""
    if isinstance(answer, str) and answer.lstrip().startswith("["):
        value = read_literal(answer)
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            return value
    return answer


def eval_multi_choice(gold: str | list[str], pred: str | None) -> bool:
    """Exact letter match; a list gold accepts any of its letters."""
    return pred in gold if isinstance(gold, list) else pred == gold


def eval_open(gold: str | list[str], preds: Sequence[str | float]) -> bool:
    """A float prediction must equal a (2-decimal) gold number; a string prediction must contain a
    normalised gold string."""
    golds = gold if isinstance(gold, list) else [gold]
    answers = [norm for answer in golds for norm in normalize_str(answer)]
    for pred in preds:
        if isinstance(pred, str):
            if any(isinstance(answer, str) and answer in pred for answer in answers):
                return True
        elif pred in answers:
            return True
    return False


def subject_of(row: Mapping[str, object]) -> str:
    """The subject of a row: its "subject" field (spaces as underscores, the official spelling), else the
    middle of an official id such as "validation_Art_Theory_12" (main_eval_only.py)."""
    subject = row.get("subject")
    if isinstance(subject, str) and subject.strip():
        return subject.strip().replace(" ", "_")
    parts = str(row.get("id", "")).split("_")
    return "_".join(parts[1:-1]) or "unknown"


def _ins_level_acc(results: Mapping[str, Mapping[str, float]]) -> float:
    """calculate_ins_level_acc: the per-subject accuracies weighted by their instance counts."""
    total = sum(r["num"] for r in results.values())
    return sum(r["acc"] * r["num"] for r in results.values()) / total if total else 0.0


def aggregate(per_subject: Mapping[str, tuple[int, int]]) -> dict[str, dict[str, dict[str, float]]]:
    """From {subject: (correct, total)}: accuracy per subject, per discipline and overall, each the
    instance-weighted mean of its subjects (main_eval_only.py). A subject outside the six disciplines
    counts in the overall only; a discipline with no subject present reports num 0, acc 0 (as official).
    Unrounded; the official printout rounds to 3 decimals."""
    subjects = {s: {"num": n, "acc": c / n if n else 0.0} for s, (c, n) in per_subject.items()}
    disciplines = {}
    for name, members in DISCIPLINES.items():
        present = {s: subjects[s] for s in members if s in subjects}
        disciplines[name] = {"num": sum(r["num"] for r in present.values()), "acc": _ins_level_acc(present)}
    overall = {"num": sum(r["num"] for r in subjects.values()), "acc": _ins_level_acc(subjects)}
    return {"subjects": subjects, "disciplines": disciplines, "overall": overall}
