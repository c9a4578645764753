"""The two timed stages: one `generate` call per question, and `batched_generate` over micro-batches."""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from pipeline.data import Item
from pipeline.generation import Generation, Generator
from pipeline.scoring import is_correct, parse_answer, score

# (model output, question) -> (text to score, parsed tool form or ""); runs inside the timed region
Postprocess = Callable[[str, str], tuple[str, str]]


def keep_output(text: str, question: str) -> tuple[str, str]:
    """The default post-processing: score the output as it is."""
    return text, ""


def with_prefix(prefix: str) -> Postprocess:
    """Put back the reply's start that the prompt already held (e.g. '<answer>')."""
    return lambda text, question: (prefix + text, "")


class StageInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM inside a stage; carries the stage's partial result (the questions done so far)."""

    def __init__(self, partial: StageResult):
        super().__init__(f"{partial.name} stage interrupted after {len(partial.predictions)} questions")
        self.partial = partial


def _is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


@dataclass
class Prediction:
    stage: str
    index: int
    question: str
    expected: float
    output: str  # the model's output (with any prompt-held prefix and appended tool answer)
    parsed: float
    correct: bool
    latency_s: float
    num_tokens: int
    form: str = ""  # the tool strategy's parsed `QUANTITY SOURCE -> TARGET`, else empty


@dataclass
class StageResult:
    name: str
    wall_time_s: float
    generated_tokens: int
    tokens_per_s: float
    accuracy: float
    answer_rate: float
    num_questions: int
    budget_s: float
    within_budget: bool
    # the original grader counted model load (and warm-up) in the stage time
    within_budget_with_load: bool
    latency_p50_s: float
    latency_p90_s: float
    latency_max_s: float
    # prefill: mean time to the first token of a call; decode: tokens after the first per second of the rest
    first_token_mean_s: float = float("nan")
    decode_tokens_per_s: float = float("nan")
    micro_batch_size: int = 1
    # times the batched stage ran out of memory and halved its micro-batch
    oom_retries: int = 0
    # false when the stage was interrupted: then it holds the questions done so far
    complete: bool = True
    # accuracy per item family (e.g. mass, time) where the data set names families
    accuracy_by_family: dict[str, float] = field(default_factory=dict)
    predictions: list[Prediction] = field(default_factory=list, repr=False)

    def metrics(self) -> dict[str, float]:
        """Numeric results keyed `<stage>/<name>` (booleans as 0/1); family accuracies `<stage>/accuracy/<family>`."""
        skip = {"name", "predictions", "accuracy_by_family"}
        metrics = {f"{self.name}/{k}": float(v) for k, v in vars(self).items() if k not in skip}
        metrics.update({f"{self.name}/accuracy/{family}": v for family, v in self.accuracy_by_family.items()})
        return metrics


def _by_family(items: list[Item], correct: list[bool]) -> dict[str, float]:
    groups: dict[str, list[bool]] = defaultdict(list)
    for item, ok in zip(items, correct):
        if "family" in item.meta:
            groups[str(item.meta["family"])].append(ok)
    return {family: sum(oks) / len(oks) for family, oks in sorted(groups.items())}


