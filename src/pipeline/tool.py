"""The `tool` prompt strategy: the model rewrites a question as `QUANTITY SOURCE -> TARGET`, pint computes.

A 135M model copies units well but gets factors and arithmetic wrong, so it only does the copying
here. Three parts:
- a unit lexicon that is pint's own registry (prefixes, plurals, British spellings, symbols) plus the
  grammar around it (powers `^`, `**`, `²`, `cubic`/`square`, `/`, `per`, abbreviations with dots),
  with an alias table only for the spellings pint reads differently from the data sets;
- the unit mentions and numbers of a question, and from them the few forms the model may write,
  as a token trie for constrained decoding (`FormConstraint`, the engine's `Constraint` protocol);
- parsing the model's form, grounding it in the question and converting with pint. A form that does
  not parse, or a unit that does not resolve, gives no answer (NaN when scored), never an exception,
  and the failure class says why.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from functools import lru_cache

import pint

# Spellings pint reads differently from the data sets, as written (G is gauss to pint, M molar, KB
# kelvin-bytes, kilo(s) kiloseconds), and the few common ones it lacks (kmh, fl oz); cc, mph, kph,
# lbs, hrs, metres, litres and tonnes it reads itself.
SPELLING_ALIASES = {
    "G": "gigabyte", "M": "megabyte", "KB": "kilobyte", "kilo": "kilogram", "kilos": "kilogram",
    "kmh": "kilometer / hour", "kmph": "kilometer / hour", "fl oz": "fluid_ounce", "fl. oz": "fluid_ounce",
}  # fmt: skip
# British spellings pint lacks (it has metre, litre and tonne): tried after the word as written
BRITISH = (("gramme", "gram"),)
# pint's unit -> the data sets' unit: their year is 365.242199 days (pint's is 365.25) and month, decade
# and century follow it; "b" is a bit, not a barn (also with prefixes: kb, Mb, Gb)
UNIT_ALIASES = {
    "year": "dataset_year", "month": "dataset_month", "decade": "dataset_decade", "century": "dataset_century",
}  # fmt: skip

# English words pint reads as units ("a" is a year, "in" an inch, "at" a technical atmosphere, "are"
# 100 m², "us" a microsecond, "has" hectares, "unit" a micro-nit, "turn" a revolution), found by reading
# the words of the model's vocabulary with pint: never a unit mention on their own in a question. Single
# letters that are pronouns (A, I), constants (c, e, k) or rarely meant (d for day, u for dalton) neither.
ENGLISH_WORDS = {
    "a", "an", "as", "at", "are", "in", "is", "us", "me", "do", "by", "to", "of", "or", "on", "it", "be", "we",
    "so", "no", "up", "go", "he", "hi", "am", "per", "and", "the", "for", "than", "has", "bus", "th", "re",
    "point", "points", "unit", "units", "turn", "turns", "pi", "percent", "count", "counts", "dot", "dots", "bag",
    "bags", "hand", "hands", "link", "links", "section", "sections", "den", "cycle", "cycles", "circle", "circles",
    "revolution", "grade", "grades", "particle", "particles", "molecule", "molecules", "chain", "chains", "nit",
    "shot", "shots", "strain", "strains", "pond", "ponds", "gravity", "quarter", "quarters", "fur", "gray", "alpha",
    "gamma", "lambda", "fifth", "pole", "poles", "oct", "toe", "toes", "pixel", "pixels", "shake", "thou", "quad",
    "dam", "care", "mass", "ins", "mis", "thous", "dens", "li", "pp", "pel", "tf", "eu", "sigma", "revolutions",
    "TV", "MA", "GA", "Ms", "Ne", "Bi", "Ba", "Ta", "Ly", "Fr", "St", "Cl", "I", "A", "c", "e", "k", "d", "u", "x",
    "X",
}  # fmt: skip
_REFUSED_ALONE = ENGLISH_WORDS | {word.capitalize() for word in ENGLISH_WORDS}
# prefix symbols on unit symbols as people write them (km, mL, MiB); pint takes any prefix on any unit,
# which makes English words units ("cat" is a centi-technical-atmosphere, "PC" a petacoulomb)
PREFIXED_SYMBOLS = (
    ({"k", "M", "G", "m", "µ", "u", "n"}, {"m", "g", "s", "l", "L", "t", "Hz", "W", "Wh", "J", "Pa", "V", "A", "N"}),
    ({"c", "d", "h"}, {"m", "l", "L", "g", "Pa"}),
    ({"k", "M", "G", "T", "P", "Ki", "Mi", "Gi", "Ti", "Pi"}, {"B", "b", "bit"}),
)

POWER_WORDS = {"square": 2, "sq": 2, "cubic": 3, "cu": 3}
POWER_SUFFIXES = {"squared": 2, "cubed": 3}
PER_WORDS = {"per"}
TIME_PER_WORDS = {"a", "an"}  # "miles an hour": per, where a time unit follows

_TOKEN_RE = re.compile(
    r"(?P<word>[A-Za-zµμ][A-Za-zµμ'_]*\.?)|(?P<slash>/)|(?P<power>(?:\^|\*\*)\d+|[²³])|(?P<number>\d[\d,]*(?:\.\d+)?)"
    r"|(?P<space>\s+)|(?P<other>.)"
)
SUPERSCRIPTS = {"²": 2, "³": 3}
_AWKWARD = re.compile(r"[^\w/^*.²³µμ' -]")


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
    """pint with the data sets' year (365.242199 days; pint's own year is 365.25) and its month, decade, century."""
    # pint warns on every ambiguous word it parses ("mins": minutes or milli-inches); the lexicon's rules
    # below decide those, so its warnings would only fill the run log
    logging.getLogger("pint").setLevel(logging.ERROR)
    ureg = pint.UnitRegistry()
    ureg.define("dataset_year = 365.242199 * day")
    ureg.define("dataset_month = dataset_year / 12")
    ureg.define("dataset_decade = 10 * dataset_year")
    ureg.define("dataset_century = 100 * dataset_year")
    return ureg


# ------------------------------------------------------------------ the lexicon


@lru_cache(maxsize=8192)
def _atom(word: str) -> str | None:
    """pint's canonical name for one unit word (a prefix, plural, British spelling or symbol), or None."""
    word = word.rstrip(".")
    if not word:
        return None
    if word in SPELLING_ALIASES:
        return SPELLING_ALIASES[word]
    ureg = registry()
    capitalized = word[:1].isupper() and word[1:].islower() and len(word) > 2  # "Kilograms" at a sentence's start
    for candidate in _variants(word, lower=capitalized):
        if candidate in SPELLING_ALIASES:
            return SPELLING_ALIASES[candidate]
        try:
            name = ureg.get_name(candidate)
        except Exception:  # pint raises several types for names it does not know
            continue
        if name.endswith("barn"):  # b, kb, Mb: bits in a data question, never barns
            name = name[: -len("barn")] + "bit"
        return UNIT_ALIASES.get(name, name)
    return None


