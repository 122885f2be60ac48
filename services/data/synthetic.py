"""Synthetic visual math problems a ~1M-parameter random-init VLM can learn in minutes.

A tiny vision tower picks up global cues (the colour of one big shape, how many big blobs) in
seconds to a couple of minutes, but not small objects or left/right relations (see the learnability
notes in cpu-stack.md). So every image here is a few big, flat-coloured shapes on white: the colour
task shows one shape filling much of the image; the counting tasks put 1-3 blobs in distinct cells of
a 2x2 grid (at 56 px each cell is exactly one image token after the 2x2 merge). Harder levels add a
step in text (add K; count only shapes of a named colour), which leaves RL room to improve on.

Every problem is a pure function of (seed, id), so datasets are reproducible byte for byte.

The reference solutions are a perfect teacher. `teacher_error_rate` > 0 swaps in an imperfect one for the
training split (see "The imperfect teacher" below), so a cold start that imitates it plateaus at the
teacher's accuracy and RL with the rule reward (which scores against the true `answer`) has room to go past
it, as in Skywork-R1V3. `ood=True` draws problems just outside the training range (see OOD below).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import itertools
import random
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from rollout.prompts import decode_image
from services.data.loading import LETTERS, describe, format_choices, write_problems
from services.data.problems import IMAGE_PLACEHOLDER, Problem
from services.run_dir import to_json, write_atomic

SOURCE = "vireo-synthetic"
BACKGROUND = (255, 255, 255)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (30, 160, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 200, 30),
}
SHAPES = ("circle", "square", "triangle")
MAX_COUNT = 3
MAX_ADDEND = 5  # count_plus adds 1..MAX_ADDEND in training
MIN_IMAGE_SIZE = 22  # below it a cell of the 2x2 grid cannot hold the largest blob with its margin (_blobs)
# Reference solutions reflect some of the time (R1V3 §5.1: critical tokens such as "Wait" mark reflection):
# a share recounts ("Wait, let me count again"), part of it correcting a wrong first count. That coin is the
# perfect teacher's (teacher_error_rate 0, today's data byte for byte); the imperfect teacher (below) reflects
# from the problem's content instead.
REFLECT_RATE = 0.3
CORRECT_RATE = 0.1


@dataclass(frozen=True)
class Draw:
    """The fields a task generator decides; `generate_problem` adds id, subject and source."""

    question: str
    answer: str
    answer_type: str
    image: bytes
    difficulty: int
    options: tuple[str, ...] = ()
    # what the image and question show (count, addend, colour, kind, ...): the imperfect teacher's errors
    # depend on these alone, so they are systematic in what a model can see
    features: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Axis:
    """A visible feature (or a tuple of them) the teacher's difficulty depends on, values hardest first;
    each value is equally likely in the training draws."""

    names: tuple[str, ...]
    values: tuple[tuple[Any, ...], ...]


@dataclass(frozen=True)
class Task:
    """A task family: draws a problem from an rng (in range, or just outside it: `generate_ood`), writes the
    ideal response to one (`solve`), and the imperfect teacher's response given the problem's features and
    the teacher's outcome on it (`teach`), with the teacher's difficulty axes, coarse to fine (`hardness`)."""

    generate: Callable[[random.Random, int], Draw]
    solve: Callable[[Problem], str]
    generate_ood: Callable[[random.Random, int], Draw]
    teach: Callable[[Problem, Mapping[str, Any], str], str]
    hardness: tuple[Axis, ...]


def _render(shapes: Iterable[tuple[str, str, int, int, int]], size: int) -> bytes:
    """PNG bytes of (kind, colour, centre x, centre y, half-width) shapes; no anti-aliasing, so
    every pixel is the background or exactly one palette colour."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for kind, colour, x, y, r in shapes:
        fill = COLOURS[colour]
        if kind == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif kind == "square":
            draw.rectangle((x - r, y - r, x + r, y + r), fill=fill)
        elif kind == "diamond":
            draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fill)
        else:
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _blobs(rng: random.Random, size: int, kinds: tuple[str, ...] = SHAPES) -> tuple[int, str, str, bytes]:
    """1-3 same-colour shapes of one of `kinds`, each inside its own cell of a 2x2 grid (never touching)."""
    count = rng.randint(1, MAX_COUNT)
    colour = rng.choice(list(COLOURS))
    kind = rng.choice(kinds)
    cell = size // 2
    shapes = []
    for cell_index in rng.sample(range(4), count):
        r = rng.randint(round(size * 0.13), round(size * 0.17))
        x0, y0 = (cell_index % 2) * cell, (cell_index // 2) * cell
        x = rng.randint(x0 + r + 1, x0 + cell - r - 2)
        y = rng.randint(y0 + r + 1, y0 + cell - r - 2)
        shapes.append((kind, colour, x, y, r))
    return count, colour, kind, _render(shapes, size)


def _shapes(n: int, colour: str = "") -> str:
    words = f"{colour} shape" if colour else "shape"
    return f"{n} {words}" if n == 1 else f"{n} {words}s"


def _response(thought: str, answer: str) -> str:
    return f"<think>{thought}</think> \\boxed{{{answer}}}"


def _generate_color(rng: random.Random, size: int, radius: tuple[float, float] = (0.28, 0.38)) -> Draw:
    colour = rng.choice(list(COLOURS))
    r = rng.randint(round(size * radius[0]), round(size * radius[1]))
    x, y = rng.randint(r + 1, size - r - 2), rng.randint(r + 1, size - r - 2)
    options = tuple(rng.sample(list(COLOURS), len(COLOURS)))
    kind = rng.choice(SHAPES)
    return Draw(
        question=f"{IMAGE_PLACEHOLDER}\nWhat colour is the shape?\n{format_choices(options)}",
        answer=LETTERS[options.index(colour)],
        answer_type="choice",
        image=_render([(kind, colour, x, y, r)], size),
        difficulty=1,
        options=options,
        features={"colour": colour, "kind": kind, "radius": r},
    )


def _reflect(problem: Problem) -> float:
    """A number in [0, 1) fixed by the problem: how (and whether) its solution reflects."""
    return random.Random(f"reflect:{problem.id}").random()


def _solve_color(problem: Problem) -> str:
    colour = problem.options[LETTERS.index(problem.answer)]
    thought = f"The shape is {colour}, option {problem.answer}."
    if _reflect(problem) < REFLECT_RATE:
        thought += f" Let me check the options again. {colour} is option {problem.answer}."
    return _response(thought, problem.answer)


def _generate_count(rng: random.Random, size: int, kinds: tuple[str, ...] = SHAPES) -> Draw:
    count, colour, kind, image = _blobs(rng, size, kinds)
    return Draw(
        question=f"{IMAGE_PLACEHOLDER}\nHow many shapes are in the image?",
        answer=str(count),
        answer_type="numeric",
        image=image,
        difficulty=2,
        features={"n": count, "colour": colour, "kind": kind},
    )


def _count_thought(problem: Problem, count: int) -> str:
    """"I count N shapes.", sometimes with a recount (R1V3 §5.1's "Wait" moves) that corrects a wrong first count."""
    roll = _reflect(problem)
    if roll < CORRECT_RATE:
        first = count + 1 if count < MAX_COUNT else count - 1
        return f"I count {_shapes(first)}. Wait, let me count again. I count {_shapes(count)}."
    if roll < REFLECT_RATE:
        return f"I count {_shapes(count)}. Wait, let me count again. Yes, {_shapes(count)}."
    return f"I count {_shapes(count)}."


def _solve_count(problem: Problem) -> str:
    return _response(_count_thought(problem, int(problem.answer)), problem.answer)


def _generate_count_plus(rng: random.Random, size: int, kinds: tuple[str, ...] = SHAPES) -> Draw:
    count, colour, kind, image = _blobs(rng, size, kinds)
    k = rng.randint(1, MAX_ADDEND)
    return Draw(
        question=f"{IMAGE_PLACEHOLDER}\nHow many shapes are in the image? Add {k} to that number.",
        answer=str(count + k),
        answer_type="numeric",
        image=image,
        difficulty=3,
        features={"n": count, "k": k, "colour": colour, "kind": kind},
    )


def _solve_count_plus(problem: Problem) -> str:
    k = int(_match(r"Add (\d+) to that number", problem.question))
    total = int(problem.answer)
    return _response(f"{_count_thought(problem, total - k)} {total - k} + {k} = {total}.", problem.answer)


def _generate_color_count(rng: random.Random, size: int, kinds: tuple[str, ...] = SHAPES) -> Draw:
    """Half the time the asked colour is the one drawn; otherwise the answer is 0."""
    count, colour, kind, image = _blobs(rng, size, kinds)
    asked = colour if rng.random() < 0.5 else rng.choice([c for c in COLOURS if c != colour])
    return Draw(
        question=f"{IMAGE_PLACEHOLDER}\nHow many {asked} shapes are in the image?",
        answer=str(count if asked == colour else 0),
        answer_type="numeric",
        image=image,
        difficulty=3,
        features={"n": count, "present": asked == colour, "asked": asked, "colour": colour, "kind": kind},
    )


def _solve_color_count(problem: Problem) -> str:
    asked = _match(r"How many (\w+) shapes", problem.question)
    if problem.answer != "0":
        return _response(f"I see {_shapes(int(problem.answer), asked)}.", problem.answer)
    seen = image_colour(problem.images[0])
    return _response(f"The shapes are {seen}, none are {asked}.", "0")


def _match(pattern: str, text: str) -> str:
    found = re.search(pattern, text)
    if found is None:
        raise ValueError(f"pattern {pattern!r} not in question {text!r}")
    return found.group(1)


# ---- The imperfect teacher -------------------------------------------------------------------------------
# The paper's cold start imitates a teacher that is sometimes wrong; RL with a rule reward then goes past it.
# For imitation to converge to the teacher's accuracy (and not past it), its errors must be SYSTEMATIC in
# what the student can see: were they independent coin flips per problem, the imitator's mode on every
# problem would still be the right answer and greedy decoding would recover it (SFT would beat RL again).
# So the teacher is wrong on a "hard" subset of visible feature combinations (count_plus with a large sum,
# 3 shapes, yellow/green shapes, ...), and on that subset it is wrong on a problem with a probability in the
# band `wrong` = (min, target, max), all > 0.5 (from a hash of the problem id): its mode there is wrong, yet right traces
# (some of them reflecting and correcting a wrong first step) still appear, so RL's sampled groups there
# hold both rewards. Each task's `hardness` lists its axes, coarse to fine, values hardest first; the
# subset is the hardest cells at the coarsest level where (cells' share) x (wrong within) can equal the
# rate with a within-subset wrong probability in [min, max] (closest to target), so a
# high rate takes more of the coarse cells and a low rate splits them by a finer feature (kind, colour).
# Only when no level fits (a rate near 0 or 1) the within probability is clamped and the error share
# departs from the rate; make_dataset's summary reports the measured share either way. The forms are the
# realistic ones: a miscount by one, a dropped addend (the count answered without adding), an addition slip
# (one too many), a colour confusion; which form a cell gets is fixed by the cell, so each hard cell has
# one wrong answer the teacher keeps giving. Reflection belongs to this teacher too: a trace reflects when
# its first step is wrong and a check catches it (then corrects it), or, on counting, as a check when the
# content is actually hard (3 shapes: "Wait, let me count again. Yes, 3 shapes."); never at random. The
# `answer` stays the true one (rewards and evaluation use it); only the `solution` carries the error.
TEACHER_WRONG = (0.6, 0.7, 0.9)  # the within-hard-cell wrong band (min, target, max): data.teacher_wrong's default
_COLOUR_HARDNESS = (("yellow",), ("green",), ("red",), ("blue",))  # yellow has the least contrast on white
_KIND_HARDNESS = (("triangle",), ("circle",), ("square",))  # the triangle covers the least area
CONFUSED = {"yellow": "green", "green": "yellow", "red": "yellow", "blue": "green"}  # what a colour is taken for


@dataclass(frozen=True)
class TeacherPlan:
    """Where the imperfect teacher of one task errs: the `hard` cells (of the first `level` axes) and how
    often it is wrong on a problem in them (`wrong`); `expected_error_share` = hard share x wrong."""

    task: str
    error_rate: float
    level: int
    hard: frozenset[tuple[tuple[Any, ...], ...]]
    hard_share: float
    wrong: float

    @property
    def expected_error_share(self) -> float:
        return self.hard_share * self.wrong

    def cell(self, features: Mapping[str, Any]) -> tuple[tuple[Any, ...], ...]:
        return tuple(tuple(features[n] for n in axis.names) for axis in _task(self.task).hardness[:self.level])

    def outcome(self, problem_id: str, features: Mapping[str, Any]) -> str:
        """"wrong" (the error stands), "caught" (a check corrects it) or "right" for one problem."""
        if self.cell(features) not in self.hard:
            return "right"
        roll = random.Random(f"teacher:{problem_id}").random()
        return "wrong" if roll < self.wrong else "caught" if roll < (1 + self.wrong) / 2 else "right"

    def describe(self) -> dict[str, Any]:
        axes = _task(self.task).hardness[:self.level]
        names = [n for axis in axes for n in axis.names]
        hard = sorted(",".join(f"{n}={v}" for n, v in zip(names, itertools.chain(*c))) for c in self.hard)
        return {"hard": hard, "hard_share": round(self.hard_share, 4), "wrong_given_hard": round(self.wrong, 4),
                "expected_error_share": round(self.expected_error_share, 4)}


@functools.lru_cache(maxsize=None)
def teacher_plan(task: str, error_rate: float, wrong: tuple[float, float, float] = TEACHER_WRONG) -> TeacherPlan:
    """The hard subset and within-subset wrong probability for `error_rate`, in the band `wrong` = (min,
    target, max) (see the section comment)."""
    if not 0 < error_rate < 1:
        raise ValueError(f"teacher_error_rate must be in (0, 1) for an imperfect teacher, got {error_rate}")
    low, target, high = wrong
    if not 0.5 < low <= target <= high < 1:
        raise ValueError(f"teacher_wrong must be [min, target, max] with 0.5 < min <= target <= max < 1, got {wrong}")
    axes = _task(task).hardness
    for level in range(1, len(axes) + 1):
        cells = list(itertools.product(*(axis.values for axis in axes[:level])))
        fits = [(abs(error_rate * len(cells) / i - target), i) for i in range(1, len(cells) + 1)
                if low <= error_rate * len(cells) / i <= high]
        if fits:
            i = min(fits)[1]
            return TeacherPlan(task, error_rate, level, frozenset(cells[:i]), i / len(cells),
                               error_rate * len(cells) / i)
    i = min(len(cells), max(1, round(error_rate * len(cells) / target)))
    wrong_given_hard = min(high, max(low, error_rate * len(cells) / i))
    return TeacherPlan(task, error_rate, len(axes), frozenset(cells[:i]), i / len(cells), wrong_given_hard)


def teacher_solution(problem: Problem, features: Mapping[str, Any], error_rate: float,
                     wrong: tuple[float, float, float] = TEACHER_WRONG) -> str:
    """The imperfect teacher's response to a problem drawn with `features` (its Draw's)."""
    if error_rate <= 0:
        return reference_solution(problem)
    plan = teacher_plan(problem.subject, error_rate, tuple(wrong))
    return _task(problem.subject).teach(problem, features, plan.outcome(problem.id, features))


def solution_answer(solution: str) -> str:
    """The boxed answer a solution ends with ("" if none)."""
    found = re.search(r"\\boxed\{([^{}]*)\}\s*$", solution)
    return found.group(1) if found else ""


def _miscount(n: int) -> int:
    """The teacher's count when it miscounts by one: one too many, but never past the grid's 3."""
    return n + 1 if n < MAX_COUNT else n - 1


def _teacher_count(n: int, outcome: str) -> tuple[str, int]:
    """"I count N shapes." and the count the teacher goes on with."""
    if outcome == "wrong":
        return f"I count {_shapes(_miscount(n))}.", _miscount(n)
    if outcome == "caught":
        return f"I count {_shapes(_miscount(n))}. Wait, let me count again. I count {_shapes(n)}.", n
    if n >= MAX_COUNT:  # actually hard to count: the teacher checks, and the check confirms
        return f"I count {_shapes(n)}. Wait, let me count again. Yes, {_shapes(n)}.", n
    return f"I count {_shapes(n)}.", n


def _teach_color(problem: Problem, features: Mapping[str, Any], outcome: str) -> str:
    colour, letter = features["colour"], problem.answer
    seen = CONFUSED[colour]
    seen_letter = LETTERS[problem.options.index(seen)]
    if outcome == "wrong":
        return _response(f"The shape is {seen}, option {seen_letter}.", seen_letter)
    if outcome == "caught":
        return _response(f"The shape is {seen}, option {seen_letter}. Wait, let me look again. The shape is "
                         f"{colour}, option {letter}.", letter)
    return _response(f"The shape is {colour}, option {letter}.", letter)


def _teach_count(problem: Problem, features: Mapping[str, Any], outcome: str) -> str:
    thought, seen = _teacher_count(features["n"], outcome)
    return _response(thought, str(seen))


def _teach_count_plus(problem: Problem, features: Mapping[str, Any], outcome: str) -> str:
    """The error form is the cell's: 3 shapes are miscounted, the largest addend is dropped (the count is
    answered without adding), any other sum slips by one."""
    n, k = features["n"], features["k"]
    if n >= MAX_COUNT:
        thought, seen = _teacher_count(n, outcome)
        return _response(f"{thought} {seen} + {k} = {seen + k}.", str(seen + k))
    thought, _ = _teacher_count(n, "right")
    if k >= MAX_ADDEND:
        if outcome == "wrong":
            return _response(thought, str(n))
        if outcome == "caught":
            return _response(f"{thought} Wait, I must add {k}. {n} + {k} = {n + k}.", str(n + k))
    elif outcome == "wrong":
        return _response(f"{thought} {n} + {k} = {n + k + 1}.", str(n + k + 1))
    elif outcome == "caught":
        return _response(f"{thought} {n} + {k} = {n + k + 1}. Wait, let me add again. {n} + {k} = {n + k}.",
                         str(n + k))
    return _response(f"{thought} {n} + {k} = {n + k}.", str(n + k))


def _teach_color_count(problem: Problem, features: Mapping[str, Any], outcome: str) -> str:
    """Shapes of the asked colour are miscounted by one; shapes of another colour are taken for the asked one."""
    n, asked, colour = features["n"], features["asked"], features["colour"]
    if features["present"]:
        if outcome == "right":
            return _response(f"I see {_shapes(n, asked)}.", str(n))
        first = f"I see {_shapes(_miscount(n), asked)}."
        if outcome == "wrong":
            return _response(first, str(_miscount(n)))
        return _response(f"{first} Wait, let me count again. I see {_shapes(n, asked)}.", str(n))
    if outcome == "wrong":
        return _response(f"I see {_shapes(n, asked)}.", str(n))
    if outcome == "caught":
        return _response(f"I see {_shapes(n, asked)}. Wait, they are {colour}, none are {asked}.", "0")
    return _response(f"The shapes are {colour}, none are {asked}.", "0")


# ---- Out of distribution ---------------------------------------------------------------------------------
# Problems the model never saw but can answer with what it was trained on (the paper's claim is transfer of a
# reasoning skill, §6.1): the counting tasks draw an unseen shape (a diamond; training has circles, squares
# and triangles) with the training range of counts and addends, so the answers are ones the model emits;
# color draws a smaller shape (radius 0.18-0.25 of the image against 0.28-0.38). Numbers outside the range
# (4 shapes, addends 6-9: the first proof's split) no arm could answer: a 1M-parameter model that never wrote
# "4" or "12" does not sample them, so the rule reward has nothing to amplify. Split "ood", so ids (and
# draws) differ from train and heldout.
OOD_SHAPES = ("diamond",)
OOD_RADIUS = (0.18, 0.25)


def _count_hardness() -> tuple[Axis, ...]:
    return (Axis(("n",), tuple((n,) for n in range(MAX_COUNT, 0, -1))), Axis(("kind",), _KIND_HARDNESS),
            Axis(("colour",), _COLOUR_HARDNESS))


def _count_plus_hardness() -> tuple[Axis, ...]:
    pairs = sorted(itertools.product(range(1, MAX_COUNT + 1), range(1, MAX_ADDEND + 1)),
                   key=lambda nk: (-(nk[0] + nk[1]), -nk[0]))  # the larger the sum, the harder
    return (Axis(("n", "k"), tuple(pairs)), Axis(("kind",), _KIND_HARDNESS), Axis(("colour",), _COLOUR_HARDNESS))


def _color_count_hardness() -> tuple[Axis, ...]:
    cells = tuple((present, n) for n in range(MAX_COUNT, 0, -1) for present in (True, False))
    return (Axis(("present", "n"), cells), Axis(("kind",), _KIND_HARDNESS), Axis(("colour",), _COLOUR_HARDNESS))


TASKS: dict[str, Task] = {
    "color": Task(_generate_color, _solve_color, functools.partial(_generate_color, radius=OOD_RADIUS),
                  _teach_color, (Axis(("colour",), _COLOUR_HARDNESS), Axis(("kind",), _KIND_HARDNESS))),
    "count": Task(_generate_count, _solve_count, functools.partial(_generate_count, kinds=OOD_SHAPES),
                  _teach_count, _count_hardness()),
    "count_plus": Task(_generate_count_plus, _solve_count_plus,
                       functools.partial(_generate_count_plus, kinds=OOD_SHAPES), _teach_count_plus,
                       _count_plus_hardness()),
    "color_count": Task(_generate_color_count, _solve_color_count,
                        functools.partial(_generate_color_count, kinds=OOD_SHAPES), _teach_color_count,
                        _color_count_hardness()),
}


def image_colour(image: bytes) -> str:
    """The palette colour covering most of a synthetic image (its shapes share one colour)."""
    counts = decode_image(image).getcolors(maxcolors=1 << 16) or []
    by_rgb = {rgb: n for n, rgb in counts}
    return max(COLOURS, key=lambda name: by_rgb.get(COLOURS[name], 0))


def reference_solution(problem: Problem) -> str:
    """The ideal R1-style response (`<think>…</think> \\boxed{answer}`): written into each problem's
    `solution`, which an SFT stage trains on. Derived from the question, answer and image alone."""
    return _task(problem.subject).solve(problem)


def generate_problem(task: str, index: int, *, split: str = "train", seed: int = 0, image_size: int = 56,
                     teacher_error_rate: float = 0.0, teacher_wrong: tuple[float, float, float] = TEACHER_WRONG,
                     ood: bool = False) -> Problem:
    """Problem `index` of a task family in a split; the rng is seeded from (seed, id). `ood`: drawn just
    outside the training range; `teacher_error_rate` > 0: the solution is the imperfect teacher's."""
    problem_id = f"{task}-{split}-{index:06d}"
    family = _task(task)
    draw = (family.generate_ood if ood else family.generate)(random.Random(f"{seed}:{problem_id}"), image_size)
    problem = Problem(
        id=problem_id,
        question=draw.question,
        answer=draw.answer,
        answer_type=draw.answer_type,
        images=(draw.image,),
        options=draw.options,
        difficulty=draw.difficulty,
        subject=task,
        source=SOURCE,
    )
    return dataclasses.replace(problem, solution=teacher_solution(problem, draw.features, teacher_error_rate,
                                                                  teacher_wrong))


def problem_key(problem: Problem) -> tuple[str, str, str]:
    """What makes two problems the same: task, image content and question text."""
    return problem.subject, hashlib.sha256(b"".join(problem.images)).hexdigest(), problem.question


def sample_problems(
    tasks: Mapping[str, float],
    n: int,
    *,
    split: str = "train",
    seed: int = 0,
    image_size: int = 56,
    exclude: Iterable[tuple[str, str, str]] = (),
    teacher_error_rate: float = 0.0,
    teacher_wrong: tuple[float, float, float] = TEACHER_WRONG,
    ood: bool = False,
) -> list[Problem]:
    """n distinct problems mixed by weight (exact per-task counts, shuffled order).

    Problems whose `problem_key` is in `exclude` or already drawn are skipped and replaced by the
    next index, so the result never repeats a problem nor overlaps the excluded set.
    """
    seen = set(exclude)
    problems: list[Problem] = []
    for task, count in _allocate(tasks, n).items():
        index, drawn = 0, 0
        while drawn < count:
            if index >= 20 * count + 100:
                raise RuntimeError(f"task {task!r}: only {drawn} distinct problems after {index} draws")
            problem = generate_problem(task, index, split=split, seed=seed, image_size=image_size,
                                       teacher_error_rate=teacher_error_rate, teacher_wrong=teacher_wrong, ood=ood)
            index += 1
            if problem_key(problem) not in seen:
                seen.add(problem_key(problem))
                problems.append(problem)
                drawn += 1
    random.Random(f"{seed}:{split}:order").shuffle(problems)
    return problems


def make_dataset(
    out_dir: str | Path,
    n_train: int,
    n_heldout: int,
    tasks: Mapping[str, float],
    image_size: int = 56,
    seed: int = 0,
    teacher_error_rate: float = 0.0,
    n_ood: int = 0,
    teacher_wrong: tuple[float, float, float] = TEACHER_WRONG,
) -> dict[str, Any]:
    """Write train.parquet and heldout.parquet with no problem in both (and, with n_ood > 0, ood.parquet:
    problems outside the training range, in neither); returns their summaries, also written to
    summary.json. Only the training split's solutions are the (imperfect, at teacher_error_rate > 0)
    teacher's; heldout and ood keep the reference ones. The summary's "teacher" gives, per task, the share
    of training solutions whose boxed answer is wrong (`error_share`) and, at a rate > 0, where it errs."""
    out_dir = Path(out_dir)
    heldout = sample_problems(tasks, n_heldout, split="heldout", seed=seed, image_size=image_size)
    train = sample_problems(
        tasks, n_train, split="train", seed=seed, image_size=image_size, exclude=map(problem_key, heldout),
        teacher_error_rate=teacher_error_rate, teacher_wrong=tuple(teacher_wrong),
    )
    summary = {
        "seed": seed,
        "image_size": image_size,
        "tasks": dict(tasks),
        "teacher_error_rate": teacher_error_rate,
        "teacher_wrong": list(teacher_wrong),
        "teacher": _teacher_summary(train, teacher_error_rate, tuple(teacher_wrong)),
        "train": {"path": str(write_problems(out_dir / "train.parquet", train)), **describe(train)},
        "heldout": {"path": str(write_problems(out_dir / "heldout.parquet", heldout)), **describe(heldout)},
    }
    if n_ood > 0:
        seen = [problem_key(p) for p in itertools.chain(heldout, train)]
        ood = sample_problems(tasks, n_ood, split="ood", seed=seed, image_size=image_size, exclude=seen, ood=True)
        summary["ood"] = {"path": str(write_problems(out_dir / "ood.parquet", ood)), **describe(ood)}
    write_atomic(out_dir / "summary.json", to_json(summary, indent=1) + "\n")
    return summary


def _teacher_summary(train: list[Problem], error_rate: float, band: tuple[float, float, float]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for task in sorted({p.subject for p in train}):
        mine = [p for p in train if p.subject == task]
        wrong = sum(solution_answer(p.solution) != p.answer for p in mine)
        out[task] = {"n": len(mine), "error_share": round(wrong / len(mine), 4),
                     **(teacher_plan(task, error_rate, band).describe() if error_rate > 0 else {})}
    wrong = sum(solution_answer(p.solution) != p.answer for p in train)
    out["all"] = {"n": len(train), "error_share": round(wrong / max(len(train), 1), 4)}
    return out


def _task(name: str) -> Task:
    if name not in TASKS:
        raise KeyError(f"unknown synthetic task {name!r}; known: {sorted(TASKS)}")
    return TASKS[name]


def _allocate(tasks: Mapping[str, float], n: int) -> dict[str, int]:
    """Split n over tasks in proportion to weight, by largest remainder (counts sum to n)."""
    for name, weight in tasks.items():
        _task(name)
        if weight < 0:
            raise ValueError(f"task {name!r} has negative weight {weight}")
    total = sum(tasks.values())
    if total <= 0:
        raise ValueError(f"task weights must sum to a positive number, got {dict(tasks)}")
    shares = {name: n * weight / total for name, weight in tasks.items()}
    counts = {name: int(share) for name, share in shares.items()}
    by_remainder = sorted(shares, key=lambda name: counts[name] - shares[name])
    for name in by_remainder[: n - sum(counts.values())]:
        counts[name] += 1
    return counts
