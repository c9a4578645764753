"""The unit lexicon: pint's registry read as prose, the way a user writes units.

Every unit name, symbol, alias, prefix and plural pint knows, British spellings, powers (`^`, `**`, `²`,
`cubic`/`square`), `/`, `per` and "miles an hour", temperatures with their offsets (°C, °F, K,
"degrees Celsius"), and lookup that ignores case except where case decides the unit (mL and ML, Mb and
MB, g and G). English words pint also reads as units ("a", "in", "at", "has", "cat") are never a unit
standing alone in a question. An alias table keeps only what pint reads otherwise from the data sets.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pint

# Spellings pint reads differently from the data sets, as written (G is gauss to pint, M molar, KB
# kelvin-bytes, kilo(s) kiloseconds), and the few common ones it lacks (kmh, fl oz); cc, mph, kph,
# lbs, hrs, metres, litres and tonnes it reads itself.
SPELLING_ALIASES = {
    "G": "gigabyte", "M": "megabyte", "KB": "kilobyte", "kilo": "kilogram", "kilos": "kilogram",
    "kmh": "kilometer / hour", "kmph": "kilometer / hour", "fl oz": "fluid_ounce", "fl. oz": "fluid_ounce",
}  # fmt: skip
# Temperatures as people write them, looked up without case: pint reads "°C" and "celsius" but not
# "Celsius", "degrees F" or "℃", and "centigrade" is a centi-grade (an angle) to it.
TEMPERATURES = {
    **{f"{deg} {scale}": unit
       for deg in ("degree", "degrees", "deg", "degs", "°")
       for scale, unit in (("celsius", "degree_Celsius"), ("c", "degree_Celsius"), ("centigrade", "degree_Celsius"),
                           ("fahrenheit", "degree_Fahrenheit"), ("f", "degree_Fahrenheit"), ("kelvin", "kelvin"),
                           ("k", "kelvin"))},
    "celsius": "degree_Celsius", "centigrade": "degree_Celsius", "fahrenheit": "degree_Fahrenheit",
    "°c": "degree_Celsius", "°f": "degree_Fahrenheit", "℃": "degree_Celsius", "℉": "degree_Fahrenheit",
    "degc": "degree_Celsius", "degf": "degree_Fahrenheit",
}  # fmt: skip
# British spellings pint lacks (it has metre, litre and tonne): tried after the word as written
BRITISH = (("gramme", "gram"),)
# pint's unit -> the data sets' unit: their year is 365.242199 days (pint's is 365.25) and month, decade
# and century follow it; "b" is a bit, not a barn (also with prefixes: kb, Mb, Gb)
UNIT_ALIASES = {
    "year": "dataset_year", "month": "dataset_month", "decade": "dataset_decade", "century": "dataset_century",
}  # fmt: skip
# Where case decides the unit, the spelling is read exactly as written and never folded: mL is a
# millilitre and ML a megalitre, Mb a megabit and MB a megabyte, g a gram and G a gigabyte. Title-case
# words that pint reads as mega-units but a sentence's start may have capitalized (Ml, Mm, Mg) are neither.
CASE_SENSITIVE = {
    "mL", "ML", "Mb", "MB", "mb", "G", "g", "M", "m", "B", "b", "K", "kB", "KB", "kb", "Kb", "GB", "TB", "PB",
    *(f"{prefix}bit" for prefix in ("k", "K", "M", "G", "T", "P")), *(f"{prefix}iB" for prefix in ("K", "M", "G", "T")),
}  # fmt: skip
TITLE_AMBIGUOUS = {"Ml", "Mm", "Mg", "Ms", "Mt"}
# In a question written in capitals only, case says nothing: its words are read folded to lower case,
# but for the byte units, which are written in capitals anyway
CAPS_KEPT = {"B": "B", "KB": "KB", "MB": "MB", "GB": "GB", "TB": "TB", "PB": "PB", "KIB": "KiB", "MIB": "MiB",
             "GIB": "GiB", "TIB": "TiB", "K": "K"}  # fmt: skip

# words in capitals that are the unit folded to lower case wherever they stand (CAPS_KEPT aside)
CAPS_ABBREVIATIONS = {"KG", "KM", "CM", "MM", "LB", "OZ", "FT", "MI", "YD", "HR", "QT", "PT", "ML", "MG"}
# units named after people: capitalized in the middle of a sentence, the person
EPONYMS = {
    "henry", "newton", "joule", "watt", "pascal", "ohm", "tesla", "gauss", "weber", "coulomb", "siemens", "farad",
    "volt", "ampere", "hertz", "becquerel", "gray", "sievert", "curie", "roentgen", "rankine", "gilbert",
    "maxwell", "oersted", "poise", "stokes", "debye", "dalton", "bel", "neper", "torr", "darcy", "galileo",
    "jansky", "rayleigh", "franklin", "biot", "lambert", "langley", "planck", "bohr", "hartree", "rydberg",
    "erlang", "baud", "kayser", "clausius", "reaumur", "stere",
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
    "X", "degree", "degrees", "deg", "half", "dozen", "few", "many", "much", "some", "one", "long", "wide", "high",
    "tall", "deep", "ton", "tons",
}  # fmt: skip
_REFUSED_ALONE = (ENGLISH_WORDS | {word.capitalize() for word in ENGLISH_WORDS}) - {"K"}  # K: kelvin
_ENGLISH_FOLDED = {word.lower() for word in ENGLISH_WORDS}
# prefix symbols on unit symbols as people write them (km, mL, MiB); pint takes any prefix on any unit,
# which makes English words units ("cat" is a centi-technical-atmosphere, "PC" a petacoulomb)
PREFIXED_SYMBOLS = (
    ({"k", "M", "G", "m", "µ", "u", "n"}, {"m", "g", "s", "l", "L", "t", "Hz", "W", "Wh", "J", "Pa", "V", "A", "N"}),
    ({"c", "d", "h"}, {"m", "l", "L", "g", "Pa"}),
    ({"k", "M", "G", "T", "P", "Ki", "Mi", "Gi", "Ti", "Pi"}, {"B", "b", "bit"}),
)
# units people write with a prefix name (kilometres, milligrams, gigabytes), for the lexicon's list
PREFIXED_NAMES = (
    ({"kilo", "mega", "milli", "micro", "nano", "centi", "deci", "hecto"},
     {"meter", "metre", "gram", "gramme", "liter", "litre", "second", "watt", "joule", "hertz", "pascal", "newton",
      "volt", "ampere", "calorie"}),
    ({"kilo", "mega", "giga", "tera", "peta", "kibi", "mebi", "gibi", "tebi", "pebi"}, {"byte", "bit"}),
)  # fmt: skip

POWER_WORDS = {"square": 2, "sq": 2, "cubic": 3, "cu": 3}
POWER_SUFFIXES = {"squared": 2, "cubed": 3}
PER_WORDS = {"per"}
TIME_PER_WORDS = {"a", "an"}  # "miles an hour": per, where a time unit follows

_TOKEN_RE = re.compile(
    r"(?P<word>[A-Za-zµμ°℃℉][A-Za-zµμ'_]*\.?)|(?P<slash>/)|(?P<power>(?:\^|\*\*)\d+|[²³])|(?P<number>\d[\d,]*(?:\.\d+)?)"
    r"|(?P<space>\s+)|(?P<other>.)"
)
SUPERSCRIPTS = {"²": 2, "³": 3}
_AWKWARD = re.compile(r"[^\w/^*.²³µμ°℃℉' -]")


@lru_cache(maxsize=1)
def registry() -> pint.UnitRegistry:
    """pint with the data sets' year (365.242199 days; pint's own year is 365.25) and its month, decade, century."""
    # pint warns on every ambiguous word it parses ("mins": minutes or milli-inches); the lexicon's rules
    # below decide those, so its warnings would only fill the run log
    logging.getLogger("pint").setLevel(logging.ERROR)
    from pipeline.config import default_cache_dir

    # pint's own cache of its parsed definition files (flexcache, keyed by their contents): 0.23 s to 0.03 s here
    try:
        ureg = pint.UnitRegistry(cache_folder=default_cache_dir() / "pint")
    except OSError:  # a cache that cannot be written: parsed as before
        ureg = pint.UnitRegistry()
    ureg.define("dataset_year = 365.242199 * day")
    ureg.define("dataset_month = dataset_year / 12")
    ureg.define("dataset_decade = 10 * dataset_year")
    ureg.define("dataset_century = 100 * dataset_year")
    _DEFINED[:] = list(ureg._units.items())
    return ureg


# the registry's units as defined, before any parse: pint adds each prefixed unit it parses ("attohour") to the
# same table, so a lexicon read from the table later depended on what the process had parsed before (a second
# build in one process found 2163 atoms where the first found 2011)
_DEFINED: list = []


# ------------------------------------------------------------------ one word


@lru_cache(maxsize=16384)
def _atom(word: str) -> str | None:
    """pint's canonical name for one unit word (a prefix, plural, British spelling, symbol or temperature), or None."""
    found = _lookup(word)
    return found[0] if found else None


