"""Constrained decoding of the tool form `NUMBER SOURCE -> TARGET`: which tokens may come next.

Two constraints, both the engine's `Constraint` protocol (`allowed(generated)`: the ids that may follow,
[] once the form and its newline are written):
- the lexicon grammar (the default, `prompt.pin_source=false`): NUMBER is one of the question's complete
  quantities (`reader.read`), SOURCE and TARGET any spelling of the unit lexicon (`units.lexicon_atoms`
  with powers, `/` and `per` where the question writes such units, and the question's own spellings), so
  the model chooses the units; the
  solver then accepts only units the question mentions, in the roles it gives them;
- the question's forms (`prompt.pin_source=true`): only forms built from the question's number and its
  own unit strings, the number's unit pinned as SOURCE (`candidate_forms`). Most questions then have one
  form, which a model with random weights writes as well as the real one.

Token paths are the tokenizer's canonical tokenizations of pieces that split where its pre-tokenizer
splits (SmolLM2: byte-level BPE, GPT-2's regex, no prefix space): every unit piece starts with a space
or follows `/`, so a form's tokens are its pieces' tokens (tests/test_constrained.py checks it).
"""

from __future__ import annotations

import math
from functools import lru_cache

from pipeline.reader import Quantity, leading_number, read, render

STOP_TEXT = "\n"
ARROW = " ->"
POWER_WORD_PIECES = (" square", " cubic", " sq", " sq.", " cu", " cu.")
POWER_PIECES = ("^2", "^3", "**2", "**3", "²", "³", "2", "3", " squared", " cubed")
# "a/b" and "a per b"; "miles an hour" only as a question writes it (its own spellings), since "an" takes a time
PER_PIECES = (" per",)


class Node:
    """A trie node over token ids; `end` marks a complete piece."""

    __slots__ = ("next", "end", "_ids")

    def __init__(self) -> None:
        self.next: dict[int, Node] = {}
        self.end = False
        self._ids: list[int] | None = None

    def ids(self) -> list[int]:
        """The ids that continue this node (computed once; callers must not change the list)."""
        if self._ids is None:
            self._ids = list(self.next)
        return self._ids


def trie(paths) -> Node:
    """A trie over token paths (lists of ids), each path's last node marked complete."""
    root = Node()
    for path in paths:
        node = root
        for token in path:
            node = node.next.setdefault(int(token), Node())
        node.end = node is not root
    return root


class FormConstraint:
    """Token paths as a graph of tries: each segment is a trie, and a complete piece of one segment may go
    on into the segments that follow it. A single segment without successors is a plain trie of forms.

    `allowed(generated)` walks the graph along the tokens generated so far, keeping every place the text
    may be at (a piece may be complete and go on: " kilogram" then "s"), and returns the ids that may
    come next: [] once the last segment is complete, or when the tokens left the graph (which greedy
    decoding within `allowed` never does). It is a pure function of `generated`; the node reached by the
    last call is kept, so each step walks one token.
    """

    def __init__(self, token_paths=None, *, segments: list[Node] | None = None, successors=None, start=(0,)):
        if segments is None:
            segments, successors = [trie(token_paths or [])], [()]
        self.segments, self.successors = segments, successors
        self.start = tuple((segment, segments[segment]) for segment in start)
        self._first: dict[int, list[int]] = {}  # segment -> the ids that begin its successors
        self._cache: tuple[int, tuple] = (0, self.start)

    def state(self, generated) -> tuple | None:
        """The places in the graph after `generated`, None when it left the graph."""
        depth, places = self._cache
        if depth > len(generated):  # a new sequence: start over
            depth, places = 0, self.start
        for token in generated[depth:]:
            places = self._step(places, int(token))
            if not places:
                return None
            depth += 1
        self._cache = (depth, places)
        return places

    def _step(self, places: tuple, token: int) -> tuple:
        moved = []
        for segment, node in places:
            child = node.next.get(token)
            if child is not None:
                moved.append((segment, child))
            if node.end:
                for following in self.successors[segment]:
                    child = self.segments[following].next.get(token)
                    if child is not None:
                        moved.append((following, child))
        return tuple(moved)

    def _first_ids(self, segment: int) -> list[int]:
        if segment not in self._first:
            ids: set[int] = set()
            for following in self.successors[segment]:
                ids.update(self.segments[following].next)
            self._first[segment] = list(ids)
        return self._first[segment]

    def allowed(self, generated) -> list[int]:
        """Token ids that may follow `generated` ([] when the form is complete)."""
        places = self.state(generated)
        if not places:
            return []
        if len(places) == 1:
            segment, node = places[0]
            if not node.end:
                return node.ids()
            if not node.next:
                return self._first_ids(segment)
        ids: set[int] = set()
        for segment, node in places:
            ids.update(node.next)
            if node.end:
                ids.update(self._first_ids(segment))
        return list(ids)

    def node(self, generated):
        """The trie node after `generated` in a single-segment constraint (None when it left the trie)."""
        places = self.state(generated)
        return places[0][1] if places else None


