"""Result records of a run and the files they live in; imports neither torch nor transformers.

`sync`, `report`, `summary` and the sweep callback read these, so they start in a blink. The
stage arithmetic (latency percentiles, first-token time, decode tokens/s) lives here too: it feeds
every roofline figure, and it is plain numbers in, plain numbers out.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.data import Item
from pipeline.errors import PipelineError
from pipeline.scoring import is_correct, parse_answer, score
from pipeline.stats import wilson

RESULTS_FILE, PREDICTIONS_FILE = "results.json", "predictions.csv"
FAILURES_FILE = "failures.csv"  # the wrong or missing answers with their failure class, beside predictions.csv


@dataclass
class Generation:
    text: str
    num_tokens: int  # generated tokens, up to and including the stop token, no padding
    latency_s: float  # wall time of the call that produced it
    first_token_s: float = float("nan")  # time to the first generated token (prefill) within that call
    # true when the output ran into the token budget without stopping (cut short)
    hit_budget: bool = False
    # the generated token ids (stop token included), as the backend's own tokenizer numbers them: fidelity
    # teacher-forces them in the reference, and token match compares them
    token_ids: list[int] = field(default_factory=list)


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
    hit_budget: bool = False
    # why the answer is wrong or missing ('' when correct): the tool strategy's class (no_form, ambiguous_quantity,
    # unknown_unit, quantity_not_in_question, source_not_quantity_unit, target_not_asked, wrong_conversion), else
    # no_answer or wrong_answer
    failure: str = ""
    # true when the constraint fully determined this output (no step had more than one allowed token)
    forced: bool = False
    # the generated token ids (what fidelity teacher-forces and token match compares)
    token_ids: list[int] = field(default_factory=list)


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
    # outputs that ran into generation.max_new_tokens without stopping
    num_hit_budget: int = 0
    # the course grader's quality loss and points (see pipeline.grader); NaN when not computed
    grader_loss: float = float("nan")
    grader_loss_other_side: float = float("nan")
    grader_points: float = float("nan")
    grader_max_points: float = float("nan")
    # the case time as the course counts it: model construction, warm-up, generation, loss pass
    grader_case_time_s: float = float("nan")
    grader_within_limit: bool = True
    grader_padding_side: str = ""
    grader_loss_model: str = ""  # which model computed the loss (the run's own, or fp32 transformers)
    grader_diagnosis: str = ""
    # accuracy per item family (e.g. mass, time) and per phrasing template where the data set names them
    accuracy_by_family: dict[str, float] = field(default_factory=dict)
    accuracy_by_template: dict[str, float] = field(default_factory=dict)
    # wrong or missing answers per failure class (see Prediction.failure)
    failures: dict[str, int] = field(default_factory=dict)
    # Wilson 95% interval of the accuracy
    accuracy_low: float = float("nan")
    accuracy_high: float = float("nan")
    # the null model's (random weights, same config) accuracy on the same questions; NaN when not computed
    accuracy_null: float = float("nan")
    # share of outputs the constraint fully determined (no step with more than one allowed token); NaN unconstrained
    forced_share: float = float("nan")
    # fidelity against the fp32 reference, teacher-forced along this stage's own sequences (pipeline.fidelity):
    # KL(reference || run) per generated token, its mean with standard error, 99% / 99.9% / max, and top-1 agreement
    kld_mean: float = float("nan")
    kld_stderr: float = float("nan")
    kld_p99: float = float("nan")
    kld_p999: float = float("nan")
    kld_max: float = float("nan")
    top1_agreement: float = float("nan")
    fidelity_tokens: int = 0
    fidelity_reference: str = ""
    # the engine's layer passes during the stage by rows ("32": one pass of 32 rows) and its full lm_head products
    # ("head:5"): the work a roofline is computed from (empty for other backends)
    steps: dict[str, int] = field(default_factory=dict)
    # peak resident memory of the process during the stage (MiB), and torch's on a CUDA GPU
    peak_rss_mb: float = float("nan")
    peak_gpu_memory_mb: float = float("nan")
    predictions: list[Prediction] = field(default_factory=list, repr=False)

    def metrics(self) -> dict[str, float]:
        """Numeric results keyed `<stage>/<name>` (booleans as 0/1); family accuracies `<stage>/accuracy/<family>`,
        template accuracies `<stage>/accuracy_by_template/<template>`, failure counts `<stage>/failures/<class>`."""
        skip = {"name", "predictions", "accuracy_by_family", "accuracy_by_template", "failures", "fidelity_reference",
                "steps"}  # fmt: skip
        metrics = {
            f"{self.name}/{k}": float(v)
            for k, v in vars(self).items()
            if k not in skip and isinstance(v, (int, float, bool)) and not (isinstance(v, float) and math.isnan(v))
        }
        metrics.update({f"{self.name}/accuracy/{family}": v for family, v in self.accuracy_by_family.items()})
        metrics.update({f"{self.name}/accuracy_by_template/{t}": v for t, v in self.accuracy_by_template.items()})
        metrics.update({f"{self.name}/failures/{kind}": float(n) for kind, n in self.failures.items()})
        return metrics


@dataclass
class RunResult:
    dtype: str  # compute dtype
    weight_format: str  # int8 or the compute dtype
    weight_bytes: int  # weight bytes read per decoded token
    device: str
    attention: str
    model_source: str
    load_time_s: float
    warmup_time_s: float
    num_questions: int
    environment: dict[str, str]
    backend: str = "transformers"
    prefix_time_s: float = 0.0  # computing the shared prompt prefix's KV cache once
    peak_gpu_memory_mb: float = float("nan")  # CUDA only: the most memory torch held during the stages
    peak_rss_load_mb: float = float("nan")  # peak resident memory of the process while loading (MiB)
    # seconds from the process's start (interpreter, imports, config) to a loaded, prefixed, warmed-up backend
    ready_s: float = float("nan")
    # ... and to the first stage's start: also the answers' solver and the constraint's grammar loaded (pint's
    # registry and the lexicon's tries, 0.3-0.6 s after the engine is ready): what a timer around the whole run sees
    first_stage_s: float = float("nan")
    # the null model's score beside each stage's accuracy: over how many questions, on which backend
    null_questions: int = 0
    null_backend: str = ""
    # running, finished, killed (interrupted) or failed (an error, in `error`); the stages done so far are kept
    status: str = "running"
    error: str = ""
    stages: list[StageResult] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)  # logged as MLflow tags: backend choices, calibration

    def metrics(self) -> dict[str, float]:
        """Every numeric result: load and warm-up times, then each stage's metrics."""
        metrics = {
            "load_time_s": self.load_time_s,
            "warmup_time_s": self.warmup_time_s,
            "prefix_time_s": self.prefix_time_s,
            "weight_bytes": float(self.weight_bytes),
        }
        if self.peak_gpu_memory_mb == self.peak_gpu_memory_mb:  # not NaN: a CUDA run
            metrics["peak_gpu_memory_mb"] = self.peak_gpu_memory_mb
        for name in ("peak_rss_load_mb", "ready_s", "first_stage_s"):
            value = getattr(self, name)
            if value == value:
                metrics[name] = value
        for stage in self.stages:
            metrics.update(stage.metrics())
        return metrics

    def summary(self) -> dict:
        """The JSON-friendly record saved as results.json (predictions go to their own file)."""
        record = {k: v for k, v in vars(self).items() if k != "stages"}
        record["stages"] = {s.name: {k: v for k, v in vars(s).items() if k != "predictions"} for s in self.stages}
        record["metrics"] = self.metrics()
        return record