@lru_cache(maxsize=16384)
def _lookup(word: str) -> tuple[str, str] | None:
    """(pint's name, the spelling pint read) for one unit word, or None.

    Case is ignored but where it decides the unit (`CASE_SENSITIVE`). Where a capitalized word as written
    and in lower case are different units, the one without a prefix wins ("Miles" is miles, not
    mebi-litres; "Yd" yards; "Pa" pascals, not pico-years); where both carry a prefix the case was
    needed and is lost ("Ml", "MG"), so it is no unit; where neither does, pint's symbol (Gal, Sv)."""
    word = word.rstrip(".")
    if not word:
        return None
    if word in SPELLING_ALIASES:
        return SPELLING_ALIASES[word], word
    folded = word.lower()
    if folded in TEMPERATURES:
        return TEMPERATURES[folded], folded
    if word in TITLE_AMBIGUOUS:
        return None
    exact = _reading(word)
    if word in CASE_SENSITIVE or folded == word:
        return exact[:2] if exact else None
    fold = (SPELLING_ALIASES[folded], folded, False) if folded in SPELLING_ALIASES else _reading(folded)
    if exact is None or fold is None:
        found = exact or fold
        return found[:2] if found else None
    if exact[0] == fold[0]:
        return exact[:2]
    title = word[:1].isupper() and word[1:].islower()
    if exact[2] != fold[2]:  # in capitals the reading without a prefix; a mixed-case symbol (cP) as written
        return (fold if exact[2] else exact)[:2] if title or word.isupper() else exact[:2]
    if exact[2]:  # both with a prefix: mega or milli? A short symbol has lost what its case said
        return None if word.isupper() or (title and len(word) <= 3) else exact[:2]
    return exact[:2]  # both plain units: pint's symbol (Gal, Sv, At)