# ------------------------------------------------------------------ the question's own forms


def candidate_forms(question: str, pin_source: bool = True) -> list[str]:
    """Every form of the question-limited constraint: one of the question's quantities, then two of its
    unit spellings.

    With `pin_source`, a quantity the question writes with its unit ("Restate 57.85 yrs using days") keeps
    that unit as its SOURCE, as written, and the target is a unit written without a number; where no unit
    follows the number ("from kg to lb for 6 units"), or without `pin_source`, the model decides which
    unit is which. Two spellings of one unit both count ("46 millilitres to cm³" has one answer either
    way). Empty when the question holds no quantity, is ambiguous, or names fewer than two unit spellings.
    """
    reading = read(question)
    spellings = list(dict.fromkeys(m.spelling for m in reading.mentions))
    if not reading.quantities or len(spellings) < 2:
        return []
    targets = list(dict.fromkeys(m.spelling for m in reading.free))
    forms = []
    for quantity in reading.quantities:
        number = render(quantity.value)
        pinned = quantity.unit is not None and pin_source
        sources = [quantity.unit.spelling] if pinned else spellings
        for source in sources:
            for target in targets if pinned and targets else spellings:
                if source != target or (pinned and quantity.parts > 1):
                    forms.append(f"{number} {source} -> {target}")
    return list(dict.fromkeys(forms))


def question_forms_constraint(question: str, tokenizer, pin_source: bool = True) -> FormConstraint | None:
    """The trie of `candidate_forms` and the stop text, or None (decode freely) when there is none."""
    forms = candidate_forms(question, pin_source)
    if not forms:
        return None
    return FormConstraint(tokenizer([form + STOP_TEXT for form in forms], add_special_tokens=False)["input_ids"])


# ------------------------------------------------------------------ the lexicon grammar

# segments of the grammar; a unit is [power word] atom [power] [(/ | per) atom [power]], or one of
# the question's own spellings, once for SOURCE (followed by the arrow) and once for TARGET (by the stop)
NUMBER = 0
_UNIT_SEGMENTS = (
    "power_word", "atom", "dotted", "power", "slash", "per", "after_slash", "after_per", "power2", "own", "offset",
)  # fmt: skip


def _unit_graph(base: int, after: int) -> dict[int, tuple[int, ...]]:
    s = {name: base + i for i, name in enumerate(_UNIT_SEGMENTS)}
    return {
        s["power_word"]: (s["atom"], s["dotted"]),
        s["atom"]: (s["power"], s["slash"], s["per"], after),
        s["dotted"]: (s["per"], after),  # "lb." then "/" would merge into one pre-token
        s["power"]: (s["slash"], s["per"], after),
        s["slash"]: (s["after_slash"],),
        s["per"]: (s["after_per"],),
        s["after_slash"]: (s["power2"], after),
        s["after_per"]: (s["power2"], after),
        s["power2"]: (after,),
        s["own"]: (after,),
        s["offset"]: (after,),  # °C, °F: no power or ratio of a temperature reads as a unit
    }


