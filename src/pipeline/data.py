"""Loading an evaluation set: a JSON list of [question, answer] pairs or {"question", "answer"} objects."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.datagen import DEFAULT_PATH
from pipeline.errors import PipelineError


@dataclass(frozen=True)
class Item:
    question: str
    answer: float
    # extra fields of the item (family, units, ...), kept for per-family reports
    meta: dict = field(default_factory=dict, compare=False)


def _parse_item(raw: object, index: int, source: str) -> Item:
    if isinstance(raw, dict):
        if "question" not in raw or "answer" not in raw:
            raise PipelineError(f"{source}: item {index} lacks a 'question' or 'answer' key: {str(raw)[:80]}")
        question, answer = raw["question"], raw["answer"]
        meta = {k: v for k, v in raw.items() if k not in ("question", "answer")}
    elif isinstance(raw, (list, tuple)) and len(raw) == 2:
        (question, answer), meta = raw, {}
    else:
        raise PipelineError(
            f"{source}: item {index} must be a [question, answer] pair or a "
            f'{{"question": ..., "answer": ...}} object, got: {str(raw)[:80]}'
        )
    if not isinstance(question, str) or not question.strip():
        raise PipelineError(f"{source}: item {index} has an empty or non-text question")
    if isinstance(answer, bool) or not isinstance(answer, (int, float, str)):
        raise PipelineError(f"{source}: item {index} has a non-numeric answer: {answer!r}")
    try:
        value = float(answer)
    except ValueError:
        raise PipelineError(f"{source}: item {index} has a non-numeric answer: {answer!r}") from None
    if not math.isfinite(value):
        raise PipelineError(f"{source}: item {index} has a non-finite answer: {answer!r}")
    return Item(question, value, meta)


def shipped_sets() -> list[str]:
    """Names of the data sets shipped with the package (`dataset.name`)."""
    return sorted(p.stem for p in DEFAULT_PATH.parent.glob("*.json"))


def dataset_file(path: str | Path | None = None, name: str | None = None) -> Path:
    """The file to read: `path` when given, else the shipped set `name` (default: the unit-conversion set)."""
    if path:
        return Path(path).expanduser()
    if not name:
        return DEFAULT_PATH
    file = DEFAULT_PATH.parent / f"{name}.json"
    if not file.is_file():
        raise PipelineError(
            f"dataset.name={name!r} is not a shipped data set; choose one of: {', '.join(shipped_sets())}"
        )
    return file


def load_items(path: str | Path | None = None, name: str | None = None) -> list[Item]:
    """All items of the data set at `path`, else of the shipped set `name` (default: the unit-conversion set)."""
    file = dataset_file(path, name)
    if not file.is_file():
        raise PipelineError(f"dataset file not found: {file}; fix dataset.path or leave it null for the shipped set")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PipelineError(f"dataset file {file} is not valid JSON ({err}); it must be a JSON list") from None
    if not isinstance(raw, list):
        raise PipelineError(f"dataset file {file} must hold a JSON list of items, got {type(raw).__name__}")
    if not raw:
        raise PipelineError(f"dataset file {file} is empty; it needs at least one item")
    return [_parse_item(item, i, str(file)) for i, item in enumerate(raw)]


def select(items: list[Item], n: int) -> tuple[list[Item], str | None]:
    """The first `n` items, and a warning when the set holds fewer (all of them are used then)."""
    if len(items) < n:
        return items, f"dataset holds {len(items)} items, fewer than dataset.num_questions={n}; using all {len(items)}"
    return items[:n], None
