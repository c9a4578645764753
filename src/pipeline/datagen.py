"""Seeded generator of the shipped unit-conversion evaluation set.

Run ``python -m pipeline.datagen`` to rewrite ``src/pipeline/data/unit_conversion.json``;
the same seed gives the same file byte for byte (a test checks it). Answers are
computed exactly with fractions from the unit definitions below.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction as F
from pathlib import Path

DEFAULT_PATH = Path(__file__).parent / "data" / "unit_conversion.json"

# A year is 365.242199 days (tropical year) and a month a twelfth of it.
YEAR_S = F("365.242199") * 86400
INCH_M = F("0.0254")
GALLON_ML = 231 * F("16.387064")  # US liquid gallon: 231 cubic inches


@dataclass(frozen=True)
class Unit:
    key: str  # canonical id, stored in the data set
    factor: F  # size in the family's base unit
    singular: str
    plural: str
    symbols: tuple[str, ...] = ()


def _u(key, factor, singular, plural, *symbols):
    return Unit(key, F(factor), singular, plural, tuple(symbols))


FAMILIES: dict[str, list[Unit]] = {
    "mass": [  # base: gram
        _u("mg", F(1, 1000), "milligram", "milligrams", "mg"),
        _u("g", 1, "gram", "grams", "g"),
        _u("kg", 1000, "kilogram", "kilograms", "kg"),
        _u("t", 1_000_000, "metric ton", "metric tons", "tonnes"),
        _u("oz", F("28.349523125"), "ounce", "ounces", "oz"),
        _u("lb", F("453.59237"), "pound", "pounds", "lb"),
    ],
    "length": [  # base: meter
        _u("mm", F(1, 1000), "millimeter", "millimeters", "mm"),
        _u("cm", F(1, 100), "centimeter", "centimeters", "cm"),
        _u("m", 1, "meter", "meters", "m"),
        _u("km", 1000, "kilometer", "kilometers", "km"),
        _u("in", INCH_M, "inch", "inches"),
        _u("ft", 12 * INCH_M, "foot", "feet", "ft"),
        _u("yd", 36 * INCH_M, "yard", "yards", "yd"),
        _u("mi", 63360 * INCH_M, "mile", "miles", "mi"),
    ],
    "speed": [  # base: meter per second
        _u("m/s", 1, "meter per second", "meters per second", "m/s"),
        _u("km/h", F(1000, 3600), "kilometer per hour", "kilometers per hour", "km/h"),
        _u("mi/h", 63360 * INCH_M / 3600, "mile per hour", "miles per hour", "mi/h", "mph"),
        _u("ft/s", 12 * INCH_M, "foot per second", "feet per second", "ft/s"),
    ],
    "time": [  # base: second
        _u("s", 1, "second", "seconds", "s"),
        _u("min", 60, "minute", "minutes", "min"),
        _u("h", 3600, "hour", "hours", "h"),
        _u("day", 86400, "day", "days"),
        _u("week", 7 * 86400, "week", "weeks"),
        _u("month", YEAR_S / 12, "month", "months"),
        _u("year", YEAR_S, "year", "years"),
        _u("decade", 10 * YEAR_S, "decade", "decades"),
        _u("century", 100 * YEAR_S, "century", "centuries"),
    ],
    "volume": [  # base: milliliter (cubic centimeter)
        _u("gal", GALLON_ML, "gallon", "gallons", "gal"),
        _u("qt", GALLON_ML / 4, "quart", "quarts", "qt"),
        _u("pt", GALLON_ML / 8, "pint", "pints", "pt"),
        _u("cup", GALLON_ML / 16, "cup", "cups"),
        _u("floz", GALLON_ML / 128, "fluid ounce", "fluid ounces", "fl oz"),
        _u("mL", 1, "milliliter", "milliliters", "mL"),
        _u("L", 1000, "liter", "liters", "L"),
        _u("cc", 1, "cc", "cc", "cc"),
        _u("cm3", 1, "cubic centimeter", "cubic centimeters", "cm^3", "cm**3"),
        _u("in3", F("16.387064"), "cubic inch", "cubic inches", "in^3"),
        _u("m3", 1_000_000, "cubic meter", "cubic meters", "m^3"),
    ],
    "data": [  # base: bit; decimal prefixes; "G" and "M" mean GB and MB
        _u("bit", 1, "bit", "bits"),
        _u("B", 8, "byte", "bytes", "B"),
        _u("kB", 8000, "kilobyte", "kilobytes", "kB"),
        _u("MB", 8 * 10**6, "megabyte", "megabytes", "MB", "M"),
        _u("GB", 8 * 10**9, "gigabyte", "gigabytes", "GB", "G"),
    ],
}

# {q}: quantity with its unit; {to}: the target unit (plural name or symbol)
TEMPLATES = (
    "How many {to} are in {q}?",
    "Express {q} as a quantity of {to}.",
    "How do we translate {q} into {to}?",
    "Convert {q} to {to}.",
    "What is {q} in {to}?",
    "{Q} is how many {to}?",
    "How many {to} is {q}?",
    "Could you convert {q} into {to}?",
    "If I have {q}, how many {to} is that?",
    "What does {q} equal in {to}?",
    "Give {q} in {to}.",
    "{Q} equals how many {to}?",
    "Please express {q} in {to}.",
    "Find the number of {to} in {q}.",
)

# answers outside this range are dropped: the grader rounds to 3 decimals, so
# tiny answers cannot be scored, and huge ones only test digit copying
MIN_ANSWER, MAX_ANSWER = F(1, 10), F(10**9)


def _quantity(rng: random.Random) -> F:
    if rng.random() < 0.8:
        return F(rng.randint(1, 10))
    return F(rng.choice(["0.5", "1.5", "2.5", "0.25", "3.2", "4.5", "7.5", "1.2", "0.75", "6.4"]))


def _fmt_quantity(q: F) -> str:
    return str(q.numerator) if q.denominator == 1 else format(float(q), "g")


def _spell(unit: Unit, quantity: F | None, rng: random.Random) -> str:
    if unit.symbols and rng.random() < 0.5:
        return rng.choice(unit.symbols)
    return unit.singular if quantity == 1 else unit.plural


def make_item(rng: random.Random) -> dict | None:
    """One random question with its exact answer, or None when the answer is out of range."""
    family = rng.choice(sorted(FAMILIES))
    src, dst = rng.sample(FAMILIES[family], 2)
    q = _quantity(rng)
    answer = q * src.factor / dst.factor
    if not MIN_ANSWER <= answer <= MAX_ANSWER:
        return None
    q_text = f"{_fmt_quantity(q)} {_spell(src, q, rng)}"
    template = rng.choice(TEMPLATES)
    question = template.format(q=q_text, Q=q_text, to=_spell(dst, None, rng))
    return {
        "question": question,
        "answer": float(answer),
        "family": family,
        "quantity": float(q),
        "from_unit": src.key,
        "to_unit": dst.key,
    }


def distinct(make: Callable[[random.Random], dict | None], n: int, seed: int) -> list[dict]:
    """`n` items with distinct questions from `make`, drawing from a generator seeded with `seed`."""
    rng = random.Random(seed)
    items: list[dict] = []
    seen: set[str] = set()
    while len(items) < n:
        item = make(rng)
        if item is None or item["question"] in seen:
            continue
        seen.add(item["question"])
        items.append(item)
    return items


def generate(n: int = 1280, seed: int = 0) -> list[dict]:
    """`n` distinct questions drawn with `seed`."""
    return distinct(make_item, n, seed)


def dumps(items: list[dict], ensure_ascii: bool = True) -> str:
    """The file text: one item per line, so diffs stay readable."""
    return "[\n" + ",\n".join(json.dumps(item, ensure_ascii=ensure_ascii) for item in items) + "\n]\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1280)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_PATH)
    args = parser.parse_args()
    args.out.write_text(dumps(generate(args.n, args.seed)))
    print(f"wrote {args.n} items to {args.out}")


if __name__ == "__main__":
    main()
