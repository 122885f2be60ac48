"""Synthetic visual math problems a ~1M-parameter random-init VLM can learn in minutes.

A tiny vision tower picks up global cues (the colour of one big shape, how many big blobs) in
seconds to a couple of minutes, but not small objects or left/right relations (see the learnability
notes in cpu-stack.md). So every image here is a few big, flat-coloured shapes on white: the colour
task shows one shape filling much of the image; the counting tasks put 1-3 blobs in distinct cells of
a 2x2 grid (at 56 px each cell is exactly one image token after the 2x2 merge). Harder levels add a
step in text (add K; count only shapes of a named colour), which leaves RL room to improve on.

Every problem is a pure function of (seed, id), so datasets are reproducible byte for byte.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import random
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from rollout.prompts import decode_image
from services.data.loading import LETTERS, describe, format_choices, write_problems
from services.data.problems import IMAGE_PLACEHOLDER, Problem

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
MIN_IMAGE_SIZE = 22  # below it a cell of the 2x2 grid cannot hold the largest blob with its margin (_blobs)
# Reference solutions reflect some of the time (R1V3 §5.1: critical tokens such as "Wait" mark reflection):
# a share recounts ("Wait, let me count again"), part of it correcting a wrong first count.
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


@dataclass(frozen=True)
class Task:
    """A task family: draws a problem from an rng, and writes the ideal response to one."""

    generate: Callable[[random.Random, int], Draw]
    solve: Callable[[Problem], str]


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
        else:
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _blobs(rng: random.Random, size: int) -> tuple[int, str, bytes]:
    """1-3 same-colour, same-kind shapes, each inside its own cell of a 2x2 grid (never touching)."""
    count = rng.randint(1, MAX_COUNT)
    colour = rng.choice(list(COLOURS))
    kind = rng.choice(SHAPES)
    cell = size // 2
    shapes = []
    for cell_index in rng.sample(range(4), count):
        r = rng.randint(round(size * 0.13), round(size * 0.17))
        x0, y0 = (cell_index % 2) * cell, (cell_index // 2) * cell
        x = rng.randint(x0 + r + 1, x0 + cell - r - 2)
        y = rng.randint(y0 + r + 1, y0 + cell - r - 2)
        shapes.append((kind, colour, x, y, r))
    return count, colour, _render(shapes, size)


def _shapes(n: int, colour: str = "") -> str:
    words = f"{colour} shape" if colour else "shape"
    return f"{n} {words}" if n == 1 else f"{n} {words}s"


def _response(thought: str, answer: str) -> str:
    return f"<think>{thought}</think> \\boxed{{{answer}}}"


def _generate_color(rng: random.Random, size: int) -> Draw:
    colour = rng.choice(list(COLOURS))
    r = rng.randint(round(size * 0.28), round(size * 0.38))
    x, y = rng.randint(r + 1, size - r - 2), rng.randint(r + 1, size - r - 2)
    options = tuple(rng.sample(list(COLOURS), len(COLOURS)))
    return Draw(
        question=f"{IMAGE_PLACEHOLDER}\nWhat colour is the shape?\n{format_choices(options)}",
        answer=LETTERS[options.index(colour)],
        answer_type="choice",
        image=_render([(rng.choice(SHAPES), colour, x, y, r)], size),
        difficulty=1,
        options=options,
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


def _generate_count(rng: random.Random, size: int) -> Draw:
    count, _, image = _blobs(rng, size)
    return Draw(
        question=f"{IMAGE_PLACEHOLDER}\nHow many shapes are in the image?",
        answer=str(count),
        answer_type="numeric",
        image=image,
        difficulty=2,
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


def _generate_count_plus(rng: random.Random, size: int) -> Draw:
    count, _, image = _blobs(rng, size)
    k = rng.randint(1, 5)
    return Draw(
        question=f"{IMAGE_PLACEHOLDER}\nHow many shapes are in the image? Add {k} to that number.",
        answer=str(count + k),
        answer_type="numeric",
        image=image,
        difficulty=3,
    )


def _solve_count_plus(problem: Problem) -> str:
    k = int(_match(r"Add (\d+) to that number", problem.question))
    total = int(problem.answer)
    return _response(f"{_count_thought(problem, total - k)} {total - k} + {k} = {total}.", problem.answer)


def _generate_color_count(rng: random.Random, size: int) -> Draw:
    """Half the time the asked colour is the one drawn; otherwise the answer is 0."""
    count, colour, image = _blobs(rng, size)
    asked = colour if rng.random() < 0.5 else rng.choice([c for c in COLOURS if c != colour])
    return Draw(
        question=f"{IMAGE_PLACEHOLDER}\nHow many {asked} shapes are in the image?",
        answer=str(count if asked == colour else 0),
        answer_type="numeric",
        image=image,
        difficulty=3,
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


TASKS: dict[str, Task] = {
    "color": Task(_generate_color, _solve_color),
    "count": Task(_generate_count, _solve_count),
    "count_plus": Task(_generate_count_plus, _solve_count_plus),
    "color_count": Task(_generate_color_count, _solve_color_count),
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


def generate_problem(task: str, index: int, *, split: str = "train", seed: int = 0, image_size: int = 56) -> Problem:
    """Problem `index` of a task family in a split; the rng is seeded from (seed, id)."""
    problem_id = f"{task}-{split}-{index:06d}"
    draw = _task(task).generate(random.Random(f"{seed}:{problem_id}"), image_size)
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
    return dataclasses.replace(problem, solution=reference_solution(problem))


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
            problem = generate_problem(task, index, split=split, seed=seed, image_size=image_size)
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
) -> dict[str, Any]:
    """Write train.parquet and heldout.parquet with no problem in both; returns their summaries."""
    out_dir = Path(out_dir)
    heldout = sample_problems(tasks, n_heldout, split="heldout", seed=seed, image_size=image_size)
    train = sample_problems(
        tasks, n_train, split="train", seed=seed, image_size=image_size, exclude=map(problem_key, heldout)
    )
    return {
        "seed": seed,
        "image_size": image_size,
        "tasks": dict(tasks),
        "train": {"path": str(write_problems(out_dir / "train.parquet", train)), **describe(train)},
        "heldout": {"path": str(write_problems(out_dir / "heldout.parquet", heldout)), **describe(heldout)},
    }


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