def _reading(word: str) -> tuple[str, str, bool] | None:
    """(pint's name, the variant read, whether pint reads it only with a prefix) for `word` as written, or None."""
    ureg = registry()
    for candidate in _variants(word):
        if candidate in SPELLING_ALIASES:
            return SPELLING_ALIASES[candidate], candidate, False
        try:
            name = ureg.get_name(candidate)
            prefixed = all(prefix for prefix, _, _ in ureg.parse_unit_name(candidate))
        except Exception:  # pint raises several types for names it does not know
            continue
        if name.endswith("barn"):  # b, kb, Mb: bits in a data question, never barns
            name = name[: -len("barn")] + "bit"
        if name == "centigrade":  # a hundredth of a grade to pint; people mean Celsius
            return "degree_Celsius", candidate, False
        return UNIT_ALIASES.get(name, name), candidate, prefixed
    return None


def _variants(word: str) -> list[str]:
    """`word` as written, British spellings made American, and English plurals pint does not undo itself
    (centuries it does; electron_masses, henries, survey_feet not)."""
    variants = [word]
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


@lru_cache(maxsize=16384)
def _prose_unit(word: str, sentence_start: bool = False, after_number: bool = False) -> bool:
    """Whether a word standing alone in a question is a unit: not an English word, and a prefix only as
    people write one (a name on a name: kilometres; a symbol on a symbol where that is usual: km, mL, MiB).

    A word that is a unit only in lower case is one at a sentence's start or after a number; elsewhere a
    capitalized eponym is a name (Henry, Newton), and a word in capitals a unit if it is a usual abbreviation
    (KG, LBS, MILES; not PC)."""
    if word in SPELLING_ALIASES or word.lower() in TEMPERATURES:
        return True
    if word in _REFUSED_ALONE:
        return False
    found = _lookup(word)
    if found is None:
        return False
    read = found[1]
    if read.lower() in _ENGLISH_FOLDED and read != word or read in ENGLISH_WORDS:  # IN, AT, Are
        return False
    if read != word and not (sentence_start or after_number):
        if word.isupper() and len(word) < 3 and word not in CAPS_ABBREVIATIONS:
            return False
        if not word.isupper() and read.lower() in EPONYMS:
            return False
    if read in SPELLING_ALIASES:
        return True
    ureg = registry()
    try:
        parses = ureg.parse_unit_name(read)
    except Exception:
        return False
    for prefix, unit, _ in parses:
        if not prefix:
            return True
        definition, prefix_symbol = ureg._units[unit], ureg._prefixes[prefix].defined_symbol
        names = (definition.name, *definition.aliases)
        if read.startswith(prefix) and any(read[len(prefix) :].startswith(n) for n in names):
            return True
        rest = read[len(prefix_symbol or "") :]
        rest = rest[:-1] if rest.endswith("s") and len(rest) > 1 else rest  # plural: kgs, MBs
        written = {s for s in (definition.defined_symbol, *definition.aliases, definition.name) if s}
        if read.startswith(prefix_symbol or "\0") and rest in written:
            if any(prefix_symbol in ps and rest in us for ps, us in PREFIXED_SYMBOLS):
                return True
    return False


