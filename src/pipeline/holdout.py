"""The independent evaluation set, `dataset=unit_conversion_holdout`: `python -m pipeline.holdout`.

Written apart from the shipped set and the tool prompt, to measure what holds on questions they were
not written against: other phrasings (units before the number, `per`, questions holding a second
number, imperative and question forms), other spellings (British, abbreviations with and without dots,
singular and plural mixed, powers as `^`, `²`, `cubic`/`square`/`sq`), and an area family. Answers are
computed exactly with fractions from each unit's size and kept where the grader's rounding to 3
decimals can score them (0.1 and up). The test regenerates the file byte for byte and checks every
answer with pint.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from fractions import Fraction as F
from pathlib import Path

from pipeline import datagen

HOLDOUT_PATH = Path(__file__).parent / "data" / "unit_conversion_holdout.json"

# exact sizes: the international inch and pound, the US liquid gallon, the data sets' year
INCH = F("0.0254")
FOOT, YARD, MILE = 12 * INCH, 36 * INCH, 63360 * INCH
POUND = F("453.59237")
GALLON_ML = 231 * F("16.387064")
YEAR_S = F("365.242199") * 86400
# pint's acre is the US survey acre (43,560 survey feet of 1200/3937 m), 4 ppm above the international one
SURVEY_ACRE = 43560 * F(1200, 3937) ** 2
MIN_ANSWER, MAX_ANSWER = F(1, 10), F(10**9)


@dataclass(frozen=True)
class Unit:
    key: str  # id stored with each item
    size: F  # in the family's base unit
    words: tuple[str, ...]  # written-out spellings, singular and plural, US and British
    symbols: tuple[str, ...] = ()  # abbreviations, with and without dots, powers


def _u(key: str, size, words: str, symbols: str = "") -> Unit:
    return Unit(key, F(size), tuple(words.split("|")), tuple(s for s in symbols.split("|") if s))


FAMILIES: dict[str, list[Unit]] = {
    "mass": [  # base: gram
        _u("mg", F(1, 1000), "milligram|milligrams|milligramme|milligrammes", "mg"),
        _u("g", 1, "gram|grams|gramme|grammes", "g"),
        _u("kg", 1000, "kilogram|kilograms|kilogramme|kilogrammes|kilos", "kg"),
        _u("t", 10**6, "tonne|tonnes|metric ton|metric tons", "t"),
        _u("oz", POUND / 16, "ounce|ounces", "oz|oz."),
        _u("lb", POUND, "pound|pounds", "lb|lb.|lbs|lbs."),
        _u("st", 14 * POUND, "stone|stones"),
    ],
    "length": [  # base: metre
        _u("mm", F(1, 1000), "millimetre|millimetres|millimeter|millimeters", "mm"),
        _u("cm", F(1, 100), "centimetre|centimetres|centimeter|centimeters", "cm"),
        _u("m", 1, "metre|metres|meter|meters", "m"),
        _u("km", 1000, "kilometre|kilometres|kilometer|kilometers", "km"),
        _u("in", INCH, "inch|inches"),
        _u("ft", FOOT, "foot|feet", "ft|ft."),
        _u("yd", YARD, "yard|yards", "yd|yd.|yds"),
        _u("mi", MILE, "mile|miles", "mi|mi."),
        _u("nmi", 1852, "nautical mile|nautical miles", "nmi"),
    ],
    "speed": [  # base: metre per second
        _u("m/s", 1, "metre per second|metres per second|meters per second", "m/s"),
        _u("km/h", F(1000, 3600), "kilometre per hour|kilometres per hour|kilometers an hour", "km/h|kph"),
        _u("mph", MILE / 3600, "mile per hour|miles per hour|miles an hour", "mph|mi/h"),
        _u("ft/s", FOOT, "foot per second|feet per second", "ft/s"),
        _u("kn", F(1852, 3600), "knot|knots"),
    ],
    "time": [  # base: second
        _u("ms", F(1, 1000), "millisecond|milliseconds", "ms"),
        _u("s", 1, "second|seconds", "s|sec|secs"),
        _u("min", 60, "minute|minutes", "min|mins"),
        _u("h", 3600, "hour|hours", "h|hr|hrs"),
        _u("day", 86400, "day|days"),
        _u("week", 7 * 86400, "week|weeks"),
        _u("fortnight", 14 * 86400, "fortnight|fortnights"),
        _u("month", YEAR_S / 12, "month|months"),
        _u("year", YEAR_S, "year|years", "yr|yrs"),
        _u("decade", 10 * YEAR_S, "decade|decades"),
        _u("century", 100 * YEAR_S, "century|centuries"),
    ],
    "volume": [  # base: millilitre
        _u("mL", 1, "millilitre|millilitres|milliliter|milliliters", "mL|ml"),
        _u("L", 1000, "litre|litres|liter|liters", "L"),
        _u("cc", 1, "cubic centimetre|cubic centimetres", "cc|cm^3|cm3|cm³"),
        _u("gal", GALLON_ML, "gallon|gallons", "gal|gal."),
        _u("qt", GALLON_ML / 4, "quart|quarts", "qt"),
        _u("pt", GALLON_ML / 8, "pint|pints", "pt"),
        _u("cup", GALLON_ML / 16, "cup|cups"),
        _u("floz", GALLON_ML / 128, "fluid ounce|fluid ounces", "fl oz|fl. oz."),
        _u("tbsp", GALLON_ML / 256, "tablespoon|tablespoons", "tbsp"),
        _u("tsp", GALLON_ML / 768, "teaspoon|teaspoons", "tsp"),
        _u("in3", F("16.387064"), "cubic inch|cubic inches", "in^3|in³|cu in"),
        _u("ft3", 1728 * F("16.387064"), "cubic foot|cubic feet", "ft^3|cu ft"),
        _u("m3", 10**6, "cubic metre|cubic metres|cubic meters", "m^3|m³|m**3"),
    ],
    "area": [  # base: square metre
        _u("cm2", F(1, 10**4), "square centimetre|square centimetres|square centimeters", "cm^2|cm²|sq cm"),
        _u("m2", 1, "square metre|square metres|square meter|square meters", "m^2|m²|sq m"),
        _u("km2", 10**6, "square kilometre|square kilometres", "km^2|km²|sq km"),
        _u("ha", 10**4, "hectare|hectares", "ha"),
        _u("acre", SURVEY_ACRE, "acre|acres"),
        _u("in2", INCH**2, "square inch|square inches", "in^2|sq in"),
        _u("ft2", FOOT**2, "square foot|square feet", "ft^2|ft²|sq ft|sq. ft."),
        _u("yd2", YARD**2, "square yard|square yards", "yd^2|sq yd"),
        _u("mi2", MILE**2, "square mile|square miles", "mi^2|sq mi"),
    ],
    "data": [  # base: bit; decimal kilo, mega, giga, tera and binary kibi, mebi, gibi
        _u("bit", 1, "bit|bits"),
        _u("kbit", 1000, "kilobit|kilobits", "kbit|kb"),
        _u("Mbit", 10**6, "megabit|megabits", "Mbit|Mb"),
        _u("B", 8, "byte|bytes", "B"),
        _u("kB", 8000, "kilobyte|kilobytes", "kB|KB"),
        _u("MB", 8 * 10**6, "megabyte|megabytes", "MB"),
        _u("GB", 8 * 10**9, "gigabyte|gigabytes", "GB"),
        _u("TB", 8 * 10**12, "terabyte|terabytes", "TB"),
        _u("KiB", 8 * 2**10, "kibibyte|kibibytes", "KiB"),
        _u("MiB", 8 * 2**20, "mebibyte|mebibytes", "MiB"),
        _u("GiB", 8 * 2**30, "gibibyte|gibibytes", "GiB"),
    ],
}

# {q}: the quantity; {src}, {tgt}: the units as spelled; {k}: a second, unrelated number (two-number forms)
TEMPLATES: dict[str, str] = {
    # questions
    "what_is_in": "What is {q} {src} in {tgt}?",
    "how_many_make": "How many {tgt} does {q} {src} make?",
    "equals_how_many": "{q} {src} equals how many {tgt}?",
    "equivalent_of": "What's the equivalent of {q} {src} in {tgt}?",
    "i_have": "I have {q} {src}. How much is that in {tgt}?",
    # imperatives
    "express_in": "Express {q} {src} in {tgt}.",
    "please_change": "Please change {q} {src} to {tgt}.",
    "turn_into": "Turn {q} {src} into {tgt}.",
    "restate_using": "Restate {q} {src} using {tgt}.",
    # units before the number
    "from_to_for_units": "Convert from {src} to {tgt} for {q} units.",
    "pair_colon": "{src} to {tgt}: {q}",
    "in_tgt_how_much": "In {tgt}, how much is {q} {src}?",
    "how_many_per": "How many {tgt} per {q} {src}?",
    # a second number in the question
    "exercise_number": "Exercise {k}: convert {q} {src} to {tgt}.",
    "in_year": "In {year} a reading of {q} {src} was logged. What is it in {tgt}?",
    "list_of_values": "Of the {k} values on my list, the first is {q} {src}. Give it in {tgt}.",
}


def _spell(unit: Unit, rng: random.Random) -> str:
    """One spelling of `unit`: written out (singular or plural, either side of the Atlantic) or abbreviated."""
    if unit.symbols and rng.random() < 0.4:
        return rng.choice(unit.symbols)
    return rng.choice(unit.words)


def _quantity(rng: random.Random) -> F:
    """A quantity as people write them: small integers, one or two decimals, and some in the thousands."""
    kind = rng.random()
    if kind < 0.45:
        return F(rng.randint(1, 99))
    if kind < 0.75:
        return F(rng.randint(1, 999), 10)
    if kind < 0.9:
        return F(rng.randint(1, 9999), 100)
    return F(rng.randint(1000, 99999))


def _write(q: F, rng: random.Random) -> str:
    """A quantity as written in a question: 12, 0.75, 3.5, 12500 or 12,500."""
    if q.denominator == 1:
        return f"{q.numerator:,}" if q >= 1000 and rng.random() < 0.5 else str(q.numerator)
    decimals = 1 if (q * 10).denominator == 1 else 2
    return f"{float(q):.{decimals}f}"


def make_item(rng: random.Random) -> dict | None:
    """One question, or None when its answer falls outside what the grader can score."""
    family = rng.choice(sorted(FAMILIES))
    source, target = rng.sample(FAMILIES[family], 2)
    quantity = _quantity(rng)
    answer = quantity * source.size / target.size
    if not MIN_ANSWER <= answer <= MAX_ANSWER:
        return None
    template = rng.choice(sorted(TEMPLATES))
    k = rng.randint(2, 20)
    written = _write(quantity, rng)
    if str(k) == written:
        k += 1
    question = TEMPLATES[template].format(
        q=written, src=_spell(source, rng), tgt=_spell(target, rng), k=k, year=rng.randint(1990, 2024)
    )
    return {
        "question": question,
        "answer": float(answer),
        "family": family,
        "template": template,
        "from_unit": source.key,
        "to_unit": target.key,
        "quantity": float(quantity),
    }


def generate(n: int = 1024, seed: int = 0) -> list[dict]:
    """`n` distinct questions from a seeded generator (the same seed gives the same file)."""
    return datagen.distinct(make_item, n, seed)


def dumps(items: list[dict]) -> str:
    """The file's exact text: one item per line (non-ASCII spellings such as "cm³" kept as written)."""
    return datagen.dumps(items, ensure_ascii=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HOLDOUT_PATH)
    args = parser.parse_args()
    args.out.write_text(dumps(generate(args.n, args.seed)), encoding="utf-8")
    print(f"wrote {args.n} questions to {args.out}")


if __name__ == "__main__":
    main()