def _variants(word: str, lower: bool) -> list[str]:
    """`word` as written, then lower-cased (when asked), British spellings made American, and English
    plurals pint does not undo itself (centuries it does; electron_masses, henries, survey_feet not)."""
    variants = [word, word.lower()] if lower else [word]
    variants += [v.replace(british, us) for v in variants for british, us in BRITISH if british in v]
    singulars = []
    for v in variants:
        if v.endswith("feet"):
            singulars.append(v[:-4] + "foot")
        elif v.endswith("ies"):
            singulars.append(v[:-3] + "y")
        elif v.endswith("es"):
            singulars.append(v[:-2])
    return list(dict.fromkeys(variants + singulars))


@lru_cache(maxsize=8192)
def _prose_unit(word: str, sentence_start: bool = False) -> bool:
    """Whether a word standing alone in a question is a unit: not an English word, capitalized only at a
    sentence's start, and a prefix only as people write one (a name on a name: kilometres; a symbol on a
    symbol where that is usual: km, mL, MiB)."""
    if word in SPELLING_ALIASES:
        return True
    if word in _REFUSED_ALONE or _atom(word) is None:
        return False
    ureg = registry()
    capitalized = word[:1].isupper() and word[1:].islower() and len(word) > 2
    for candidate in _variants(word, lower=capitalized and sentence_start):  # Kilometres per hour: ...
        try:
            parses = ureg.parse_unit_name(candidate)
        except Exception:
            continue
        for prefix, unit, _ in parses:
            if not prefix:
                return True
            definition, prefix_symbol = ureg._units[unit], ureg._prefixes[prefix].defined_symbol
            names = (definition.name, *definition.aliases)
            if candidate.startswith(prefix) and any(candidate[len(prefix) :].startswith(n) for n in names):
                return True
            rest = candidate[len(prefix_symbol or "") :]
            rest = rest[:-1] if rest.endswith("s") and len(rest) > 1 else rest  # plural: kgs, MBs
            written = {s for s in (definition.defined_symbol, *definition.aliases, definition.name) if s}
            if candidate.startswith(prefix_symbol or "\0") and rest in written:
                if any(prefix_symbol in ps and rest in us for ps, us in PREFIXED_SYMBOLS):
                    return True
    return False


