"""The independent evaluation set: its generator, its answers checked with pint, its config, its units found."""

from __future__ import annotations

import json
import math
from collections import Counter

import pint
import pytest

from pipeline.data import load_items
from pipeline.holdout import FAMILIES, HOLDOUT_PATH, TEMPLATES, dumps, generate
from pipeline.tool import candidate_forms, convert, parse_form

# Every unit key in pint's own terms, written here apart from the generator's fractions.
UREG = pint.UnitRegistry()
UREG.define("dataset_year = 365.242199 * day")
PINT_UNITS = {
    "mg": "milligram", "g": "gram", "kg": "kilogram", "t": "metric_ton", "oz": "avoirdupois_ounce",
    "lb": "avoirdupois_pound", "st": "stone",
    "mm": "millimeter", "cm": "centimeter", "m": "meter", "km": "kilometer", "in": "inch", "ft": "foot",
    "yd": "yard", "mi": "mile", "nmi": "nautical_mile",
    "m/s": "meter/second", "km/h": "kilometer/hour", "mph": "mile/hour", "ft/s": "foot/second", "kn": "knot",
    "ms": "millisecond", "s": "second", "min": "minute", "h": "hour", "day": "day", "week": "week",
    "fortnight": "fortnight", "month": "dataset_year/12", "year": "dataset_year", "decade": "10*dataset_year",
    "century": "100*dataset_year",
    "mL": "milliliter", "L": "liter", "cc": "centimeter**3", "gal": "US_liquid_gallon", "qt": "US_liquid_quart",
    "pt": "quart / 2", "cup": "cup", "floz": "US_fluid_ounce", "tbsp": "tablespoon", "tsp": "teaspoon",
    "in3": "inch**3", "ft3": "foot**3", "m3": "meter**3",
    "cm2": "centimeter**2", "m2": "meter**2", "km2": "kilometer**2", "ha": "hectare", "acre": "acre",
    "in2": "inch**2", "ft2": "foot**2", "yd2": "yard**2", "mi2": "mile**2",
    "bit": "bit", "kbit": "kilobit", "Mbit": "megabit", "B": "byte", "kB": "kilobyte", "MB": "megabyte",
    "GB": "gigabyte", "TB": "terabyte", "KiB": "kibibyte", "MiB": "mebibyte", "GiB": "gibibyte",
}  # fmt: skip
ITEMS = json.loads(HOLDOUT_PATH.read_text(encoding="utf-8"))


def test_generator_is_seeded_and_reproduces_the_shipped_file_byte_for_byte():
    assert dumps(generate(1024, seed=0)) == HOLDOUT_PATH.read_text(encoding="utf-8")
    assert generate(40, seed=1) != generate(40, seed=2)


def test_every_answer_matches_pint():
    assert {u.key for units in FAMILIES.values() for u in units} == set(PINT_UNITS)
    for item in ITEMS:
        ratio = UREG(PINT_UNITS[item["from_unit"]]) / UREG(PINT_UNITS[item["to_unit"]])
        expected = item["quantity"] * ratio.to("dimensionless").magnitude
        assert math.isclose(item["answer"], expected, rel_tol=1e-9), item


def test_answers_are_scorable_and_questions_distinct():
    assert all(0.1 <= item["answer"] <= 1e9 for item in ITEMS)
    assert len({item["question"] for item in ITEMS}) == len(ITEMS)
    assert any(item["answer"] < 1 for item in ITEMS[:256])  # small answers are in the first 256 too


def test_the_first_256_cover_every_family_and_template_and_items_carry_both():
    first = load_items(name="unit_conversion_holdout")[:256]
    assert {item.meta["family"] for item in first} == set(FAMILIES)
    assert {item.meta["template"] for item in first} == set(TEMPLATES)
    assert min(Counter(item.meta["template"] for item in first).values()) >= 4


@pytest.mark.parametrize(
    "needle",
    ["metres", "litres", "gramme", "lb.", "sq. ft.", "fl. oz.", " per ", " an hour", "KiB", "²", "^3", "units."],
)
def test_spellings_and_phrasings_the_shipped_set_lacks(needle):
    assert any(needle in item["question"] for item in ITEMS), needle


def test_a_correct_form_can_be_written_for_every_question():
    """The lexicon finds each question's number and both units, so the constrained forms hold the answer."""
    for item in ITEMS:
        values = [convert(parse_form(form)) for form in candidate_forms(item["question"])]
        assert any(math.isclose(v, item["answer"], rel_tol=1e-6) for v in values), item["question"]


def test_dataset_config_selects_the_set(compose_cfg):
    from omegaconf import OmegaConf

    from pipeline.config import Config
    from pipeline.data import dataset_file

    cfg = OmegaConf.to_object(compose_cfg(["dataset=unit_conversion_holdout"]))
    assert isinstance(cfg, Config) and cfg.dataset.name == "unit_conversion_holdout"
    assert dataset_file(cfg.dataset.path, cfg.dataset.name) == HOLDOUT_PATH
    assert load_items(cfg.dataset.path, cfg.dataset.name)[0].question == ITEMS[0]["question"]