def _finish(
    name: str,
    items: list[Item],
    generations: list[Generation],
    processed: list[tuple[str, str]],
    wall_time_s: float,
    tolerance: float,
    budget_s: float,
    overhead_s: float,
    micro_batch_size: int,
) -> StageResult:
    parsed = [parse_answer(text) for text, _ in processed]
    correct = [is_correct(p, item.answer, tolerance) for p, item in zip(parsed, items)]
    result = score(parsed, [item.answer for item in items], tolerance)
    predictions = [
        Prediction(name, i, item.question, item.answer, text, p, ok, g.latency_s, g.num_tokens, form)
        for i, (item, g, (text, form), p, ok) in enumerate(zip(items, generations, processed, parsed, correct))
    ]
    latencies = np.array([g.latency_s for g in generations]) if generations else np.array([math.nan])
    tokens = sum(g.num_tokens for g in generations)
    # one clock per generate call: the rows of a micro-batch share theirs
    calls = (
        list({(g.latency_s, g.first_token_s): g for g in generations}.values()) if name == "batched" else generations
    )
    decode_time_s = sum(c.latency_s - c.first_token_s for c in calls)
    decode_tokens = sum(max(g.num_tokens - 1, 0) for g in generations)
    return StageResult(
        name=name,
        wall_time_s=wall_time_s,
        generated_tokens=tokens,
        tokens_per_s=tokens / wall_time_s if wall_time_s > 0 else math.nan,
        accuracy=result.accuracy,
        answer_rate=result.answer_rate,
        num_questions=len(items),
        budget_s=budget_s,
        within_budget=wall_time_s <= budget_s,
        within_budget_with_load=wall_time_s + overhead_s <= budget_s,
        latency_p50_s=float(np.percentile(latencies, 50)),
        latency_p90_s=float(np.percentile(latencies, 90)),
        latency_max_s=float(latencies.max()),
        first_token_mean_s=float(np.mean([c.first_token_s for c in calls])) if calls else math.nan,
        decode_tokens_per_s=decode_tokens / decode_time_s if decode_time_s > 0 else math.nan,
        micro_batch_size=micro_batch_size,
        accuracy_by_family=_by_family(items, correct),
        predictions=predictions,
    )


def run_single(
    generator: Generator,
    items: list[Item],
    prompts: list[str],
    tolerance: float,
    budget_s: float,
    overhead_s: float = 0.0,
    postprocess: Postprocess = keep_output,
) -> StageResult:
    """One `generate(prompt)` call per question, in a loop, timed as a whole and per call."""
    generations, processed = [], []
    start = time.perf_counter()
    try:
        for item, prompt in zip(items, tqdm(prompts, desc="single", unit="q", leave=False)):
            generation = generator.generate(prompt)
            generations.append(generation)
            processed.append(postprocess(generation.text, item.question))
    except KeyboardInterrupt:
        done = len(generations)
        partial = _finish(
            "single",
            items[:done],
            generations,
            processed,
            time.perf_counter() - start,
            tolerance,
            budget_s,
            overhead_s,
            1,
        )
        partial.complete = False
        raise StageInterrupted(partial) from None
    wall_time_s = time.perf_counter() - start
    return _finish("single", items, generations, processed, wall_time_s, tolerance, budget_s, overhead_s, 1)


def run_batched(
    generator: Generator,
    items: list[Item],
    prompts: list[str],
    tolerance: float,
    budget_s: float,
    micro_batch_size: int,
    overhead_s: float = 0.0,
    postprocess: Postprocess = keep_output,
    sort_by_length: bool = False,
) -> StageResult:
    """`batched_generate` over micro-batches of the prompts; latency is per micro-batch.

    With `sort_by_length`, prompts of similar token length share a micro-batch (less padding to
    compute); generations are put back in data-set order either way.
    """
    start = time.perf_counter()
    order = list(range(len(prompts)))
    if sort_by_length:
        lengths = [len(ids) for ids in generator.tokenizer(prompts, add_special_tokens=False)["input_ids"]]
        order.sort(key=lambda i: lengths[i])
    generations: list[Generation | None] = [None] * len(prompts)
    size, oom_retries, begin = micro_batch_size, 0, 0
    progress = tqdm(total=len(prompts), desc="batched", unit="q", leave=False)
    try:
        while begin < len(prompts):
            chunk = order[begin : begin + size]
            try:
                outputs = generator.batched_generate([prompts[i] for i in chunk])
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
            progress.update(len(chunk))
    except KeyboardInterrupt:
        done = sorted(i for i, g in enumerate(generations) if g is not None)
        partial_generations = [generations[i] for i in done]
        processed = [postprocess(generations[i].text, items[i].question) for i in done]
        partial = _finish(
            "batched", [items[i] for i in done], partial_generations, processed, time.perf_counter() - start,
            tolerance, budget_s, overhead_s, size,
        )  # fmt: skip
        partial.complete, partial.oom_retries = False, oom_retries
        raise StageInterrupted(partial) from None
    finally:
        progress.close()
    processed = [postprocess(g.text, item.question) for g, item in zip(generations, items)]
    wall_time_s = time.perf_counter() - start
    result = _finish("batched", items, generations, processed, wall_time_s, tolerance, budget_s, overhead_s, size)
    result.oom_retries = oom_retries
    return result