def _tokens(text: str) -> list[tuple[str, str, int, int]]:
    """(kind, text, start, end) of the words, slashes, powers and numbers of `text` (spaces dropped)."""
    tokens = []
    for match in _TOKEN_RE.finditer(text):
        kind = match.lastgroup
        if kind == "space":
            continue
        value = match.group()
        if kind == "number" and tokens and tokens[-1][0] == "word" and tokens[-1][3] == match.start():
            # a digit glued to a unit symbol is its power: cm3, m2
            if value in ("2", "3") and not tokens[-1][1].endswith("."):
                kind = "power"
        tokens.append((kind, value, match.start(), match.end()))
    return tokens


def _power_of(token: str) -> int:
    if token in SUPERSCRIPTS:
        return SUPERSCRIPTS[token]
    return int(token.lstrip("^*"))


def _term(tokens, i: int, mention: bool) -> tuple[int, str, bool] | None:
    """One unit with its power at tokens[i]: (next index, pint expression, standalone word) or None."""
    power, modified = 1, False
    if i < len(tokens) and tokens[i][0] == "word" and tokens[i][1].rstrip(".").lower() in POWER_WORDS:
        power, modified = POWER_WORDS[tokens[i][1].rstrip(".").lower()], True
        i += 1
    if i >= len(tokens) or tokens[i][0] != "word":
        return None
    name, end = None, i + 1
    # two-word units from the registry (fluid ounce, metric ton, nautical mile, fl. oz.), longest first
    if i + 1 < len(tokens) and tokens[i + 1][0] == "word" and tokens[i + 1][2] - tokens[i][3] <= 1:
        first, second = tokens[i][1], tokens[i + 1][1].rstrip(".")
        for candidate in (f"{first.rstrip('.')}_{second}", f"{first} {second}"):
            name = _atom(candidate)
            if name:
                end = i + 2
                break
    word = tokens[i][1]
    if name is None:
        name = _atom(word)
    if name is None:
        return None
    if end < len(tokens) and tokens[end][0] == "power":
        power, modified, end = power * _power_of(tokens[end][1]), True, end + 1
    elif end < len(tokens) and tokens[end][0] == "word" and tokens[end][1].rstrip(".").lower() in POWER_SUFFIXES:
        power, modified, end = power * POWER_SUFFIXES[tokens[end][1].rstrip(".").lower()], True, end + 1
    standalone = end == i + 1 and not modified
    sentence_start = i == 0 or tokens[i - 1][1] in (".", "?", "!", ":") or tokens[i - 1][1].endswith(".")
    if mention and standalone and not _prose_unit(word.rstrip("."), sentence_start):
        return None
    expression = name if power == 1 else f"{name}**{power}"
    return end, expression, standalone