_SOURCE = 1
_ARROW = _SOURCE + len(_UNIT_SEGMENTS)
_TARGET = _ARROW + 1
_STOP = _TARGET + len(_UNIT_SEGMENTS)
# a quantity the question writes with its unit: its number and then a spelling of that very unit (the question's
# own, or any of the lexicon's for the same unit), then the arrow. The model still writes the source, but cannot
# put another unit there; which unit is asked for (the target) stays its choice among every spelling
_NUMBER_WITH_UNIT = _STOP + 1
_ENTRY = ("power_word", "atom", "dotted", "own", "offset")


@lru_cache(maxsize=4)
def successors(ratios: bool = True, powers: bool = True) -> list[tuple[int, ...]]:
    """The grammar's edges: which segments may follow a complete piece of each. Without `ratios` a unit is
    never `a/b` or `a per b`, without `powers` never squared or cubed: a question that writes no such unit
    asks for none, and a small model offered them goes on writing ("ft" -> "ft/s", "pints per gal")."""
    graph = {NUMBER: tuple(_SOURCE + _UNIT_SEGMENTS.index(n) for n in _ENTRY)}
    graph |= _unit_graph(_SOURCE, _ARROW)
    graph[_ARROW] = tuple(_TARGET + _UNIT_SEGMENTS.index(n) for n in _ENTRY)
    graph |= _unit_graph(_TARGET, _STOP)
    graph[_STOP] = ()
    graph[_NUMBER_WITH_UNIT] = (_ARROW,)
    dropped = set()
    for base in (_SOURCE, _TARGET):
        if not ratios:
            dropped |= {base + _UNIT_SEGMENTS.index(n) for n in ("slash", "per")}
        if not powers:
            dropped |= {base + _UNIT_SEGMENTS.index(n) for n in ("power_word", "power", "power2")}
    return [tuple(s for s in graph[i] if s not in dropped) for i in range(_NUMBER_WITH_UNIT + 1)]


def _shapes(mentions) -> tuple[bool, bool]:
    """Whether the question writes a ratio of units (km/h, miles per hour) and a power (m², cubic feet)."""
    from pipeline.units import resolve_unit

    ratios = powers = False
    for mention in mentions:
        unit = resolve_unit(mention.spelling)
        if unit is None:
            continue
        exponents = list(unit._units.values())
        ratios |= len(exponents) > 1 or any(e < 0 for e in exponents)
        powers |= any(abs(e) > 1 for e in exponents)
    return ratios, powers


def _tokenizer_key(tokenizer) -> tuple:
    probe = " kilometres per hour ->°C\n"
    return (type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer), tuple(tokenizer.encode(
        probe, add_special_tokens=False)))  # fmt: skip


_SHARED: dict[tuple, list[Node | None]] = {}


def lexicon_tries(tokenizer) -> list[Node | None]:
    """The grammar's shared tries for one tokenizer (built once per process: the lexicon's few thousand
    spellings tokenized in one call); the question's number and own spellings are left as None."""
    key = _tokenizer_key(tokenizer)
    if key not in _SHARED:
        _SHARED[key] = _build_tries(tokenizer)
    return _SHARED[key]


def _encode(tokenizer, pieces) -> list[list[int]]:
    pieces = list(pieces)
    return tokenizer(pieces, add_special_tokens=False)["input_ids"] if pieces else []


def _build_tries(tokenizer) -> list[Node | None]:
    from pipeline.units import is_offset, lexicon_atoms

    atoms = lexicon_atoms()
    offset = [a for a in atoms if is_offset(a)]
    atoms = [a for a in atoms if not is_offset(a)]
    plain = [a for a in atoms if not a.endswith(".")]
    dotted = [a for a in atoms if a.endswith(".")]
    after_slash = [a for a in plain if a[0].isalpha()]  # "/°C" would merge into one pre-token
    unit = {
        "power_word": trie(_encode(tokenizer, POWER_WORD_PIECES)),
        "atom": trie(_encode(tokenizer, (" " + a for a in plain))),
        "dotted": trie(_encode(tokenizer, (" " + a for a in dotted))),
        "power": trie(_encode(tokenizer, POWER_PIECES)),
        "slash": trie(_encode(tokenizer, ["/"])),
        "per": trie(_encode(tokenizer, PER_PIECES)),
        "after_slash": trie(_encode(tokenizer, after_slash)),
        "power2": trie(_encode(tokenizer, POWER_PIECES)),
        "own": None,
        "offset": trie(_encode(tokenizer, (" " + a for a in offset))),
    }
    unit["after_per"] = unit["atom"]
    segments: list[Node | None] = [None]
    segments += [unit[name] for name in _UNIT_SEGMENTS]
    segments.append(trie(_encode(tokenizer, [ARROW])))
    segments += [unit[name] for name in _UNIT_SEGMENTS]
    # the form ends with its line or with the end of the turn, which is what a chat model writes after a
    # one-line reply: offered only the newline, it would rather go on with the unit ("ft" -> "ft/s")
    ends = _encode(tokenizer, [STOP_TEXT])
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ends.append([tokenizer.eos_token_id])
    segments.append(trie(ends))
    return segments


