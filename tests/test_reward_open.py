"""MMMU open-question accuracy (official parse_open + eval_open), hand-worked."""
import json

import pytest

from reward.open_scorer import score_open


@pytest.mark.parametrize(
    "response, gold, accuracy",
    [
        ("The answer is 1,000.", "1000", 1.0),  # comma grouping
        ("so x = 3.14159", "3.14", 1.0),  # both sides rounded to 2 decimals
        ("The result is 1.5e3", "1500", 1.0),  # scientific notation
        ("The city is Tampa, Florida.", "Tampa", 1.0),  # normalised containment
        ("Therefore the answer is 3.429", "['24/7', '3.429']", 1.0),  # list gold, MMMU literal
        ("The answer is C", "C", 1.0),  # single letter must stand alone
        ("The answer is Cat", "C", 0.0),
        ("The answer is 7", "8", 0.0),
        ("<think>it is 8</think> the answer is 7", "8", 0.0),  # reasoning is not the answer
    ],
)
def test_score_open(response, gold, accuracy):
    assert score_open(response, gold).parts["accuracy"] == accuracy


def test_parsed_lists_the_candidates():
    result = score_open("The answer is 1,000.", "1000")
    # "1,000" is read whole, and (official quirk) its "000" group again as a plain number.
    assert json.loads(result.parsed) == [1000.0, 0.0]


def test_empty_answer():
    result = score_open("<think>12</think>   ", "12")
    assert (result.parts["accuracy"], result.parsed, result.error) == (0.0, None, "no answer")