def _phrase(tokens, i: int, mention: bool) -> tuple[int, str] | None:
    """The longest unit phrase at tokens[i] (terms joined by `/`, `per`, `an`): (next index, pint expression)."""
    first = _term(tokens, i, mention)
    if first is None:
        return None
    end, expression, _ = first
    while end + 1 < len(tokens):
        kind, text = tokens[end][0], tokens[end][1].lower()
        if not (kind == "slash" or (kind == "word" and text in PER_WORDS | TIME_PER_WORDS)):
            break
        following = _term(tokens, end + 1, mention=False)
        if following is None:
            break
        if kind == "word" and text in TIME_PER_WORDS and not _is_time(following[1]):
            break
        end, expression = following[0], f"{expression} / ({following[1]})"
    return end, expression


@lru_cache(maxsize=1024)
def _is_time(expression: str) -> bool:
    try:
        return registry()(expression).dimensionality == {"[time]": 1}
    except Exception:
        return False


@lru_cache(maxsize=4096)
def _quantity(spelling: str):
    text = re.sub(r"\s+", " ", spelling.strip().strip("?,:;\"'`()")).strip()
    text = re.sub(r"^[-+]?[\d.,]+(?:[eE][-+]?\d+)?\s+(?=\D)", "", text)  # "1024 MB" -> "MB"
    if not text or len(text) > 60 or _AWKWARD.search(text):
        return None
    unit = _read(text)
    if unit is None and re.match(r"(?:of|in|into|to)\s+", text):  # "in kg" from a model; "in Hg" is a unit
        unit = _read(re.sub(r"^(?:of|in|into|to)\s+", "", text))
    return unit


def _read(text: str):
    tokens = _tokens(text)
    parsed = _phrase(tokens, 0, mention=False) if tokens else None
    if parsed is None or parsed[0] != len(tokens):
        return None
    try:
        quantity = registry()(parsed[1])
    except Exception:  # pint raises many types for text it cannot read
        return None
    if not isinstance(quantity, pint.Quantity) or quantity.magnitude != 1:
        return None
    return quantity


def resolve_unit(spelling: str):
    """A pint quantity of one `spelling` unit (`kilometres per hour`, `cm^3`, `sq. ft.`, `G`), or None when unknown."""
    return _quantity(spelling)


@lru_cache(maxsize=4096)
def unit_key(spelling: str) -> str | None:
    """A key equal for spellings of the same unit (its size in base units), None when it does not resolve."""
    unit = resolve_unit(spelling)
    if unit is None:
        return None
    base = unit.to_base_units()
    return f"{base.magnitude:.12g} {base.units}"


@dataclass(frozen=True)
class Mention:
    """A unit written in a question: its spelling as written and where."""

    spelling: str
    start: int
    end: int


def find_mentions(question: str) -> list[Mention]:
    """Every unit phrase in `question`, left to right, longest first at each place (`miles per hour`, `cm^3`)."""
    tokens = _tokens(question)
    found, i = [], 0
    while i < len(tokens):
        parsed = _phrase(tokens, i, mention=True) if tokens[i][0] == "word" else None
        if parsed is None:
            i += 1
            continue
        end = parsed[0]
        start_char, end_char = tokens[i][2], tokens[end - 1][3]
        spelling = question[start_char:end_char]
        if spelling.endswith(".") and not re.search(r"\.\S", spelling):  # a sentence's full stop, or lb.
            spelling = spelling[:-1]
        if resolve_unit(spelling) is not None:
            found.append(Mention(spelling, start_char, start_char + len(spelling)))
        i = end
    return found


def mentioned_units(question: str) -> list[str]:
    """The unit spellings a question mentions, in order, one per distinct unit (the first spelling wins)."""
    spellings, keys = [], set()
    for mention in find_mentions(question):
        key = unit_key(mention.spelling)
        if key and key not in keys:
            keys.add(key)
            spellings.append(mention.spelling)
    return spellings


