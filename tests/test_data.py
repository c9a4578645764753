"""The shipped unit-conversion set, its generator, and loading user data files."""

from __future__ import annotations

import json
import math

import pint
import pytest

from pipeline.data import Item, load_items, select
from pipeline.datagen import DEFAULT_PATH, FAMILIES, dumps, generate
from pipeline.errors import PipelineError

# An independent definition of every unit key, in pint's own terms (not the generator's factors).
UREG = pint.UnitRegistry()
UREG.define("dataset_year = 365.242199 * day")
PINT_UNITS = {
    "mg": "milligram",
    "g": "gram",
    "kg": "kilogram",
    "t": "metric_ton",
    "oz": "ounce",
    "lb": "pound",
    "mm": "millimeter",
    "cm": "centimeter",
    "m": "meter",
    "km": "kilometer",
    "in": "inch",
    "ft": "foot",
    "yd": "yard",
    "mi": "mile",
    "m/s": "meter/second",
    "km/h": "kilometer/hour",
    "mi/h": "mile/hour",
    "ft/s": "foot/second",
    "s": "second",
    "min": "minute",
    "h": "hour",
    "day": "day",
    "week": "week",
    "month": "dataset_year/12",
    "year": "dataset_year",
    "decade": "10*dataset_year",
    "century": "100*dataset_year",
    "gal": "gallon",
    "qt": "quart",
    "pt": "pint",
    "cup": "cup",
    "floz": "fluid_ounce",
    "mL": "milliliter",
    "L": "liter",
    "cc": "cc",
    "cm3": "centimeter**3",
    "in3": "inch**3",
    "m3": "meter**3",
    "bit": "bit",
    "B": "byte",
    "kB": "kilobyte",
    "MB": "megabyte",
    "GB": "gigabyte",
}


def test_shipped_set_is_large_and_covers_every_family():
    items = load_items()
    assert len(items) >= 1000
    assert {item.meta["family"] for item in items} == set(FAMILIES)
    assert len({item.question for item in items}) == len(items)


def test_every_shipped_answer_matches_pint():
    raw = json.loads(DEFAULT_PATH.read_text())
    assert {u.key for units in FAMILIES.values() for u in units} == set(PINT_UNITS)
    for item in raw:
        ratio = UREG(PINT_UNITS[item["from_unit"]]) / UREG(PINT_UNITS[item["to_unit"]])
        expected = item["quantity"] * ratio.to("dimensionless").magnitude
        assert math.isclose(item["answer"], expected, rel_tol=1e-9), item


def test_generator_is_deterministic_and_reproduces_the_shipped_file():
    assert dumps(generate(1280, seed=0)) == DEFAULT_PATH.read_text()
    assert generate(50, seed=1) != generate(50, seed=2)


def test_questions_use_many_phrasings_and_the_g_m_spelling():
    questions = [item.question for item in load_items()]
    starts = {q.split()[0] for q in questions}
    assert len(starts) >= 8
    assert any(" G" in q or "G?" in q for q in questions)
    assert any("mi/h" in q for q in questions)


def test_loads_pairs_and_objects(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps([["How many g in 1 kg?", 1000], {"question": "1 h in min?", "answer": "60", "x": 1}]))
    items = load_items(path)
    assert items == [Item("How many g in 1 kg?", 1000.0), Item("1 h in min?", 60.0)]
    assert items[1].meta == {"x": 1}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "not valid JSON"),
        ("{}", "JSON list"),
        ("[]", "empty"),
        ('[["q"]]', "item 0"),
        ('[["q", 1], {"question": "q2"}]', "item 1"),
        ('[["q", "many"]]', "non-numeric"),
        ('[["", 1]]', "empty or non-text question"),
    ],
)
def test_bad_files_name_the_problem(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(PipelineError, match=message):
        load_items(path)


def test_missing_file_names_the_fix(tmp_path):
    with pytest.raises(PipelineError, match="dataset.path"):
        load_items(tmp_path / "nope.json")


def test_select_uses_what_there_is_and_warns():
    items = [Item("q", 1.0)] * 3
    assert select(items, 2) == (items[:2], None)
    chosen, warning = select(items, 5)
    assert chosen == items and "fewer" in warning
