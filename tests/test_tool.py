"""The tool strategy: alias table, form parser, grounding and the pint computation."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.datagen import FAMILIES
from pipeline.scoring import parse_answer
from pipeline.tool import Form, convert, ground, mentioned_units, parse_form, resolve_unit, solve

SPELLINGS = [
    (family, unit, spelling)
    for family, units in FAMILIES.items()
    for unit in units
    for spelling in {unit.singular, unit.plural, *unit.symbols}
]


@pytest.mark.parametrize(("family", "unit", "spelling"), SPELLINGS, ids=[f"{f}:{s}" for f, _, s in SPELLINGS])
def test_every_generator_spelling_resolves_to_its_unit(family, unit, spelling):
    reference = FAMILIES[family][0]
    assert resolve_unit(spelling) is not None, spelling
    value = convert(Form(1.0, spelling, reference.plural))
    assert math.isclose(value, float(unit.factor / reference.factor), rel_tol=1e-9), (spelling, value)


def test_case_matters_where_the_data_set_says_so():
    assert convert(Form(1, "G", "M")) == pytest.approx(1000)  # GB and MB
    assert convert(Form(1, "g", "mg")) == pytest.approx(1000)  # grams
    assert convert(Form(1, "MB", "B")) == pytest.approx(1e6)
    assert convert(Form(1, "m", "mm")) == pytest.approx(1000)


@pytest.mark.parametrize(
    ("text", "form"),
    [
        ("6 kg -> grams", (6.0, "kg", "grams")),
        ("  2.5 G -> bits\n", (2.5, "G", "bits")),
        ("3 mi/h → m/s", (3.0, "mi/h", "m/s")),
        ("9 fluid ounces -> cc.", (9.0, "fluid ounces", "cc")),
        ("4 cm^3 to cm**3", (4.0, "cm^3", "cm**3")),
        ("1,500 m -> km", (1500.0, "m", "km")),
        ("5 m = millimeters", (5.0, "m", "millimeters")),
    ],
)
def test_parse_form_reads_the_structured_line(text, form):
    parsed = parse_form(text)
    assert (parsed.quantity, parsed.source, parsed.target) == form


@pytest.mark.parametrize("text", ["", "I do not know", "kg -> g", "6 kg"])
def test_unparsable_forms_give_no_answer(text):
    output, form = solve(text)
    assert math.isnan(parse_answer(output)) and form == ""


def test_unknown_unit_or_wrong_dimension_is_nan_not_an_error():
    assert math.isnan(convert(Form(3, "furlongs per fortnight squared", "m")))
    assert math.isnan(convert(Form(3, "kg", "m")))


def test_solve_appends_a_tagged_answer_that_scores():
    output, form = solve("4 centuries -> weeks")
    assert form == "4 centuries -> weeks"
    assert parse_answer(output) == pytest.approx(4 * 100 * 365.242199 / 7)


def test_grounding_repairs_a_unit_the_question_never_mentions():
    assert mentioned_units("How many cubic inches is 6.4 mL?") == ["cubic inches", "mL"]
    assert mentioned_units("What is 5 m in mm?") == ["m", "mm"]  # "in" is a word here, not inches
    question = "How many cubic inches is 3 quarts?"
    assert ground(Form(3, "quarts", "liters"), question) == Form(3, "quarts", "cubic inches")
    assert ground(Form(2, "weeks", "weeks"), "How many s is 2 weeks?") == Form(2, "weeks", "s")
    # a form that already names the question's units is left alone
    assert ground(Form(3, "quarts", "cubic inches"), question) == Form(3, "quarts", "cubic inches")


@given(st.text(max_size=200), st.text(max_size=80))
def test_solve_never_raises(output, question):
    text, form = solve(output, question)
    assert isinstance(text, str) and isinstance(form, str)