_NUMBER_RE = re.compile(r"(?<![\w.^*/])[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?(?![\w^²³])")


def question_numbers(question: str) -> list[str]:
    """The numbers written in `question`, as written, distinct, in order (not the powers of units: cm3, m^2)."""
    return list(dict.fromkeys(match.group().rstrip(".") for match in _NUMBER_RE.finditer(question)))


def quantities(question: str, mentions: list[Mention] | None = None) -> dict[str, str | None]:
    """The numbers of `question` that can be the quantity, each with the unit written right after it.

    Those written just before a unit ("In 1997 a reading of 99.3 feet" gives 99.3 with feet, not the
    year); when no number stands before a unit ("from kg to lb for 6 units"), every number, with None.
    """
    mentions = find_mentions(question) if mentions is None else mentions
    unit_at = {m.start: m.spelling for m in mentions}
    numbers = list(_NUMBER_RE.finditer(question))
    units = {m.start(): unit_at.get(len(question) - len(question[m.end() :].lstrip())) for m in numbers}
    found: dict[str, str | None] = {}
    for match in [m for m in numbers if units[m.start()]] or numbers:
        found.setdefault(match.group().rstrip("."), units[match.start()])  # a number written twice: its first place
    return found


def _number_value(text: str) -> float:
    return float(text.replace(",", ""))


# ------------------------------------------------------------------ constrained decoding

STOP_TEXT = "\n"


def candidate_forms(question: str, pin_source: bool = True) -> list[str]:
    """Every form the model may write for `question`: a number of the question, then two of its unit spellings.

    The number is one that can be the quantity (`quantities`). With `pin_source`, a number the question
    writes with its unit ("Restate 57.85 yrs using days") keeps that unit as its SOURCE, as written, and
    the model picks the target; where no unit follows the number ("from kg to lb for 6 units"), or
    without `pin_source`, the model decides which unit is which. Two spellings of one unit both count
    ("46 millilitres to cm³" has one answer either way). Empty when the question holds no number or
    fewer than two unit spellings (then decoding is left free and the answer is checked afterwards).
    """
    mentions = find_mentions(question)
    numbers = quantities(question, mentions)
    units = list(dict.fromkeys(mention.spelling for mention in mentions))
    if not numbers or len(units) < 2:
        return []
    return [
        f"{n} {source} -> {target}"
        for n, unit in numbers.items()
        for source in ([unit] if unit and pin_source else units)
        for target in units
        if source != target
    ]


class FormConstraint:
    """A token trie over the canonical tokenizations of the allowed forms, each followed by the stop text.

    `allowed(generated)` (the engine's `Constraint` protocol) walks the trie along the tokens generated
    so far and returns the ids that may come next; [] once a form and its stop text are complete, or
    when the tokens left the trie (which greedy decoding within `allowed` never does).
    """

    def __init__(self, token_paths: list[list[int]]):
        self.root: dict[int, dict] = {}
        for path in token_paths:
            node = self.root
            for token in path:
                node = node.setdefault(token, {})
        self._cache: tuple[int, dict] = (0, self.root)  # the node after the last call's tokens

    def node(self, generated) -> dict | None:
        """The trie node after `generated`, None when it left the trie."""
        depth, node = self._cache
        if depth > len(generated):  # a new sequence: start over
            depth, node = 0, self.root
        for token in generated[depth:]:
            node = node.get(int(token))
            if node is None:
                return None
            depth += 1
        self._cache = (depth, node)
        return node

    def allowed(self, generated) -> list[int]:
        """Token ids that may follow `generated` ([] when the form is complete)."""
        node = self.node(generated)
        return list(node) if node else []


def form_constraint(question: str, tokenizer, pin_source: bool = True) -> FormConstraint | None:
    """The constraint for one question, or None (decode freely) when the question gives no complete form."""
    forms = candidate_forms(question, pin_source)
    if not forms:
        return None
    encoded = tokenizer([form + STOP_TEXT for form in forms], add_special_tokens=False)["input_ids"]
    return FormConstraint(encoded)


