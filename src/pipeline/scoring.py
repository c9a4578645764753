"""Parsing the number inside <answer>...</answer> and scoring it the original grader's way."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
NUMBER_RE = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
# "6 x 10^3", "6×10^3", "6 * 10**3"
TIMES_TEN_RE = re.compile(r"^([-+]?(?:\d+\.?\d*|\.\d+))(?:x|×|\*)10(?:\^|\*\*)([-+]?\d+)")


def parse_number(text: str) -> float:
    """The first number in `text`, tolerating spaces, thousands separators and scientific notation; NaN if none."""
    cleaned = re.sub(r"(?<=\d)[,_\s'](?=\d)", "", text.strip())
    cleaned = cleaned.replace(" ", "")
    match = TIMES_TEN_RE.match(cleaned)
    if match:
        try:
            return float(match.group(1)) * 10.0 ** int(match.group(2))
        except OverflowError:
            return math.nan
    match = NUMBER_RE.search(cleaned)
    if not match:
        return math.nan
    value = float(match.group(0))
    return value if math.isfinite(value) else math.nan


def parse_answer(output: str) -> float:
    """The number inside the first <answer>...</answer> of a model output; NaN when there is none."""
    match = ANSWER_RE.search(output)
    return parse_number(match.group(1)) if match else math.nan


def is_correct(predicted: float, expected: float, tolerance: float = 0.05) -> bool:
    """The original grader's rule: |round(a,3) - round(c,3)| < tolerance * |round(c,3)|."""
    if math.isnan(predicted):
        return False
    a, c = round(predicted, 3), round(expected, 3)
    return abs(a - c) < tolerance * abs(c)


@dataclass(frozen=True)
class Score:
    accuracy: float
    answer_rate: float
    num_correct: int
    num_answered: int
    num_items: int


def score(predicted: list[float], expected: list[float], tolerance: float = 0.05) -> Score:
    """Accuracy and answer rate (share of parsable answers) of a list of predictions."""
    n = len(expected)
    correct = sum(is_correct(p, e, tolerance) for p, e in zip(predicted, expected))
    answered = sum(not math.isnan(p) for p in predicted)
    return Score(correct / n if n else 0.0, answered / n if n else 0.0, correct, answered, n)