def save_results(result: RunResult, output_dir: Path) -> None:
    """Write results.json, predictions.csv and failures.csv into the run folder (rewritten after every stage).

    A folder the disk will not write raises one PipelineError naming it and the fix; each file is written
    beside and renamed, so what an earlier save wrote stays whole."""
    tmp = output_dir / f".{RESULTS_FILE}.tmp"
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(result.summary(), indent=2, default=str))
        tmp.replace(output_dir / RESULTS_FILE)
        for name, keep in ((PREDICTIONS_FILE, lambda p: True), (FAILURES_FILE, lambda p: bool(p.failure))):
            # written beside and renamed, as results.json: a run killed while saving leaves the previous whole file
            tmp = output_dir / f".{name}.tmp"
            with open(tmp, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=[f.name for f in dataclasses.fields(Prediction)])
                writer.writeheader()
                for stage in result.stages:
                    writer.writerows(dataclasses.asdict(p) for p in stage.predictions if keep(p))
            tmp.replace(output_dir / name)
    except OSError as error:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise PipelineError(
            f"could not write the results in {output_dir} ({error.strerror or error}): free disk space there, or "
            "run with hydra.run.dir=<a folder on a disk with room>"
        ) from error


def _accuracy_by(key: str, items: list[Item], correct: list[bool]) -> dict[str, float]:
    """Accuracy per value of the item meta field `key` (family, template), for the items that have it."""
    groups: dict[str, list[bool]] = defaultdict(list)
    for item, ok in zip(items, correct):
        if key in item.meta:
            groups[str(item.meta[key])].append(ok)
    return {value: sum(oks) / len(oks) for value, oks in sorted(groups.items())}


def _failure(parsed: float, correct: bool, explanation: str) -> str:
    """The failure class of one answer: '' when correct, else the post-processing's explanation or a generic one."""
    if correct:
        return ""
    return explanation or ("no_answer" if math.isnan(parsed) else "wrong_answer")


def finish_stage(
    name: str,
    items: list[Item],
    generations: list[Generation],
    processed: list[tuple[str, str, str]],
    wall_time_s: float,
    tolerance: float,
    budget_s: float,
    overhead_s: float,
    micro_batch_size: int,
    complete: bool = True,
    forced: list[bool] | None = None,
) -> StageResult:
    """Score a stage's outputs and compute its timing metrics; `items[i]` produced `generations[i]`.

    `processed[i]` is (text to score, parsed tool form or '', the failure class should the answer be wrong).
    `forced[i]` says whether a constraint fully determined output i (None: the stage ran unconstrained).

    Rows of one batched call share a clock (same latency and first-token time): that call is counted
    once for first-token time and decode time, so decode tokens/s is not divided by the batch size.
    """
    parsed = [parse_answer(text) for text, _, _ in processed]
    correct = [is_correct(p, item.answer, tolerance) for p, item in zip(parsed, items)]
    result = score(parsed, [item.answer for item in items], tolerance)
    predictions = [
        Prediction(
            name, i, item.question, item.answer, text, p, ok, g.latency_s, g.num_tokens, form, g.hit_budget,
            _failure(p, ok, why), bool(forced and forced[i]), list(g.token_ids),
        )
        for i, (item, g, (text, form, why), p, ok) in enumerate(zip(items, generations, processed, parsed, correct))
    ]  # fmt: skip
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
        accuracy_low=wilson(result.num_correct, result.num_items)[0],
        accuracy_high=wilson(result.num_correct, result.num_items)[1],
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
        complete=complete,
        num_hit_budget=sum(g.hit_budget for g in generations),
        accuracy_by_family=_accuracy_by("family", items, correct),
        accuracy_by_template=_accuracy_by("template", items, correct),
        failures=dict(sorted(Counter(p.failure for p in predictions if p.failure).items())),
        forced_share=sum(forced) / len(forced) if forced else math.nan,
        predictions=predictions,
    )
