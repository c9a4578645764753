"""Answer parsing and the original grader's scoring rule."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.scoring import is_correct, parse_answer, parse_number, score


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<answer>6000</answer>", 6000.0),
        ("<answer> 6000 </answer>", 6000.0),
        ("<answer>6,000</answer>", 6000.0),
        ("<answer>1 234 567.5</answer>", 1234567.5),
        ("<answer>6e3</answer>", 6000.0),
        ("<answer>2.5E-2</answer>", 0.025),
        ("<answer>6 x 10^3</answer>", 6000.0),
        ("<answer>-0.5</answer>", -0.5),
        ("<answer>.75</answer>", 0.75),
        ("<answer>6000 grams</answer>", 6000.0),
        ("so 6 * 1000 = 6000. <answer>6000</answer> and <answer>7</answer>", 6000.0),
    ],
)
def test_parse_answer_reads_the_first_tagged_number(text, expected):
    assert parse_answer(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["6000", "<answer>6000", "<answer>abc</answer>", "", "<answer></answer>"])
def test_parse_answer_without_a_tagged_number_is_nan(text):
    assert math.isnan(parse_answer(text))


def test_is_correct_uses_the_graders_relative_rule():
    assert is_correct(6000, 6000)
    assert is_correct(6200, 6000)  # within 5 %
    assert not is_correct(6400, 6000)
    assert not is_correct(math.nan, 6000)
    assert is_correct(2.74, 2.7432)
    assert not is_correct(0.0, 0.0)  # the grader's strict '<' cannot accept a zero answer
    assert is_correct(6400, 6000, tolerance=0.1)


def test_score_counts_accuracy_and_answer_rate():
    result = score([6000.0, math.nan, 1.0, 180.0], [6000.0, 5.0, 2.0, 180.0])
    assert (result.num_correct, result.num_answered, result.num_items) == (2, 3, 4)
    assert result.accuracy == 0.5 and result.answer_rate == 0.75


@given(st.text())
def test_parsing_never_raises_on_arbitrary_text(text):
    value = parse_answer(text)
    assert isinstance(value, float)
    assert math.isnan(value) or math.isfinite(value)


@given(st.floats(allow_nan=False, allow_infinity=False, min_value=-1e12, max_value=1e12))
def test_a_tagged_float_parses_back(value):
    assert parse_answer(f"<answer>{value!r}</answer>") == pytest.approx(value)
    assert parse_number(f"{value:,.3f}") == pytest.approx(round(value, 3), abs=1e-3)
