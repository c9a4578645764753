"""The two timed stages: one `generate` call per question, and `batched_generate` over micro-batches."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from tqdm import tqdm

from pipeline.backends import Backend
from pipeline.data import Item
from pipeline.results import Generation, Prediction, StageResult, finish_stage

__all__ = [
    "ConstraintFor",
    "Postprocess",
    "Prediction",
    "StageInterrupted",
    "StageResult",
    "keep_output",
    "run_batched",
    "run_single",
]

# (model output, question) -> (text to score, parsed tool form or "", failure class should the answer be wrong,
# "" for the generic no_answer/wrong_answer); runs inside the timed region
Postprocess = Callable[[str, str], tuple[str, str, str]]
# question -> what limits its generated tokens (None: free); built inside the timed region, as it is a cost
ConstraintFor = Callable[[str], Any]


def keep_output(text: str, question: str) -> tuple[str, str, str]:
    """The default post-processing: score the output as it is."""
    return text, "", ""


def with_prefix(prefix: str) -> Postprocess:
    """Put back the reply's start that the prompt already held (e.g. '<answer>')."""
    return lambda text, question: (prefix + text, "", "")


class StageInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM inside a stage; carries the stage's partial result (the questions done so far)."""

    def __init__(self, partial: StageResult):
        super().__init__(f"{partial.name} stage interrupted after {len(partial.predictions)} questions")
        self.partial = partial


def _is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def forced_by(constraint, token_ids: list[int]) -> bool:
    """Whether `constraint` fully determined `token_ids`: no step along them allowed more than one token."""
    if constraint is None:
        return False
    for step in range(len(token_ids)):
        allowed = constraint.allowed(token_ids[:step])
        if allowed is None or len(allowed) > 1:
            return False
    return True


def _score(
    name: str,
    items: list[Item],
    generations: list[Generation | None],
    postprocess: Postprocess,
    start: float,
    tolerance: float,
    budget_s: float,
    overhead_s: float,
    micro_batch_size: int,
    complete: bool,
    constraints: dict[int, Any] | None = None,
) -> StageResult:
    """The stage result over the questions that have a generation; the one way both stages end, interrupted or not.

    `constraints` (question index -> its constraint, None where it decoded freely) gives each output's forced flag;
    None when the stage ran unconstrained."""
    done = [i for i, g in enumerate(generations) if g is not None]
    kept = [generations[i] for i in done]
    processed = [postprocess(g.text, items[i].question) for i, g in zip(done, kept)]
    wall_time_s = time.perf_counter() - start  # post-processing is part of the stage, as in the course
    forced = None  # measured after the clock stopped: the share is a report, not part of the stage's work
    if constraints is not None:
        forced = [forced_by(constraints.get(i), g.token_ids) for i, g in zip(done, kept)]
    return finish_stage(
        name, [items[i] for i in done], kept, processed, wall_time_s, tolerance, budget_s, overhead_s,
        micro_batch_size, complete, forced,
    )  # fmt: skip


def run_single(
    generator: Backend,
    items: list[Item],
    prompts: list[str],
    tolerance: float,
    budget_s: float,
    overhead_s: float = 0.0,
    postprocess: Postprocess = keep_output,
    constraint_for: ConstraintFor | None = None,
) -> StageResult:
    """One `generate(prompt)` call per question, in a loop, timed as a whole and per call.

    With `constraint_for`, each call gets the constraint built from its question (constrained decoding).
    """
    generations: list[Generation | None] = [None] * len(prompts)
    constraints: dict[int, Any] | None = None if constraint_for is None else {}
    start = time.perf_counter()
    try:
        for index, prompt in enumerate(tqdm(prompts, desc="single", unit="q", leave=False)):
            if constraints is None:
                generations[index] = generator.generate(prompt)
            else:
                constraints[index] = constraint_for(items[index].question)
                generations[index] = generator.generate(prompt, constraint=constraints[index])
    except KeyboardInterrupt:
        args = (tolerance, budget_s, overhead_s, 1, False, constraints)
        raise StageInterrupted(_score("single", items, generations, postprocess, start, *args)) from None
    args = (tolerance, budget_s, overhead_s, 1, True, constraints)
    return _score("single", items, generations, postprocess, start, *args)


def run_batched(
    generator: Backend,
    items: list[Item],
    prompts: list[str],
    tolerance: float,
    budget_s: float,
    micro_batch_size: int,
    overhead_s: float = 0.0,
    postprocess: Postprocess = keep_output,
    sort_by_length: bool = False,
    constraint_for: ConstraintFor | None = None,
    progress: bool = True,
) -> StageResult:
    """`batched_generate` over micro-batches of the prompts; latency is per micro-batch.

    With `sort_by_length`, prompts of similar token length share a micro-batch (less padding to
    compute); generations are put back in data-set order either way. With `constraint_for`, each prompt
    gets the constraint built from its question (once, even when an out-of-memory retry splits its batch).
    """
    start = time.perf_counter()
    order = list(range(len(prompts)))
    if sort_by_length:
        lengths = generator.prompt_lengths(prompts)
        order.sort(key=lambda i: lengths[i])
    generations: list[Generation | None] = [None] * len(prompts)
    constraints: dict[int, Any] = {}  # prompt index -> its constraint, built once
    size, oom_retries, begin = micro_batch_size, 0, 0
    bar = tqdm(total=len(prompts), desc="batched", unit="q", leave=False, disable=not progress)
    try:
        while begin < len(prompts):
            chunk = order[begin : begin + size]
            try:
                if constraint_for is None:
                    outputs = generator.batched_generate([prompts[i] for i in chunk])
                else:
                    for i in chunk:
                        if i not in constraints:
                            constraints[i] = constraint_for(items[i].question)
                    outputs = generator.batched_generate(
                        [prompts[i] for i in chunk], constraints=[constraints[i] for i in chunk]
                    )
            except (torch.OutOfMemoryError, RuntimeError) as error:
                if not _is_out_of_memory(error) or size == 1:
                    raise
                size, oom_retries = max(1, size // 2), oom_retries + 1  # retry the same prompts in smaller batches
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            for index, generation in zip(chunk, outputs):
                generations[index] = generation
            begin += len(chunk)
            bar.update(len(chunk))
    except KeyboardInterrupt:
        args = (tolerance, budget_s, overhead_s, size, False, None if constraint_for is None else constraints)
        partial = _score("batched", items, generations, postprocess, start, *args)
        partial.oom_retries = oom_retries
        raise StageInterrupted(partial) from None
    finally:
        bar.close()
    args = (tolerance, budget_s, overhead_s, size, True, None if constraint_for is None else constraints)
    result = _score("batched", items, generations, postprocess, start, *args)
    result.oom_retries = oom_retries
    return result
