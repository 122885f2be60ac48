"""The official MMMU rules, one quirk at a time (expected values worked out from the official code)."""
import math

import pytest

from reward import mmmu

LETTERS = ["A", "B", "C", "D"]
INDEX2ANS = {"A": "cat", "B": "small dog", "C": "bird", "D": "fish"}


def parse(response, variant="mmmu", mode="strict"):
    return mmmu.parse_multi_choice(response, LETTERS, INDEX2ANS, mode=mode, variant=variant)


@pytest.mark.parametrize(
    "response, expected",
    [
        ("I think (A) is wrong; the answer is (C).", "C"),  # bracketed letters first, the last one wins
        ("The answer is B.", "B"),  # trailing period stripped, then " B "
        ("A or B", "B"),  # several bare letters: the last
        ("I would pick the one about a small dog here", "B"),  # option text, only for > 5 words
        ("small dog", None),  # too short for option-text matching
        ("It codes DNA sequences", None),  # MMMU needs " A ", with spaces both sides
    ],
)
def test_mmmu_variant(response, expected):
    assert parse(response) == expected


@pytest.mark.parametrize(
    "response, expected",
    [
        ("Reasoning mentions (A).\nAnswer: D", "D"),  # the last "Answer:" with one letter in it wins
        ("Answer: B because of C", "C"),  # two letters after "Answer:", so the generic search decides
        ("It codes DNA sequences", "A"),  # "A " without a leading space counts (DNA)
        ("pick B.then stop", "B"),  # "X." as the last resort
    ],
)
def test_mmmu_pro_variant(response, expected):
    assert parse(response, variant="mmmu-pro") == expected


def test_variants_differ_on_answer_line():
    assert parse("Reasoning mentions (A).\nAnswer: D") == "A"


def test_official_mode_guesses_reproducibly_strict_mode_abstains():
    assert parse("no idea", mode="strict") is None
    guesses = {parse("no idea", mode="official") for _ in range(5)}
    assert guesses == {"A"}  # random.Random(42).choice("ABCD")
    assert mmmu.random_fallback(list("ABCDEFGHIJ")) == "B"  # random.Random(42).choice of ten


def test_rejects_unknown_mode_and_variant_and_empty_choices():
    with pytest.raises(ValueError):
        parse("A", mode="lenient")
    with pytest.raises(ValueError):
        parse("A", variant="mmmu-2")
    with pytest.raises(ValueError):
        mmmu.parse_multi_choice("A", [], {})


def test_multi_choice_info():
    assert mmmu.multi_choice_info(["x", "y"]) == ({"A": "x", "B": "y"}, ["A", "B"])


def test_number_helpers():
    assert mmmu.extract_numbers("It costs 1,234 dollars, or 1.2e3, or -5 and .5") == [
        "1,234", "1.2e3", "234", "1", "-5", ".5",
    ]
    assert mmmu.check_is_number("1,234.5") and mmmu.check_is_number("1e3") and not mmmu.check_is_number("1 2")
    assert mmmu.normalize_str(" 1,234.567 ") == [1234.57]
    assert mmmu.normalize_str("Paris") == ["paris"]
    assert mmmu.normalize_str("C") == [" c", "c "]
    assert math.isinf(mmmu.normalize_str("inf")[0])


def test_parse_open():
    assert mmmu.parse_open("First line\nso the total is 12.5 m.") == ["12.5 m", 12.5]
    assert mmmu.parse_open("x = 4") == [4.0]  # "=" is an indicator on the last line
    assert mmmu.parse_open("Paris") == ["paris"]  # no indicator: the whole response


def test_eval_rules():
    assert mmmu.eval_multi_choice("B", "B") and mmmu.eval_multi_choice(["A", "B"], "B")
    assert not mmmu.eval_multi_choice("B", None)
    assert mmmu.eval_open("3.14159", [3.14])  # gold rounded to 2 decimals too
    assert mmmu.eval_open("Paris", ["in paris"])
    assert mmmu.eval_open(["Tampa", "Florida"], ["florida"])
    assert not mmmu.eval_open("12", ["112"])  # "12" is a number, so no containment test
    assert mmmu.gold_answers("['24/7', '3.429']") == ["24/7", "3.429"]
    assert mmmu.gold_answers("[1, 2] apples") == "[1, 2] apples"


def test_subject_of():
    assert mmmu.subject_of({"subject": "Art Theory"}) == "Art_Theory"
    assert mmmu.subject_of({"id": "validation_Art_Theory_12"}) == "Art_Theory"
    assert mmmu.subject_of({}) == "unknown"


def test_aggregate_is_instance_weighted():
    table = mmmu.aggregate({"Art": (3, 4), "Music": (1, 2), "Math": (2, 2), "Cooking": (0, 1)})
    assert table["subjects"]["Art"] == {"num": 4, "acc": 0.75}
    assert table["disciplines"]["Art and Design"] == {"num": 6, "acc": pytest.approx(4 / 6)}  # (0.75·4 + 0.5·2)/6
    assert table["disciplines"]["Science"] == {"num": 2, "acc": 1.0}
    assert table["disciplines"]["Business"] == {"num": 0, "acc": 0.0}  # absent: reported as 0, as official
    assert table["overall"] == {"num": 9, "acc": pytest.approx(6 / 9)}  # Cooking counts in the overall only
    assert len(mmmu.DISCIPLINES) == 6 and sum(map(len, mmmu.DISCIPLINES.values())) == len(mmmu.CAT_SHORT2LONG) == 30


@pytest.mark.parametrize("response, expected", [
    ("<think>A is tempting, (A) even</think> \\boxed{C}", "C"),  # the boxed letter beats the official parse
    ("so \\boxed{(D)}", "D"),
    ("\\boxed{small dog}", "B"),  # option text in the box
    ("I think (A) is right. \\boxed{}", "A"),  # nothing usable boxed: the official parse
])
def test_r1v3_mode_reads_the_last_boxed_first(response, expected):
    assert parse(response, mode="r1v3") == expected
    assert parse(response, mode="official") != "C" or expected == "C"


def test_r1v3_mode_in_the_protocol():
    from reward.benchmark import score_rows

    rows = [{"response": "The answer is (A). \\boxed{B}", "answer": "B", "options": ["x", "y"]},
            {"response": "maybe 3 or 4 \\boxed{7}", "answer": "7", "question_type": "open", "options": []}]
    official = [r["correct"] for r in score_rows(rows, "mmmu", "official")[0]]
    r1v3 = [r["correct"] for r in score_rows(rows, "mmmu", "r1v3")[0]]
    assert official == [False, True] and r1v3 == [True, True]
    assert score_rows([{"response": "4 \\boxed{5}", "answer": "4", "question_type": "open", "options": []}],
                      "mmmu", "r1v3")[0][0]["correct"] is False  # open answers are read from the box only