# ------------------------------------------------------------------ phrases: powers, per, compounds


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
    # two-word units from the registry (fluid ounce, metric ton, nautical mile, fl. oz., degrees Celsius)
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
    after_number = i > 0 and tokens[i - 1][1] == "#" and tokens[i - 1][3] >= tokens[i][2] - 1  # reader's mask
    if mention and standalone and not _prose_unit(word.rstrip("."), sentence_start, after_number):
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


@lru_cache(maxsize=16384)
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
    except Exception:  # pint raises many types for text it cannot read (an offset unit in a ratio among them)
        return None
    if not isinstance(quantity, pint.Quantity) or quantity.magnitude != 1:
        return None
    return quantity


def resolve_unit(spelling: str):
    """A pint quantity of one `spelling` unit (`kilometres per hour`, `cm^3`, `sq. ft.`, `G`, `°F`), None if unknown."""
    return _quantity(spelling)


@lru_cache(maxsize=16384)
def unit_key(spelling: str) -> str | None:
    """A key equal for spellings of the same unit (its size in base units), None when it does not resolve.

    A temperature's key is where its 1 lies on the kelvin scale, so °C, °F and K differ."""
    unit = resolve_unit(spelling)
    if unit is None:
        return None
    try:
        base = unit.to_base_units()
    except Exception:
        return None
    return f"{base.magnitude:.12g} {base.units}"


def is_offset(spelling: str) -> bool:
    """Whether the unit has an offset (°C, °F): it cannot be summed or put in a ratio."""
    unit = resolve_unit(spelling)
    if unit is None:
        return False
    units = registry()._units
    return any(not units[name].is_multiplicative for name in unit._units if name in units)


# ------------------------------------------------------------------ mentions in a question


@dataclass(frozen=True)
class Mention:
    """A unit written in a question: its spelling (as read: a question in capitals is read in lower case),
    where, and the text as the question writes it."""

    spelling: str
    start: int
    end: int
    written: str = ""


def fold_capitals(text: str) -> str:
    """A question written in capitals only, folded to lower case but for its byte units (same length).

    Case carries nothing there (MG is milligrams, not megagauss); any other text is returned as it is."""
    letters = [c for c in text if c.isalpha()]
    if len(letters) < 4 or any(c.islower() for c in letters):
        return text

    def fold(match: re.Match) -> str:
        word = match.group()
        return CAPS_KEPT.get(word, word.lower())

    return re.sub(r"[A-Z]+", fold, text)


_INCH_AFTER_NUMBER = re.compile(r"\s*(in\.?)(?=$|[\s?,;:!)])", re.IGNORECASE)
_NOT_AFTER_INCHES = re.compile(
    r"\s+(?:the|a|an|my|this|that|these|those|his|her|its|our|their|your|total|all|each|every|which|what|\d)\b",
    re.IGNORECASE,
)


def find_mentions(question: str, number_ends: tuple[int, ...] = ()) -> list[Mention]:
    """Every unit phrase in `question`, left to right, longest first at each place (`miles per hour`, `cm^3`).

    "in" right after a number (`number_ends`: where the question's numbers end) is the inch: "12 in",
    "5 ft 8 in", "8 in in millimetres", but not "12 in the box"."""
    text = fold_capitals(question)
    tokens = _tokens(text)
    found, i = [], 0
    inch_at = set()
    for end in number_ends:
        match = _INCH_AFTER_NUMBER.match(text, end)
        if match and not _NOT_AFTER_INCHES.match(text, match.end()):
            inch_at.add(match.start(1))
    while i < len(tokens):
        if tokens[i][0] == "word" and tokens[i][2] in inch_at:
            spelling = question[tokens[i][2] : tokens[i][3]]
            found.append(Mention(spelling, tokens[i][2], tokens[i][3], spelling))
            i += 1
            continue
        parsed = _phrase(tokens, i, mention=True) if tokens[i][0] == "word" else None
        if parsed is None:
            i += 1
            continue
        end = parsed[0]
        start_char, end_char = tokens[i][2], tokens[end - 1][3]
        spelling = text[start_char:end_char]
        if spelling.endswith(".") and not re.search(r"\.\S", spelling):  # a sentence's full stop, or lb.
            spelling = spelling[:-1]
        if resolve_unit(spelling) is not None:
            end_char = start_char + len(spelling)
            found.append(Mention(spelling, start_char, end_char, question[start_char:end_char]))
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


