"""Reading a question: its numbers, its unit mentions, and from them the quantities it may ask about.

Numbers as users write them: decimals glued to units (2.5kg), thousands separators (2,000; 45 000;
1.234.567), decimal commas where unambiguous (1,5; 0,330; 1.250,5), fractions and mixed numbers (3/4,
2 1/4, ¾, 2½), scientific notation (4e3, 2 × 10^6, 10⁶), leading-dot decimals (.25), number words
(seven, twenty-five, one hundred and twenty, a dozen, two and a half, half a, "a pound"), signs with the
Unicode minus. A number written right before a unit is a quantity with that unit; quantities in
descending units of one dimension are summed ("6 ft 2 in", "1 hour and 20 minutes"). What cannot be
read one way only (a range "2-3 kg", "5 or 6 feet", "a few pounds", "1,2,5") makes the question
ambiguous: it gets no quantity, so no number is pinned and no answer given.

Measured before writing this (issue 18, the phrasing set in data/phrasings.json, 75 readable questions):
quantulum3 0.10.0 read 43 right and 19 wrong (decimal commas as integers, "G" as gauss, ranges
averaged: "2-3 kg" is 2.5 kg to it), text2num 3.1.0 read 4 of the 9 number-word phrasings ("a
dozen", "half a", "two and a half", "a pound" not), and pint's parser cannot find a quantity in
prose (on the quantity alone, 31 right; "2 1/2" is 1 to it). Neither is used: a wrong reading is worse
than none, and the grammar below is what they lack.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache

from pipeline.units import Mention, find_mentions, is_offset, resolve_unit

VULGAR = {"¼": 0.25, "½": 0.5, "¾": 0.75, "⅓": 1 / 3, "⅔": 2 / 3, "⅕": 0.2, "⅖": 0.4, "⅗": 0.6, "⅘": 0.8,
          "⅙": 1 / 6, "⅚": 5 / 6, "⅛": 0.125, "⅜": 0.375, "⅝": 0.625, "⅞": 0.875}  # fmt: skip
_VULGAR = "".join(VULGAR)
SUPERSCRIPT_DIGITS = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹⁻", "0123456789-")
MINUS = "−–"  # the Unicode minus and the en dash, as signs

_MANTISSA = r"(?:\d+(?:\.\d+)?|\.\d+)"
_NUMBER_RE = re.compile(
    rf"(?<![\w.,/^*])(?P<sign>[-+{MINUS}](?=[\d.{_VULGAR}]))?"
    r"(?:"
    rf"(?P<times>{_MANTISSA}\s*[x×*·]\s*10\s*(?:\^|\*\*)\s*[-+{MINUS}]?\d+|{_MANTISSA}\s*[x×·]\s*10[⁰¹²³⁴⁵⁶⁷⁸⁹⁻]+)"
    rf"|(?P<power>10\s*(?:\^|\*\*)\s*[-+{MINUS}]?\d+|10[⁰¹²³⁴⁵⁶⁷⁸⁹⁻]+)"
    rf"|(?P<sci>{_MANTISSA}[eE][-+{MINUS}]?\d+)(?![\w])"
    rf"|(?P<mixed>\d+(?:\s+|-)\d+/\d+(?![\d/])|\d+\s?[{_VULGAR}])"
    rf"|(?P<fraction>\d+/\d+(?![\d/])|[{_VULGAR}])"
    r"|(?P<european>[1-9]\d{0,2}(?:\.\d{3})+,\d+(?![\d,.])|[1-9]\d{0,2}(?:\.\d{3}){2,}(?![\d,.]))"
    r"|(?P<thousands>[1-9]\d{0,2}(?:,\d{3})+(?:\.\d+)?(?![\d,]))"
    r"|(?P<spaced>[1-9]\d{0,2}(?:[ \u00a0\u202f]\d{3})+(?![\d/,.]))"
    r"|(?P<comma>\d+,\d+(?![\d,]))"
    r"|(?P<malformed>\d+(?:[.,]\d+){2,}|\d+/\d+(?:/\d+)+)"
    r"|(?P<decimal>\d+\.\d+|\.\d+|\d+)"
    r")"
)

ONES = {word: n for n, word in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen".split())}  # fmt: skip
TENS = {word: 10 * n for n, word in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), 2)}
SCALES = {"hundred": 100, "thousand": 1000, "million": 1e6, "billion": 1e9}
FRACTION_WORDS = {"half": 0.5, "quarter": 0.25, "third": 1 / 3, "halves": 0.5, "quarters": 0.25, "thirds": 1 / 3}
VAGUE = {"few", "several", "some", "couple", "dozens", "hundreds", "thousands", "lots", "numerous", "various",
         "multiple", "bunch"}  # fmt: skip
_WORD_RE = re.compile(r"[A-Za-z]+(?:-[A-Za-z]+)*")
# between two numbers, these make a range or a choice rather than one quantity
_RANGE_GAP = re.compile(r"\s*(?:-|–|—|to|or|and|through|until|or maybe)\s*$", re.IGNORECASE)
_COMPOUND_GAP = re.compile(r"\s*(?:,\s*|&\s*|and\s+|,\s*and\s+|plus\s+)?$", re.IGNORECASE)
_UNIT_GAP = re.compile(r"\s*-?\s*")  # 2.5kg, 7 kg, a 5-kg bag
_UNIT_GAP_OF = re.compile(r"\s+of\s+(?:an?\s+)?", re.IGNORECASE)  # 3/4 of an hour, a quarter of an hour


@dataclass(frozen=True)
class Number:
    """A number written in a question: its value (None when it cannot be read one way only) and where."""

    value: float | None
    start: int
    end: int
    kind: str  # which notation: decimal, thousands, fraction, words, ...


@dataclass(frozen=True)
class Quantity:
    """A quantity a question may ask about: a value with the unit written right after it (None when the
    question writes its units elsewhere: "from kg to lb for 6 units"), summed over compound parts."""

    value: float
    unit: Mention | None
    start: int
    end: int
    parts: int = 1
    written: str = ""  # the number as the question writes it ("5/8", "2,5", "seven"); "" for a compound


@dataclass(frozen=True)
class Reading:
    """What a question says: its quantities, its unit mentions, and which of them no quantity holds."""

    quantities: tuple[Quantity, ...]
    mentions: tuple[Mention, ...]
    free: tuple[Mention, ...]  # mentions not written with a number: the target, or both units
    ambiguous: str = ""  # why no quantity can be read one way only ("" when one can)


def _digits_value(kind: str, text: str) -> float | None:
    text = text.replace("\u00a0", " ").replace("\u202f", " ")
    if kind == "malformed":
        return None
    if kind == "decimal":
        return float(text)
    if kind == "thousands":
        return float(text.replace(",", ""))
    if kind == "spaced":
        return float(text.replace(" ", ""))
    if kind == "european":
        return float(text.replace(".", "").replace(",", "."))
    if kind == "comma":  # one comma: before 1-2 digits, or after a lone 0, a decimal comma (2,5; 1000,25; 0,330)
        whole, _, fraction = text.partition(",")
        if whole == "0" or len(fraction) <= 2:
            return float(f"{whole}.{fraction}")
        return None  # 1000,500 or 12,3456: neither a thousands group nor a usual decimal comma
    if kind == "sci":
        return float(text.translate(str.maketrans(MINUS, "--")))
    if kind in ("times", "power"):
        text = text.translate(SUPERSCRIPT_DIGITS).translate(str.maketrans(MINUS, "--"))
        match = re.fullmatch(r"(?:(.+?)\s*[x×*·]\s*)?10\s*(?:\^|\*\*)?\s*(-?\d+)", text)
        if not match:
            return None
        mantissa = float(match.group(1)) if match.group(1) else 1.0
        return mantissa * 10.0 ** int(match.group(2))
    if kind == "fraction":
        if text in VULGAR:
            return VULGAR[text]
        numerator, denominator = text.split("/")
        return int(numerator) / int(denominator) if int(denominator) else None
    if kind == "mixed":
        if text[-1] in VULGAR:
            return int(text[:-1].strip()) + VULGAR[text[-1]]
        whole, fraction = re.split(r"\s+|-", text, maxsplit=1)
        numerator, denominator = fraction.split("/")
        if not int(denominator) or int(numerator) >= int(denominator):
            return None  # "2 5/4", "3 1/0": not a mixed number
        return int(whole) + int(numerator) / int(denominator)
    return None


def digit_numbers(text: str) -> list[Number]:
    """The numbers written with digits (and vulgar fractions) in `text`, left to right."""
    found = []
    for match in _NUMBER_RE.finditer(text):
        kind = next(k for k in ("times", "power", "sci", "mixed", "fraction", "european", "thousands", "spaced",
                                "comma", "malformed", "decimal") if match.group(k))  # fmt: skip
        value = _digits_value(kind, match.group(kind))
        if value is not None and match.group("sign") and match.group("sign") not in "+":
            value = -value
        found.append(Number(value, match.start(), match.end(), kind))
    return found


def _cardinal(words: list[str]) -> tuple[float, int] | None:
    """The value of the longest run of cardinal words at the start of `words` and how many it took."""
    total, current, used, last = 0.0, 0.0, 0, None
    for i, word in enumerate(words):
        parts = word.split("-")
        if word == "and" and last is not None and i + 1 < len(words) and words[i + 1] in ONES | TENS:
            continue  # one hundred and twenty
        if all(p in ONES or p in TENS for p in parts) and len(parts) <= 2:
            if last in ("ones", "tens") and not (last == "tens" and parts[0] in ONES and len(parts) == 1):
                break  # "seven eight": two numbers, not one
            current += sum(ONES.get(p, 0) + TENS.get(p, 0) for p in parts)
            last = "tens" if parts[-1] in TENS else "ones"
        elif word in SCALES and last is not None:
            if word == "hundred":
                current = (current or 1) * 100
            else:
                total, current = total + (current or 1) * SCALES[word], 0.0
            last = "scale"
        else:
            break
        used = i + 1
    return (total + current, used) if used else None


def word_numbers(text: str, unit_starts: set[int]) -> list[Number]:
    """Numbers written in words: cardinals, "a dozen", "and a half", "half a", and "a"/"an" right before a
    unit (`unit_starts`: where the question's unit mentions start). Vague counts ("a few", "several")
    before a unit are numbers without a value."""
    matches = list(_WORD_RE.finditer(text))
    words = [m.group().lower() for m in matches]
    found, i = [], 0
    while i < len(matches):
        start, word = matches[i].start(), words[i]
        following = matches[i + 1].start() if i + 1 < len(matches) else None
        if word in VAGUE or (word == "a" and i + 1 < len(words) and words[i + 1] in VAGUE):
            j = i + (2 if word == "a" else 1)
            j += j < len(words) and words[j] == "of"
            if j < len(matches) and matches[j].start() in unit_starts:
                found.append(Number(None, start, matches[j - 1].end(), "words"))
            i = j
            continue
        if word == "half" and i + 1 < len(words) and words[i + 1] in ("a", "an"):
            found.append(Number(0.5, start, matches[i + 1].end(), "words"))  # half a mile
            i += 2
            continue
        if word in ("a", "an") and following in unit_starts:
            found.append(Number(1.0, start, matches[i].end(), "words"))  # a pound, an hour
            i += 1
            continue
        cardinal = _cardinal(words[i:])
        if word in ("a", "an") and i + 1 < len(words) and words[i + 1] in SCALES:
            cardinal = _cardinal(["one", *words[i + 1 :]])  # a hundred, a thousand
        if word in ("a", "an", "one") and i + 1 < len(words) and words[i + 1] in ("dozen", "quarter", "third"):
            cardinal = (1.0, 1)  # a dozen, a quarter of an hour
        if cardinal is None:
            i += 1
            continue
        value, used = cardinal
        end = matches[i + used - 1].end()
        rest = words[i + used : i + used + 4]
        if rest[:1] == ["dozen"]:
            value, end, used = value * 12, matches[i + used].end(), used + 1
        elif rest[:1] and rest[0] in FRACTION_WORDS and word != "a":  # three quarters (of a pound)
            value, end, used = value * FRACTION_WORDS[rest[0]], matches[i + used].end(), used + 1
        elif rest[:1] and rest[0] in FRACTION_WORDS:  # a quarter (of an hour)
            value, end, used = FRACTION_WORDS[rest[0]], matches[i + used].end(), used + 1
        elif rest[:3] in (["and", "a", "half"], ["and", "a", "quarter"], ["and", "a", "third"]):
            value, end, used = value + FRACTION_WORDS[rest[2]], matches[i + used + 2].end(), used + 3
        elif rest[:3] == ["and", "three", "quarters"]:
            value, end, used = value + 0.75, matches[i + used + 2].end(), used + 3
        if words[i] in ("a", "an") and value == 1.0 and used == 1:
            i += 1  # "a" alone, not before a unit: an article
            continue
        found.append(Number(value, start, end, "words"))
        i += used
    return found


def _mask(text: str, numbers: list[Number]) -> str:
    """`text` with its digit numbers masked (same length), so that 5e4 or 1.2x10^3 read as no unit and
    "kg per 47,930 t" stays two units."""
    chars = list(text)
    for number in numbers:
        chars[number.start : number.end] = "#" * (number.end - number.start)
    return "".join(chars)


def _unit_after(number: Number, text: str, mentions: list[Mention]) -> Mention | None:
    """The unit written right after `number` ("of a" too after a fraction or a number word), or None."""
    for mention in mentions:
        if mention.start < number.end:
            continue
        gap = text[number.end : mention.start]
        if _UNIT_GAP.fullmatch(gap) and not (number.kind == "words" and number.value == 1.0 and "-" in gap):
            return mention
        if number.kind in ("fraction", "mixed", "words") and _UNIT_GAP_OF.fullmatch(gap):
            return mention
        return None
    return None


def _factor(smaller: Mention, larger: Mention) -> float | None:
    """How many `smaller` units one `larger` unit holds, where both measure the same thing (None otherwise)."""
    if is_offset(smaller.spelling) or is_offset(larger.spelling):
        return None
    a, b = resolve_unit(larger.spelling), resolve_unit(smaller.spelling)
    try:
        ratio = (a / b).to("dimensionless").magnitude
    except Exception:
        return None
    return float(ratio)


@lru_cache(maxsize=4096)
def read(question: str) -> Reading:
    """The quantities, unit mentions and free mentions of `question`, and why it is ambiguous if it is."""
    digits = digit_numbers(question)
    masked = _mask(question, digits)
    mentions = find_mentions(masked, tuple(n.end for n in digits))
    starts = {m.start for m in mentions}
    inside = [(m.start, m.end) for m in mentions]
    words = [
        n
        for n in word_numbers(masked, starts)
        if not any(s <= n.start < e for s, e in inside) and not any(d.start <= n.start < d.end for d in digits)
    ]
    numbers = sorted(digits + words, key=lambda n: n.start)
    units = {id(n): _unit_after(n, question, mentions) for n in numbers}
    gaps = [(n.end, units[id(n)].start) for n in numbers if units[id(n)] is not None]
    numbers = [n for n in numbers if not any(s <= n.start < e for s, e in gaps)]  # "an" in "3/4 of an hour"
    ambiguous = ""
    for n in numbers:
        if n.value is None and (units[id(n)] or not any(units.values())):
            ambiguous = f"'{question[n.start : n.end]}' reads more than one way"
    for a, b in zip(numbers, numbers[1:]):  # 2-3 kg, 5 or 6 feet, between 3 and 4 feet
        if units[id(a)] is None and units[id(b)] is not None and _RANGE_GAP.fullmatch(question[a.end : b.start]):
            ambiguous = f"'{question[a.start : b.end]}' is a range or a choice, not one quantity"
    quantities = _quantities([n for n in numbers if n.value is not None], units, question)
    held = {q.unit for q in quantities if q.unit is not None}
    held |= {m for q in quantities if q.parts > 1 for m in mentions if q.start <= m.start < q.end}
    free = tuple(m for m in mentions if m not in held)
    if ambiguous:
        return Reading((), tuple(mentions), free, ambiguous)
    return Reading(tuple(quantities), tuple(mentions), free)


def _quantities(numbers: list[Number], units: dict, question: str) -> list[Quantity]:
    """Numbers written with their unit are the quantities (compound ones summed); without any, every number."""
    with_unit = [n for n in numbers if units[id(n)] is not None]
    if not with_unit:
        return [Quantity(n.value, None, n.start, n.end, 1, question[n.start : n.end]) for n in numbers]
    found: list[Quantity] = []
    for n in with_unit:
        unit = units[id(n)]
        last = found[-1] if found else None
        if last is not None and last.unit is not None and _COMPOUND_GAP.fullmatch(question[last.end : n.start]):
            factor = _factor(unit, last.unit)
            if factor is not None and factor > 1 and math.isfinite(factor):  # 6 ft 2 in: descending, one dimension
                # in the first, largest unit, as a person says it: 6 ft 2 in is 6.1666666667 ft
                value = last.value + n.value / factor
                found[-1] = Quantity(value, last.unit, last.start, unit.end, last.parts + 1, "")
                continue
        found.append(Quantity(n.value, unit, n.start, unit.end, 1, question[n.start : n.end]))
    return found


def leading_number(text: str) -> tuple[float, int] | None:
    """The number `text` starts with (any notation the reader knows) and where it ends, or None."""
    match = _NUMBER_RE.match(text)
    if match:
        numbers = digit_numbers(text[: match.end()])
        if numbers and numbers[0].start == 0 and numbers[0].value is not None:
            return numbers[0].value, numbers[0].end
        return None
    following = {m.start() for m in _WORD_RE.finditer(text)}
    words = word_numbers(text, following)
    if words and words[0].start == 0 and words[0].value is not None:
        return words[0].value, words[0].end
    return None


def render(value: float) -> str:
    """A quantity's value as a form writes it: digits and a point, no exponent, no separators (2.25, 4000)."""
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    text = f"{value:.10g}"
    if "e" in text:
        text = f"{value:.12f}".rstrip("0").rstrip(".")
    return text
