"""Solving the tool form: parse the model's `QUANTITY SOURCE -> TARGET`, check it against the question,
convert with pint.

The check accepts a form only where the question could have asked it: its quantity is one of the
question's, its SOURCE is the unit the question writes with that quantity (or, where the question writes
its units apart from the number, one of them), and its TARGET a unit the question mentions without a
number. Anything else gives no answer (NaN when scored), never a guess, and the failure class says why.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from pipeline.reader import leading_number, read
from pipeline.units import registry, resolve_unit, unit_key


@dataclass(frozen=True)
class Form:
    """A parsed conversion request."""

    quantity: float
    source: str
    target: str

    def __str__(self) -> str:
        return f"{self.quantity:g} {self.source} -> {self.target}"


_ARROW_SPLIT = re.compile(r"\s*(?P<source>[^\n>]+?)\s*(?:->|→|=>)\s*(?P<target>[^\n<]+?)\s*[?]?\s*")
_WORD_SPLIT = re.compile(r"\s*(?P<source>[^\n>]+?)\s*(?:=|\bto\b|\binto\b|\bin\b)\s*(?P<target>[^\n<]+?)\s*[.?]?\s*")


def parse_form(text: str) -> Form | None:
    """The last `QUANTITY SOURCE -> TARGET` line of a model output (an arrow first, then `to`/`in`/`=`), or None.

    QUANTITY is any number the question reader knows (2.5, 1,500, 3/4, 2 1/4, 4e3, seven)."""
    lines = [line.strip() for line in text.replace("<|im_end|>", "\n").splitlines()]
    for split in (_ARROW_SPLIT, _WORD_SPLIT):
        for line in reversed(lines):
            form = _parse_line(line, split)
            if form is not None:
                return form
    return None


_STARTS = re.compile(r"(?<![\w.,])(?:[-+−]?[\d.¼½¾⅓⅔⅛⅜⅝⅞]|[A-Za-z])")


def _parse_line(line: str, split: re.Pattern) -> Form | None:
    """The form in one line: the first place where a number starts and the rest splits into two units."""
    for start in _STARTS.finditer(line):
        number = leading_number(line[start.start() :])
        if number is None:
            continue
        value, end = number
        match = split.fullmatch(line[start.start() + end :])
        if match is None:
            continue
        target = match.group("target").strip()
        if target.endswith(".") and unit_key(target[:-1].rstrip()) in (None, unit_key(target)):
            target = target[:-1].rstrip()  # a full stop; "lb." reads as "lb" either way
        return Form(value, match.group("source").strip(), target)
    return None


def convert(form: Form) -> float:
    """The converted value (temperatures with their offsets), NaN when a unit is unknown or the dimensions differ."""
    source, target = resolve_unit(form.source), resolve_unit(form.target)
    if source is None or target is None:
        return math.nan
    try:
        value = registry().Quantity(form.quantity, source.units).to(target.units).magnitude
    except Exception:  # DimensionalityError, offset units in a ratio, and friends
        return math.nan
    value = float(value)
    return value if math.isfinite(value) else math.nan


# why an answer would be wrong, or why there is none; the last one holds when nothing earlier does
FAILURES = (
    "no_form", "ambiguous_quantity", "unknown_unit", "quantity_not_in_question", "source_not_quantity_unit",
    "target_not_asked", "wrong_conversion",
)  # fmt: skip


def check(form: Form, question: str) -> str:
    """'' when `form` is one the question could ask, else the failure class that says why not."""
    reading = read(question)
    if reading.ambiguous:
        return "ambiguous_quantity"
    written = {m.written: unit_key(m.spelling) for m in reading.mentions if m.written}  # MG in a question in capitals
    source_key = written.get(form.source) or unit_key(form.source)
    target_key = written.get(form.target) or unit_key(form.target)
    keys = {unit_key(m.spelling) for m in reading.mentions}
    if source_key is None or target_key is None or source_key not in keys or target_key not in keys:
        return "unknown_unit"  # a unit pint cannot read, or one the question never names
    matching = [q for q in reading.quantities if math.isclose(q.value, form.quantity, rel_tol=1e-6, abs_tol=1e-12)]
    if not matching:
        return "quantity_not_in_question"
    free = {unit_key(m.spelling) for m in reading.free}
    for quantity in matching:
        if quantity.unit is not None:
            if source_key != unit_key(quantity.unit.spelling):
                continue
            if target_key in free:
                return ""
        elif source_key in free and target_key in free and source_key != target_key:
            first = _from_to(reading, question)  # "from acres to square yards for 87 units": acres is the source
            if first is None or first == source_key:
                return ""  # the question writes its units apart from the number: the model says which is which
            return "source_not_quantity_unit"
    if any(q.unit is not None and unit_key(q.unit.spelling) == source_key for q in matching):
        return "target_not_asked"
    return "source_not_quantity_unit"


_TO = re.compile(r"\s+(?:to|into|in|->)\s+", re.IGNORECASE)


def _from_to(reading, question: str) -> str | None:
    """The source's key where a question writes its two units as "X to Y" apart from the number, else None."""
    if len(reading.free) != 2:
        return None
    first, second = reading.free
    if _TO.fullmatch(question[first.end : second.start]):
        return unit_key(first.spelling)
    return None


def solve(output: str, question: str = "") -> tuple[str, str, str]:
    """The model's output with `<answer>VALUE</answer>` appended, the parsed form ('' when none), and the
    failure class that explains the answer should it be wrong or missing (one of `FAILURES`).

    With the question given, only a form the question could ask (`check`) is answered; a question whose
    quantity is ambiguous gets no answer. Without it, any form pint can compute is.
    """
    form = parse_form(output)
    if form is None:
        return output, "", "no_form"
    if question:
        failure = check(form, question)
        if failure:
            return output, str(form), failure
    value = convert(form)
    if math.isnan(value):
        known = resolve_unit(form.source) is not None and resolve_unit(form.target) is not None
        return output, str(form), "wrong_conversion" if known else "unknown_unit"
    return f"{output}\n<answer>{value:.10g}</answer>", str(form), "wrong_conversion"
