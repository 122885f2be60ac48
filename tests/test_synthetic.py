"""Synthetic tasks: deterministic, well-formed, answers that match the pixels, disjoint splits."""
from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from rollout.prompts import decode_image
from services.data.loading import load_problems
from services.data.problems import IMAGE_PLACEHOLDER
from services.data.synthetic import (
    BACKGROUND,
    COLOURS,
    SOURCE,
    TASKS,
    generate_problem,
    make_dataset,
    problem_key,
    reference_solution,
    sample_problems,
)

ALL = {name: 1.0 for name in TASKS}


def _components(image_bytes: bytes) -> tuple[int, set[str]]:
    """Independent check of a rendered image: 4-connected non-background regions and their colours."""
    pixels = np.asarray(decode_image(image_bytes))
    mask = np.any(pixels != BACKGROUND, axis=-1)
    labels = np.zeros(mask.shape, dtype=int)
    count = 0
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        count += 1
        stack = [start]
        labels[start] = count
        while stack:
            y, x = stack.pop()
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = count
                    stack.append((ny, nx))
    names = {name for name, rgb in COLOURS.items() if np.all(pixels[mask] == rgb, axis=-1).any()}
    return count, names


def test_same_seed_same_bytes_and_other_seed_differs() -> None:
    first = sample_problems(ALL, 40, seed=7)
    assert first == sample_problems(ALL, 40, seed=7)
    other = sample_problems(ALL, 40, seed=8)
    assert {problem_key(p) for p in first}.isdisjoint(problem_key(p) for p in other)


@pytest.mark.parametrize("image_size", [56, 112])
@pytest.mark.parametrize("task", sorted(TASKS))
def test_problem_fields(task: str, image_size: int) -> None:
    problem = generate_problem(task, 12, seed=3, image_size=image_size)
    assert problem.id == f"{task}-train-000012"
    assert problem.subject == task and problem.source == SOURCE
    assert problem.question.startswith(IMAGE_PLACEHOLDER + "\n")
    assert problem.question.count(IMAGE_PLACEHOLDER) == 1
    assert len(problem.images) == 1
    assert decode_image(problem.images[0]).size == (image_size, image_size)
    if problem.answer_type == "choice":
        assert sorted(problem.options) == sorted(COLOURS)
        for letter, option in zip("ABCD", problem.options):
            assert f"\n{letter}. {option}" in problem.question
    else:
        assert problem.answer_type == "numeric" and problem.answer.isdigit()


def test_difficulty_levels_span_three() -> None:
    levels = {p.subject: p.difficulty for p in sample_problems(ALL, 20)}
    assert levels == {"color": 1, "count": 2, "count_plus": 3, "color_count": 3}


@pytest.mark.parametrize("image_size", [56, 112])
def test_answers_match_pixels(image_size: int) -> None:
    problems = sample_problems(ALL, 120, seed=11, image_size=image_size)
    for p in problems:
        blobs, colours = _components(p.images[0])
        assert len(colours) == 1, p.id
        (colour,) = colours
        if p.subject == "color":
            assert blobs == 1 and p.options["ABCD".index(p.answer)] == colour, p.id
        elif p.subject == "count":
            assert int(p.answer) == blobs, p.id
        elif p.subject == "count_plus":
            k = int(re.search(r"Add (\d) to that number", p.question).group(1))
            assert 1 <= k <= 5 and int(p.answer) == blobs + k, p.id
        else:
            asked = re.search(r"How many (\w+) shapes", p.question).group(1)
            assert int(p.answer) == (blobs if asked == colour else 0), p.id


def test_answers_are_spread() -> None:
    problems = sample_problems(ALL, 400, seed=5)
    by_task = {task: Counter(p.answer for p in problems if p.subject == task) for task in TASKS}
    assert set(by_task["color"]) == set("ABCD")
    assert set(by_task["count"]) == {"1", "2", "3"}
    assert min(by_task["count"].values()) > 15
    assert 0.3 < by_task["color_count"]["0"] / sum(by_task["color_count"].values()) < 0.7
    first_options = Counter(p.options[0] for p in problems if p.subject == "color")
    assert len(first_options) == 4  # option order is shuffled per problem


def test_reference_solutions_are_short_and_correct() -> None:
    for p in sample_problems(ALL, 80, seed=2):
        solution = reference_solution(p)
        assert re.fullmatch(r"<think>[^<>]+</think> \\boxed\{(\w+)\}", solution).group(1) == p.answer
        assert len(solution) < 120
        if p.subject == "count_plus":
            seen, k, total = map(int, re.search(r"(\d) \+ (\d) = (\d)", solution).groups())
            assert seen + k == total == int(p.answer)
        if p.subject == "color_count" and p.answer == "0":
            (colour,) = _components(p.images[0])[1]
            assert f"The shapes are {colour}" in solution


def test_some_reference_solutions_reflect_and_some_correct_a_first_count() -> None:
    problems = sample_problems({"count": 1.0, "count_plus": 1.0, "color": 1.0}, 600, seed=4)
    reflective = [p for p in problems if "Wait," in p.solution or "Let me check" in p.solution]
    corrected = [p for p in problems if len(set(re.findall(r"I count (\d)", p.solution))) == 2]
    assert 0.22 < len(reflective) / len(problems) < 0.38  # REFLECT_RATE 0.3
    assert 0.03 < len(corrected) / len(problems) < 0.12  # CORRECT_RATE 0.1, on the two counting tasks
    for p in corrected:  # the recount is the right one, and the answer builds on it
        first, second = re.findall(r"I count (\d)", p.solution)
        assert first != second and "Wait, let me count again" in p.solution
        assert p.solution.endswith(f"\\boxed{{{p.answer}}}")
    assert all(p.solution == reference_solution(p) for p in problems)


def test_unknown_task_and_bad_weights_are_rejected() -> None:
    with pytest.raises(KeyError, match="unknown synthetic task 'size'"):
        sample_problems({"size": 1.0}, 4)
    with pytest.raises(ValueError, match="positive"):
        sample_problems({"count": 0.0}, 4)


def test_weights_give_exact_counts() -> None:
    problems = sample_problems({"color": 1, "count": 2, "count_plus": 0}, 10)
    assert Counter(p.subject for p in problems) == {"color": 3, "count": 7}


def test_exclude_is_never_drawn() -> None:
    """The dedupe make_dataset relies on: excluded keys are replaced by fresh draws, not returned."""
    taken = sample_problems({"count": 1}, 30, seed=4)
    again = sample_problems({"count": 1}, 30, seed=4, exclude=map(problem_key, taken))
    assert len(again) == 30
    assert {problem_key(p) for p in taken}.isdisjoint(problem_key(p) for p in again)


def test_make_dataset_writes_disjoint_splits(tmp_path) -> None:
    summary = make_dataset(tmp_path, 60, 30, {"color": 1, "count": 1, "count_plus": 2}, image_size=56, seed=9)
    train = load_problems(tmp_path / "train.parquet")
    heldout = load_problems(tmp_path / "heldout.parquet")
    assert train.skipped == heldout.skipped == {}
    assert len(train.problems) == summary["train"]["n"] == 60
    assert len(heldout.problems) == summary["heldout"]["n"] == 30
    assert summary["train"]["by_subject"] == {"color": 15, "count": 15, "count_plus": 30}
    assert summary["heldout"]["by_difficulty"] == {1: 8, 2: 7, 3: 15}
    assert {problem_key(p) for p in train.problems}.isdisjoint(problem_key(p) for p in heldout.problems)
    assert {p.id for p in train.problems}.isdisjoint(p.id for p in heldout.problems)
