"""Synthetic tasks: deterministic, well-formed, answers that match the pixels, disjoint splits."""
from __future__ import annotations

import hashlib
import random
import re
from collections import Counter, defaultdict

import numpy as np
import pytest

from rollout.prompts import decode_image
from services.data.loading import load_problems
from services.data.problems import IMAGE_PLACEHOLDER
from services.data.synthetic import (
    BACKGROUND,
    COLOURS,
    MAX_ADDEND,
    MAX_COUNT,
    SOURCE,
    TASKS,
    generate_problem,
    make_dataset,
    problem_key,
    reference_solution,
    sample_problems,
    solution_answer,
    teacher_plan,
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


# ---- the imperfect teacher and the OOD split -----------------------------------------------------------------
DEFAULT_TASKS = {"color": 1.0, "count": 1.0, "count_plus": 1.0}
RATE0_DIGEST = "6d344b31a6a036a881dcb16718764ec1aa1a6d7a7477d95bbabb3a463c80a8f1"  # the data before the teacher


def _features(problem, seed: int = 0, image_size: int = 56) -> dict:
    """What a training problem's image and question show (its generator's draw replayed)."""
    return dict(TASKS[problem.subject].generate(random.Random(f"{seed}:{problem.id}"), image_size).features)


def _shape_masks(image_bytes: bytes) -> list[np.ndarray]:
    """Each drawn shape's pixels, cropped to its bounding box (one shape per cell of the 2x2 grid)."""
    mask = np.any(np.asarray(decode_image(image_bytes)) != BACKGROUND, axis=-1)
    half = mask.shape[0] // 2
    cells = [mask[y:y + half, x:x + half] for y in (0, half) for x in (0, half)]
    return [c[np.ix_(np.any(c, axis=1), np.any(c, axis=0))] for c in cells if c.any()]


def _is_diamond(shape: np.ndarray) -> bool:
    """A diamond fills about half its box and is widest in its middle row (a triangle is widest at the base,
    a square and a circle fill more)."""
    widths = shape.sum(axis=1)
    fill = shape.mean()
    return bool(0.4 < fill < 0.65 and abs(int(np.argmax(widths)) - (len(widths) - 1) / 2) <= 1)


def _extent(image_bytes: bytes) -> int:
    """Width of the bounding box of the non-background pixels."""
    pixels = np.asarray(decode_image(image_bytes))
    xs = np.nonzero(np.any(pixels != BACKGROUND, axis=-1))[1]
    return int(xs.max() - xs.min() + 1)


def test_rate_zero_keeps_todays_data() -> None:
    digest = hashlib.sha256()
    for p in sample_problems(ALL, 200, seed=0, teacher_error_rate=0.0):
        digest.update(repr((p.id, p.question, p.answer, p.solution)).encode())
    assert digest.hexdigest() == RATE0_DIGEST
    assert generate_problem("count_plus", 3).solution == (
        "<think>I count 3 shapes. Wait, let me count again. Yes, 3 shapes. 3 + 4 = 7.</think> \\boxed{7}")


@pytest.mark.parametrize("rate", [0.15, 0.3])
def test_teacher_errs_at_its_rate_systematically_and_answers_stay_true(rate: float) -> None:
    clean = sample_problems(ALL, 3200, seed=1)
    taught = sample_problems(ALL, 3200, seed=1, teacher_error_rate=rate)
    assert [dataclasses_without_solution(p) for p in taught] == [dataclasses_without_solution(p) for p in clean]
    by_cell: dict[tuple, list] = defaultdict(list)
    for p in taught:
        assert re.fullmatch(r"<think>[^<>]+</think> \\boxed\{(\w+)\}", p.solution), p.solution
        plan = teacher_plan(p.subject, rate)
        by_cell[p.subject, plan.cell(_features(p, seed=1))].append(p)
    for task in TASKS:
        mine = [p for p in taught if p.subject == task]
        share = sum(solution_answer(p.solution) != p.answer for p in mine) / len(mine)
        assert abs(share - rate) < 0.06, (task, share)
        assert abs(teacher_plan(task, rate).expected_error_share - rate) < 1e-9
    for (task, cell), problems in by_cell.items():
        wrong = [p for p in problems if solution_answer(p.solution) != p.answer]
        if cell in teacher_plan(task, rate).hard:  # the teacher's mode is wrong there, but not always
            assert 0.5 < len(wrong) / len(problems) < 1, (task, cell, len(wrong), len(problems))
            if task in ("count", "count_plus"):  # one wrong answer per cell, the one the student will learn
                assert len({solution_answer(p.solution) for p in wrong}) == 1, (task, cell)
        else:
            assert not wrong, (task, cell)


def test_teacher_wrong_band_sets_how_often_the_hard_subset_is_wrong() -> None:
    """data.teacher_wrong moves the within-hard-cell wrong probability into its band at the same error rate:
    more right traces where the teacher errs, its mode there still wrong."""
    band = (0.55, 0.6, 0.7)
    for task in ("color", "count", "count_plus"):
        plan = teacher_plan(task, 0.3, band)
        assert band[0] <= plan.wrong <= band[2] and abs(plan.expected_error_share - 0.3) < 1e-9
        assert teacher_plan(task, 0.3).wrong >= plan.wrong
    assert teacher_plan("count", 0.3).wrong == pytest.approx(0.9) and teacher_plan("count", 0.3, band).wrong == pytest.approx(0.675)
    taught = sample_problems({"count": 1.0}, 2000, seed=5, teacher_error_rate=0.3, teacher_wrong=band)
    plan = teacher_plan("count", 0.3, band)
    hard = [p for p in taught if plan.cell(_features(p, seed=5)) in plan.hard]
    wrong = sum(solution_answer(p.solution) != p.answer for p in hard) / len(hard)
    assert abs(wrong - plan.wrong) < 0.05, wrong
    with pytest.raises(ValueError, match="teacher_wrong"):
        teacher_plan("count", 0.3, (0.4, 0.6, 0.7))


def dataclasses_without_solution(problem):
    return problem.id, problem.question, problem.answer, problem.options, problem.images


def test_teacher_error_forms_and_reflection() -> None:
    taught = sample_problems({"count": 1.0, "count_plus": 1.0}, 1200, seed=2, teacher_error_rate=0.3)
    forms = Counter()
    for p in taught:
        f, boxed, right = _features(p, seed=2), solution_answer(p.solution), solution_answer(p.solution) == p.answer
        counts = [int(c) for c in re.findall(r"I count (\d)", p.solution)]
        if "Wait, let me count again. I count" in p.solution:  # a wrong first count, caught and corrected
            assert counts[0] != counts[1] == f["n"] and right
            forms["caught miscount"] += 1
        elif "Wait, let me count again. Yes" in p.solution:  # a check on an actually hard count (3 shapes)
            assert f["n"] == MAX_COUNT and counts == [MAX_COUNT] and right
        elif "Wait" in p.solution:
            assert p.subject == "count_plus" and right
            forms["caught addition"] += 1
        else:  # no reflection: an easy count, or an error that stands
            assert counts and (counts[0] == f["n"] or (f["n"] == MAX_COUNT and counts[0] == MAX_COUNT - 1))
        if not right:
            if counts[0] != f["n"]:
                forms["miscount"] += 1
            elif p.subject == "count_plus" and "+" not in p.solution:
                assert boxed == str(f["n"]) and f["k"] == MAX_ADDEND  # answered the count without adding
                forms["dropped addend"] += 1
            else:
                assert p.subject == "count_plus" and f"= {f['n'] + f['k'] + 1}." in p.solution
                forms["addition slip"] += 1
    assert set(forms) == {"miscount", "dropped addend", "addition slip", "caught miscount", "caught addition"}
    assert taught == sample_problems({"count": 1.0, "count_plus": 1.0}, 1200, seed=2, teacher_error_rate=0.3)


def test_make_dataset_reports_the_teacher_and_keeps_heldout_clean(tmp_path) -> None:
    summary = make_dataset(tmp_path, 900, 60, DEFAULT_TASKS, seed=3, teacher_error_rate=0.3)
    train = load_problems(tmp_path / "train.parquet").problems
    heldout = load_problems(tmp_path / "heldout.parquet").problems
    for task in DEFAULT_TASKS:
        mine = [p for p in train if p.subject == task]
        share = sum(solution_answer(p.solution) != p.answer for p in mine) / len(mine)
        assert summary["teacher"][task]["error_share"] == round(share, 4) and abs(share - 0.3) < 0.08
        assert summary["teacher"][task]["hard"]
    assert all(p.solution == reference_solution(p) for p in heldout)
    assert not (tmp_path / "ood.parquet").exists() and "ood" not in summary
    assert (tmp_path / "summary.json").is_file()
    clean = make_dataset(tmp_path / "clean", 30, 10, DEFAULT_TASKS, seed=3)
    assert clean["teacher"]["all"]["error_share"] == 0


def test_ood_split_is_outside_the_training_range_and_disjoint(tmp_path) -> None:
    summary = make_dataset(tmp_path, 400, 80, ALL, seed=4, n_ood=80)
    splits = {name: load_problems(tmp_path / f"{name}.parquet").problems for name in ("train", "heldout", "ood")}
    ood = splits["ood"]
    assert len(ood) == summary["ood"]["n"] == 80 and {p.subject for p in ood} == set(ALL)
    assert all("-ood-" in p.id and p.solution == reference_solution(p) for p in ood)
    for name in ("train", "heldout"):
        assert {problem_key(p) for p in ood}.isdisjoint(problem_key(p) for p in splits[name])
        assert {p.id for p in ood}.isdisjoint(p.id for p in splits[name])
    inside = splits["train"] + splits["heldout"]
    smallest = min(_extent(p.images[0]) for p in inside if p.subject == "color")
    for p in ood:
        blobs, _ = _components(p.images[0])
        if p.subject == "color":
            assert _extent(p.images[0]) < smallest
            continue
        assert 1 <= blobs <= MAX_COUNT and all(_is_diamond(shape) for shape in _shape_masks(p.images[0]))
        if p.subject == "count":
            assert p.answer == str(blobs)
        elif p.subject == "count_plus":
            k = int(re.search(r"Add (\d+) to that number", p.question).group(1))
            assert 1 <= k <= MAX_ADDEND and int(p.answer) == blobs + k
        else:
            assert p.answer in ("0", str(blobs))
    assert not any(_is_diamond(shape) for p in inside if p.subject != "color" for shape in _shape_masks(p.images[0]))
    assert all(int(p.answer) <= MAX_COUNT for p in inside if p.subject == "count")
    assert all(int(re.search(r"Add (\d+)", p.question).group(1)) <= MAX_ADDEND for p in inside
               if p.subject == "count_plus")