@lru_cache(maxsize=1)
def _own_segments() -> tuple[int, int]:
    own = _UNIT_SEGMENTS.index("own")
    return _SOURCE + own, _TARGET + own


def lexicon_constraint(question: str, tokenizer) -> FormConstraint | None:
    """The lexicon grammar for one question: its quantities' numbers, then any unit spellings; None (decode
    freely, and the solver gives no answer) when the question has no quantity or an ambiguous one."""
    reading = read(question)
    if not reading.quantities:
        return None
    from pipeline.solver import _from_to

    # "Convert from acres to square yards for 87 units": the unit written first is the quantity's, as the solver
    # reads it; a number without such a unit leaves the model to say which unit is which
    apart = reading.free[0] if _from_to(reading, question) is not None else None
    bare, with_unit = [], []
    for quantity in reading.quantities:
        texts, unit = _texts(quantity), quantity.unit or apart
        if unit is None:
            bare += texts
        else:
            with_unit += [text + source for text in texts for source in source_spellings(unit)]
    spellings = list(dict.fromkeys(" " + s for m in reading.mentions for s in (m.spelling, m.written) if s))
    segments = list(lexicon_tries(tokenizer))
    segments[NUMBER] = trie(_encode(tokenizer, dict.fromkeys(bare)))
    own = trie(_encode(tokenizer, spellings))
    for segment in _own_segments():
        segments[segment] = own
    segments.append(trie(_encode(tokenizer, dict.fromkeys(with_unit))))
    return FormConstraint(
        segments=segments, successors=successors(*_shapes(reading.mentions)), start=(NUMBER, _NUMBER_WITH_UNIT)
    )


def source_spellings(mention) -> list[str]:
    """The pieces that may follow a quantity's number as its SOURCE: the question's own spellings of its unit
    and every lexicon spelling of the same unit (" kg", " kilograms", ...), each after its space."""
    from pipeline.units import atoms_by_unit, unit_key

    own = [s for s in (mention.spelling, mention.written) if s]
    same = atoms_by_unit().get(unit_key(mention.spelling) or "", ())
    return list(dict.fromkeys(" " + s for s in (*own, *same)))


def form_constraint(question: str, tokenizer, pin_source: bool = False) -> FormConstraint | None:
    """The constraint for one question: the lexicon grammar, or with `pin_source` the question's own forms
    (None: decode freely, when the question gives no quantity)."""
    if pin_source:
        return question_forms_constraint(question, tokenizer, pin_source=True)
    return lexicon_constraint(question, tokenizer)


def quantity_texts(question: str) -> list[str]:
    """The numbers the lexicon grammar lets the model write for `question`: each quantity's value in
    digits (2.25), and as the question writes it where that reads back to the same value (2 1/4, 2,5, seven)."""
    return list(dict.fromkeys(text for quantity in read(question).quantities for text in _texts(quantity)))


def _texts(quantity: Quantity) -> list[str]:
    """One quantity's number in digits, and as the question writes it where that reads back to the same value."""
    texts = [render(quantity.value)]
    written = quantity.written.strip()
    if written and written != texts[0]:
        back = leading_number(written)
        if back and back[1] == len(written) and math.isclose(back[0], quantity.value, rel_tol=1e-9):
            texts.append(written)
    return texts


__all__ = ["FormConstraint", "Quantity", "STOP_TEXT", "candidate_forms", "form_constraint", "lexicon_constraint"]
