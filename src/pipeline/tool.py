"""The `tool` prompt strategy: the model rewrites a question as `QUANTITY SOURCE -> TARGET`, pint computes.

A 135M model copies units well but gets factors and arithmetic wrong, so it only does the rewriting
here. The strategy's parts, each its own module:
- `pipeline.units`: the unit lexicon (pint's registry read as prose, case, temperatures);
- `pipeline.reader`: a question's numbers, unit mentions and quantities (compounds summed, ambiguity);
- `pipeline.constraint`: which tokens the model may write (`FormConstraint`, the engine's `Constraint`);
- `pipeline.solver`: parsing the form, checking it against the question, converting with pint.

This module keeps the names the runner and the tests import from one place.
"""

from __future__ import annotations

from pipeline.constraint import (
    STOP_TEXT,
    FormConstraint,
    candidate_forms,
    form_constraint,
    lexicon_constraint,
    quantity_texts,
    question_forms_constraint,
)
from pipeline.reader import Quantity, Reading, read, render
from pipeline.solver import FAILURES, Form, check, convert, parse_form, solve
from pipeline.units import (
    SPELLING_ALIASES,
    UNIT_ALIASES,
    Mention,
    find_mentions,
    lexicon_atoms,
    mentioned_units,
    registry,
    resolve_unit,
    unit_key,
)

__all__ = [
    "FAILURES", "Form", "FormConstraint", "Mention", "Quantity", "Reading", "SPELLING_ALIASES", "STOP_TEXT",
    "UNIT_ALIASES", "candidate_forms", "check", "convert", "find_mentions", "form_constraint", "lexicon_atoms",
    "lexicon_constraint", "mentioned_units", "parse_form", "quantity_texts", "question_forms_constraint", "read",
    "registry", "render", "resolve_unit", "solve", "unit_key",
]  # fmt: skip
