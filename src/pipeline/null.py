"""The null model beside every accuracy: random weights, the same config, the same questions.

A constraint or a parser can answer a question without a model: where only one form is allowed, every
token is forced. So an accuracy means little alone. Next to it stands the accuracy of the run's own
architecture and tokenizer with random weights (seeded), run with the same config (prompt, constraint,
generation, backend where it can load random weights) on the same questions: the share the model did
not earn. It is cached per config, question set and source of this package, so it costs seconds once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Config
from pipeline.data import Item

# backends that read a model file of their own and cannot run random weights; the null model then runs on
# `backend=auto` (the engine, or transformers), which decodes the same config
FILE_BACKENDS = ("llamacpp", "openvino", "ctranslate2")
_PACKAGE = Path(__file__).resolve().parent


@dataclass
class NullScore:
    accuracy: float
    answer_rate: float
    forced_share: float
    questions: int
    backend: str
    seconds: float
    cached: bool = False

    def line(self) -> str:
        """One line for the log."""
        forced = "" if self.forced_share != self.forced_share else f", forced share {self.forced_share:.3f}"
        how = "cached" if self.cached else f"{self.seconds:.1f} s"
        return (
            f"null model (random weights, same config, backend={self.backend}): accuracy {self.accuracy:.3f}, "
            f"answer rate {self.answer_rate:.3f}{forced} on {self.questions} questions ({how})"
        )


def null_config(cfg: Config) -> Config:
    """`cfg` with random weights of the same model, only the batched stage, and nothing logged or graded."""
    backend = cfg.backend
    if backend.name in FILE_BACKENDS:
        backend = dataclasses.replace(backend, name="auto")
    stages = dataclasses.replace(
        cfg.stages, single=False, batched=True, grader_loss=False, fidelity=False, null_model=False,
        fresh_model_per_stage=False,
    )  # fmt: skip
    return dataclasses.replace(
        cfg,
        backend=backend,
        model=dataclasses.replace(cfg.model, random_weights=True),
        stages=stages,
        runtime=dataclasses.replace(cfg.runtime, warmup=False),
        tracking=dataclasses.replace(cfg.tracking, enabled=False),
    )


def _source_digest() -> str:
    digest = hashlib.sha1()
    for file in sorted(_PACKAGE.rglob("*.py")):
        digest.update(file.read_bytes())
    return digest.hexdigest()[:12]


def null_key(cfg: Config, items: list[Item]) -> str:
    """What the null model's score depends on: its config, the questions and answers, and this package's code."""
    record = dataclasses.asdict(null_config(cfg))
    for volatile in ("tracking", "debug"):
        record.pop(volatile, None)
    record["stages"] = {k: v for k, v in record["stages"].items() if not k.endswith("_budget_s")}
    record["model"].pop("cache_dir", None)  # where files are cached changes no answer
    text = json.dumps([record, [(i.question, i.answer) for i in items], _source_digest()], sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def null_score(cfg: Config, items: list[Item], cache_dir: Path, log: Callable[[str], None] = print) -> NullScore:
    """The null model's accuracy on `items` with `cfg`, from the cache or measured now (then cached)."""
    file = cache_dir / "null" / f"{null_key(cfg, items)}.json"
    try:
        return NullScore(**{**json.loads(file.read_text()), "cached": True})
    except (OSError, TypeError, ValueError):
        pass
    import gc

    from pipeline.backends import load_backend
    from pipeline.prompts import build_prompt
    from pipeline.runner import make_constraint_for, make_postprocess
    from pipeline.stages import run_batched

    start = time.perf_counter()
    run = null_config(cfg)
    backend, _ = load_backend(run, lambda message: None)
    prompts = [build_prompt(item.question, run.prompt, backend.tokenizer) for item in items]
    backend.set_shared_prefix(prompts)
    stage = run_batched(
        backend, items, prompts, run.dataset.tolerance, run.stages.batched_budget_s, run.stages.micro_batch_size,
        postprocess=make_postprocess(run.prompt), sort_by_length=run.stages.sort_by_length,
        constraint_for=make_constraint_for(run.prompt, backend.tokenizer), progress=False,
    )  # fmt: skip
    score = NullScore(
        stage.accuracy, stage.answer_rate, stage.forced_share, len(items), backend.info().name,
        time.perf_counter() - start,
    )  # fmt: skip
    del backend
    gc.collect()
    from pipeline import cache

    cache.write_text(file, json.dumps({k: v for k, v in dataclasses.asdict(score).items() if k != "cached"}))
    return score