# ------------------------------------------------------------------ reading and computing the form

FORM_RE = re.compile(
    r"(?P<quantity>[-+]?(?:\d[\d,]*\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*(?P<source>[^\n>]+?)\s*(?:->|→|=>|=|\bto\b|\binto\b|\bin\b)\s*(?P<target>[^\n<]+?)\s*[.?]?\s*$",
    re.MULTILINE,
)
ARROW_FORM_RE = re.compile(
    r"(?P<quantity>[-+]?(?:\d[\d,]*\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*(?P<source>[^\n>]+?)\s*(?:->|→|=>)\s*(?P<target>[^\n<]+?)\s*[.?]?\s*$",
    re.MULTILINE,
)


def parse_form(text: str) -> Form | None:
    """The last `QUANTITY SOURCE -> TARGET` line of a model output (an arrow first, then `to`/`in`/`=`), or None."""
    text = text.replace("<|im_end|>", "")
    matches = list(ARROW_FORM_RE.finditer(text)) or list(FORM_RE.finditer(text))
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


def ground(form: Form, question: str) -> Form:
    """Repair a form whose unit the question never mentions, when the question names exactly two units.

    The small model sometimes writes a unit from its examples ("liters") instead of the one asked
    for ("cubic inches"); the unit it did copy fixes which side the other mention belongs to.
    """
    mentions = mentioned_units(question)
    if len(mentions) != 2:
        return form
    keys = [unit_key(m) for m in mentions]
    source_key, target_key = unit_key(form.source), unit_key(form.target)
    source_ok, target_ok = source_key in keys, target_key in keys
    if source_ok and source_key == target_key:  # "2 weeks -> weeks": the target is the other unit
        return Form(form.quantity, form.source, mentions[1 - keys.index(source_key)])
    if source_ok and not target_ok:
        return Form(form.quantity, form.source, mentions[1 - keys.index(source_key)])
    if target_ok and not source_ok:
        return Form(form.quantity, mentions[1 - keys.index(target_key)], form.target)
    return form


# why an answer would be wrong, checked in this order; the last one holds when nothing earlier does
FAILURES = ("no_form", "unknown_unit", "quantity_not_in_question", "grounding_changed_unit", "wrong_conversion")


def _in_question(spelling: str, question: str, keys: set[str]) -> bool:
    """The unit is one the question mentions, or written in it word for word (pint reads it either way)."""
    if unit_key(spelling) in keys:
        return True
    return re.search(rf"(?<![\w]){re.escape(spelling)}(?![\w])", question) is not None


def solve(output: str, question: str = "") -> tuple[str, str, str]:
    """The model's output with `<answer>VALUE</answer>` appended, the parsed form ('' when none), and the
    failure class that explains the answer should it be wrong (one of `FAILURES`).

    With the question given, a form naming a unit the question does not mention is grounded first, and
    a form whose units are still not the question's gives no answer (a question whose units cannot be
    resolved gets none either: never a guess).
    """
    form = parse_form(output)
    if form is None:
        return output, "", "no_form"
    failure = "wrong_conversion"
    if question:
        grounded = ground(form, question)
        keys = {k for k in (unit_key(m) for m in mentioned_units(question)) if k}
        numbers = {_number_value(n) for n in question_numbers(question)}
        if not all(_in_question(u, question, keys) for u in (grounded.source, grounded.target)):
            return output, str(grounded), "unknown_unit"
        if not any(math.isclose(form.quantity, n, rel_tol=1e-9) for n in numbers):
            failure = "quantity_not_in_question"
        elif grounded != form:
            failure = "grounding_changed_unit"
        form = grounded
    value = convert(form)
    if math.isnan(value):
        known = resolve_unit(form.source) is not None and resolve_unit(form.target) is not None
        return output, str(form), failure if known else "unknown_unit"
    return f"{output}\n<answer>{value:.10g}</answer>", str(form), failure