# ------------------------------------------------------------------ the lexicon as a list, for the grammar


def _plural(word: str) -> str:
    if word.endswith("foot"):
        return word[:-4] + "feet"
    if re.search(r"(s|x|z|ch|sh)$", word):
        return word + "es"
    if re.search(r"[^aeiou]y$", word):
        return word[:-1] + "ies"
    return word + "s"


@lru_cache(maxsize=1)
def lexicon_atoms() -> tuple[str, ...]:
    """Every single unit spelling of the lexicon (no powers, no `/`): pint's names, symbols and aliases with
    their plurals, prefixed names and symbols as people write them, British spellings, the alias table and
    the temperatures, with dotted abbreviations (lb., oz.). Each one resolves; English words are left out
    but for "in" (inches, in a form)."""
    return tuple(_lexicon()["atoms"])


@lru_cache(maxsize=1)
def atoms_by_unit() -> dict[str, tuple[str, ...]]:
    """The lexicon's spellings by the unit they name (`unit_key`): every way to write one quantity's unit."""
    return {key: tuple(atoms) for key, atoms in _lexicon()["by_unit"].items()}


def _lexicon_file() -> Path:
    """Where the lexicon is kept between processes, named by what decides it: this module and pint's version."""
    from pipeline.config import default_cache_dir

    digest = hashlib.sha1(Path(__file__).read_bytes() + pint.__version__.encode()).hexdigest()[:12]
    return default_cache_dir() / "lexicon" / f"atoms-{digest}.json"


@lru_cache(maxsize=1)
def _lexicon() -> dict:
    """The lexicon's atoms and their units: 0.6 s of pint lookups, made once and cached (a warm process's
    constraint set-up, which the course times with the model's construction)."""
    file = _lexicon_file()
    try:
        cached = json.loads(file.read_text())
        if isinstance(cached.get("atoms"), list) and isinstance(cached.get("by_unit"), dict):
            return cached
    except (OSError, ValueError, AttributeError):
        pass
    atoms = _lexicon_atoms()
    by_unit: dict[str, list[str]] = {}
    for atom in atoms:
        key = unit_key(atom)
        if key:
            by_unit.setdefault(key, []).append(atom)
    made = {"atoms": list(atoms), "by_unit": by_unit}
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(made))
        tmp.replace(file)
    except OSError:  # a read-only cache: the next process makes it again
        pass
    return made


def _lexicon_atoms() -> tuple[str, ...]:
    registry()
    atoms: set[str] = set()
    for name, definition in _DEFINED:
        if name.startswith("dataset_") or getattr(definition.converter, "is_logarithmic", False):
            continue
        for spelling in {definition.name, definition.defined_symbol, *definition.aliases} - {None, ""}:
            spelling = spelling.replace("_", " ")
            if not re.fullmatch(r"[A-Za-zµ°][A-Za-z ]*", spelling) or "  " in spelling:
                continue
            atoms.add(spelling)
            if re.fullmatch(r"[a-z][a-z ]{2,}", spelling):
                atoms.add(_plural(spelling))
    for prefixes, units in PREFIXED_NAMES:
        for prefix in prefixes:
            for unit in units:
                atoms.update((prefix + unit, _plural(prefix + unit)))
    for prefixes, units in PREFIXED_SYMBOLS:
        atoms.update(prefix + unit for prefix in prefixes for unit in units)
    atoms.update(SPELLING_ALIASES)
    atoms.update(spelling for spelling in TEMPERATURES if not spelling.startswith("°") or len(spelling) == 2)
    atoms.update({"°C", "°F", "Celsius", "Fahrenheit", "degrees Celsius", "degrees Fahrenheit"})
    atoms.update(atom.replace("gram", "gramme") for atom in list(atoms) if "gram" in atom and "gramme" not in atom)
    atoms.update(atom + "s" for atom in list(atoms) if re.fullmatch(r"[a-z]{2,3}", atom))  # hrs, yrs, lbs
    atoms.update(atom + "." for atom in list(atoms) if re.fullmatch(r"[a-z]{1,4}", atom))
    atoms -= ENGLISH_WORDS - {"in"}
    return tuple(sorted(atom for atom in atoms if resolve_unit(atom) is not None and not _ends_badly(atom)))


def _ends_badly(atom: str) -> bool:
    """Atoms whose last character would merge with what follows them in a form (a digit: "m2" is a power)."""
    return atom[-1].isdigit()
