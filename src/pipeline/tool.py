"""The `tool` prompt strategy: the model rewrites a question as `QUANTITY SOURCE -> TARGET`, pint computes.

A 135M model copies units well but gets factors and arithmetic wrong, so it only does the copying
here. Unit spellings of the shipped set (G and M for GB and MB, cc, mi/h, cm^3, centuries, fluid
ounce, metric ton, ...) resolve through a small alias table, anything else through pint's own
parser. A form that does not parse gives no answer (NaN when scored), never an exception.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache

import pint

# spelling -> pint expression; looked up as written first (G is not g, M is not m), then lower-cased
CASE_SENSITIVE = {
    "G": "gigabyte", "GB": "gigabyte", "M": "megabyte", "MB": "megabyte", "kB": "kilobyte", "KB": "kilobyte",
    "B": "byte", "b": "bit", "mL": "milliliter", "ml": "milliliter", "L": "liter", "l": "liter",
    "m": "meter", "g": "gram", "s": "second", "h": "hour",
}  # fmt: skip
ALIASES = {
    # mass
    "mg": "milligram", "milligram": "milligram", "milligrams": "milligram",
    "gram": "gram", "grams": "gram", "gr": "gram",
    "kg": "kilogram", "kilogram": "kilogram", "kilograms": "kilogram", "kilo": "kilogram", "kilos": "kilogram",
    "t": "metric_ton", "metric ton": "metric_ton", "metric tons": "metric_ton", "tonne": "metric_ton",
    "tonnes": "metric_ton", "ton": "metric_ton", "tons": "metric_ton",
    "oz": "ounce", "ounce": "ounce", "ounces": "ounce",
    "lb": "pound", "lbs": "pound", "pound": "pound", "pounds": "pound",
    # length
    "mm": "millimeter", "millimeter": "millimeter", "millimeters": "millimeter",
    "cm": "centimeter", "centimeter": "centimeter", "centimeters": "centimeter",
    "meter": "meter", "meters": "meter", "metre": "meter", "metres": "meter",
    "km": "kilometer", "kilometer": "kilometer", "kilometers": "kilometer",
    "in": "inch", "inch": "inch", "inches": "inch",
    "ft": "foot", "foot": "foot", "feet": "foot",
    "yd": "yard", "yard": "yard", "yards": "yard",
    "mi": "mile", "mile": "mile", "miles": "mile",
    # speed
    "m/s": "meter/second", "meter per second": "meter/second", "meters per second": "meter/second",
    "km/h": "kilometer/hour", "kmh": "kilometer/hour", "kph": "kilometer/hour",
    "kilometer per hour": "kilometer/hour", "kilometers per hour": "kilometer/hour",
    "mi/h": "mile/hour", "mph": "mile/hour", "mile per hour": "mile/hour", "miles per hour": "mile/hour",
    "ft/s": "foot/second", "foot per second": "foot/second", "feet per second": "foot/second",
    # time: a year is 365.242199 days, a month a twelfth of it
    "sec": "second", "second": "second", "seconds": "second",
    "min": "minute", "minute": "minute", "minutes": "minute",
    "hr": "hour", "hrs": "hour", "hour": "hour", "hours": "hour",
    "day": "day", "days": "day", "week": "week", "weeks": "week",
    "month": "dataset_month", "months": "dataset_month",
    "year": "dataset_year", "years": "dataset_year", "yr": "dataset_year",
    "decade": "dataset_decade", "decades": "dataset_decade",
    "century": "dataset_century", "centuries": "dataset_century",
    # US volume
    "gal": "gallon", "gallon": "gallon", "gallons": "gallon",
    "qt": "quart", "quart": "quart", "quarts": "quart",
    "pt": "pint", "pint": "pint", "pints": "pint",
    "cup": "cup", "cups": "cup",
    "fl oz": "fluid_ounce", "floz": "fluid_ounce", "fluid ounce": "fluid_ounce", "fluid ounces": "fluid_ounce",
    "milliliter": "milliliter", "milliliters": "milliliter",
    "liter": "liter", "liters": "liter", "litre": "liter", "litres": "liter",
    "cc": "cubic_centimeter", "cm^3": "cubic_centimeter", "cm**3": "cubic_centimeter", "cm3": "cubic_centimeter",
    "cubic centimeter": "cubic_centimeter", "cubic centimeters": "cubic_centimeter",
    "in^3": "cubic_inch", "in**3": "cubic_inch", "in3": "cubic_inch",
    "cubic inch": "cubic_inch", "cubic inches": "cubic_inch",
    "m^3": "meter**3", "m**3": "meter**3", "m3": "meter**3", "cubic meter": "meter**3", "cubic meters": "meter**3",
    # data: decimal prefixes
    "bit": "bit", "bits": "bit", "byte": "byte", "bytes": "byte",
    "kilobyte": "kilobyte", "kilobytes": "kilobyte", "megabyte": "megabyte", "megabytes": "megabyte",
    "gigabyte": "gigabyte", "gigabytes": "gigabyte",
}  # fmt: skip

FORM_RE = re.compile(
    r"(?P<quantity>[-+]?(?:\d[\d,]*\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*(?P<source>[^\n>]+?)\s*(?:->|→|=>|=|\bto\b|\binto\b|\bin\b)\s*(?P<target>[^\n<]+?)\s*[.?]?\s*$",
    re.MULTILINE,
)


@dataclass(frozen=True)
class Form:
    """A parsed conversion request."""

    quantity: float
    source: str
    target: str

    def __str__(self) -> str:
        return f"{self.quantity:g} {self.source} -> {self.target}"


@lru_cache(maxsize=1)
def registry() -> pint.UnitRegistry:
    """pint with the data set's year (365.242199 days; pint's own year is 365.25) and its month, decade, century."""
    ureg = pint.UnitRegistry()
    ureg.define("dataset_year = 365.242199 * day")
    ureg.define("dataset_month = dataset_year / 12")
    ureg.define("dataset_decade = 10 * dataset_year")
    ureg.define("dataset_century = 100 * dataset_year")
    return ureg


def resolve_unit(spelling: str):
    """A pint quantity of one `spelling` unit, or None when it is unknown."""
    text = re.sub(r"\s+", " ", spelling.strip().strip(".?,:;\"'`")).strip()
    text = re.sub(r"^(?:of|in|into|to)\s+", "", text)
    text = re.sub(r"^[-+]?[\d.,]+(?:[eE][-+]?\d+)?\s+(?=\D)", "", text)  # "1024 MB" -> "MB"
    expression = CASE_SENSITIVE.get(text) or ALIASES.get(text) or ALIASES.get(text.lower())
    ureg = registry()
    try:
        return ureg(expression) if expression else ureg(text.replace(" ", "_"))
    except Exception:  # pint raises many types for text it cannot read
        return None


def parse_form(text: str) -> Form | None:
    """The last `QUANTITY SOURCE -> TARGET` line of a model output, or None."""
    matches = list(FORM_RE.finditer(text.replace("<|im_end|>", "")))
    if not matches:
        return None
    match = matches[-1]
    try:
        quantity = float(match.group("quantity").replace(",", ""))
    except ValueError:
        return None
    return Form(quantity, match.group("source").strip(), match.group("target").strip())


def convert(form: Form) -> float:
    """The converted value, NaN when a unit is unknown or the dimensions differ."""
    source, target = resolve_unit(form.source), resolve_unit(form.target)
    if source is None or target is None:
        return math.nan
    try:
        value = form.quantity * (source / target).to("dimensionless").magnitude
    except Exception:  # DimensionalityError and friends
        return math.nan
    return float(value) if math.isfinite(value) else math.nan


# spellings never looked for in question text: English words ("in") or letters that are not units there
NOT_MENTIONS = {"in", "b", "l", "t", "gr", "kilo", "kilos", "ton", "tons"}


@lru_cache(maxsize=1)
def _mention_re() -> re.Pattern:
    spellings = [k for k in [*CASE_SENSITIVE, *ALIASES] if k not in NOT_MENTIONS]
    alternation = "|".join(re.escape(k) for k in sorted(set(spellings), key=len, reverse=True))
    return re.compile(rf"(?<![\w/^*])({alternation})(?![\w/^*])")


def _unit_key(spelling: str) -> str | None:
    unit = resolve_unit(spelling)
    return None if unit is None else f"{unit.to_base_units().magnitude:.12g} {unit.to_base_units().units}"


def mentioned_units(question: str) -> list[str]:
    """The unit spellings a question mentions, in order, one per distinct unit (longest spelling wins)."""
    found, keys = [], set()
    for match in _mention_re().finditer(question):
        key = _unit_key(match.group(1))
        if key and key not in keys:
            keys.add(key)
            found.append(match.group(1))
    return found


def ground(form: Form, question: str) -> Form:
    """Repair a form whose unit the question never mentions, when the question names exactly two units.

    The small model sometimes writes a unit from its examples ("liters") instead of the one asked
    for ("cubic inches"); the unit it did copy fixes which side the other mention belongs to.
    """
    mentions = mentioned_units(question)
    if len(mentions) != 2:
        return form
    keys = [_unit_key(m) for m in mentions]
    source_key, target_key = _unit_key(form.source), _unit_key(form.target)
    source_ok, target_ok = source_key in keys, target_key in keys
    if source_ok and source_key == target_key:  # "2 weeks -> weeks": the target is the other unit
        return Form(form.quantity, form.source, mentions[1 - keys.index(source_key)])
    if source_ok and not target_ok:
        other = mentions[1 - keys.index(_unit_key(form.source))]
        return Form(form.quantity, form.source, other)
    if target_ok and not source_ok:
        other = mentions[1 - keys.index(_unit_key(form.target))]
        return Form(form.quantity, other, form.target)
    return form


def solve(output: str, question: str = "") -> tuple[str, str]:
    """The model's output with `<answer>VALUE</answer>` appended, and the parsed form ('' when none).

    With the question given, a form naming a unit the question does not mention is grounded first.
    """
    form = parse_form(output)
    if form is None:
        return output, ""
    if question:
        form = ground(form, question)
    value = convert(form)
    if math.isnan(value):
        return output, str(form)
    return f"{output}\n<answer>{value:.10g}</answer>", str(form)
