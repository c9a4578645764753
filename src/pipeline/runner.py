"""One pipeline run: build the backend, warm up, run the stages, save each stage's results as soon as it ends."""

from __future__ import annotations

import contextlib
import gc
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline import memory
from pipeline.backends import Backend, load_backend
from pipeline.config import Config, PromptConfig
from pipeline.data import load_items, select
from pipeline.environment import environment
from pipeline.errors import PipelineError
from pipeline.grader import grade_stage, grader_lines
from pipeline.models import resolve_device
from pipeline.prompts import build_prompt
from pipeline.results import PREDICTIONS_FILE, RESULTS_FILE, RunResult, StageResult, save_results
from pipeline.stages import (
    ConstraintFor,
    Postprocess,
    StageInterrupted,
    keep_output,
    run_batched,
    run_single,
    with_prefix,
)

__all__ = ["PREDICTIONS_FILE", "RESULTS_FILE", "RunResult", "run_pipeline", "save_results", "warm_up"]


def make_postprocess(prompt: PromptConfig) -> Postprocess:
    """What turns a model output into the text that is scored, for the prompt strategy."""
    if prompt.style == "tool":
        from pipeline.tool import registry, solve

        registry()  # pint's registry loads in seconds: before the stages, not inside the first one
        return lambda text, question: solve(prompt.response_prefix + text, question)
    return with_prefix(prompt.response_prefix) if prompt.response_prefix else keep_output


def make_constraint_for(prompt: PromptConfig, tokenizer) -> ConstraintFor | None:
    """What limits the tokens generated for a question (prompt=tool with prompt.constrained), else None."""
    if prompt.style != "tool" or not prompt.constrained:
        return None
    from pipeline.tool import form_constraint

    return lambda question: form_constraint(question, tokenizer, prompt.pin_source)


def _set_runtime(cfg: Config, device: torch.device) -> None:
    if cfg.runtime.num_threads:
        torch.set_num_threads(cfg.runtime.num_threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.runtime.cudnn_benchmark
    random.seed(cfg.runtime.seed)
    torch.manual_seed(cfg.runtime.seed)


def warm_up(generator: Backend, prompts: list[str], micro_batch_size: int, full: bool = False) -> float:
    """One single and one batched call, so one-time costs (allocation, kernel choice, compilation) stay out of
    the stages. The longest prompts size the caches; `full` decodes the whole token budget in the batched
    call too (needed when compiling, where every new shape is a new compilation)."""
    if hasattr(generator, "warm_up"):  # a backend that knows its own one-time costs (the engine)
        return generator.warm_up(prompts, full)
    start = time.perf_counter()
    generator.generate(max(prompts, key=len))
    batch = sorted(prompts, key=len, reverse=True)[:micro_batch_size]
    generator.batched_generate(batch, max_new_tokens=None if full else 2)
    return time.perf_counter() - start


def prepare_backend(
    generator: Backend, prompts: list[str], cfg: Config, log: Callable[[str], None]
) -> tuple[float, float]:
    """Shared prefix, then warm-up as the config asks; returns the seconds of each (prefix, warm-up)."""
    prefix_s = generator.set_shared_prefix(prompts)
    if generator.prefix_ids:
        log(f"shared prompt prefix: {len(generator.prefix_ids)} tokens cached in {prefix_s:.2f} s")
    warmup_s = 0.0
    if cfg.runtime.warmup:
        warmup_s = warm_up(generator, prompts, cfg.stages.micro_batch_size, full=cfg.runtime.compile != "off")
        log(f"warm-up took {warmup_s:.1f} s")
    return prefix_s, warmup_s


def _fresh_backend(cfg: Config, prompts: list[str], log: Callable[[str], None]) -> tuple[Backend, float]:
    """A newly loaded and warmed-up backend, as the course builds a model per case; returns it and those seconds."""
    gc.collect()  # the previous backend's memory, before a second copy is loaded
    generator, _ = load_backend(cfg, log)
    prefix_s, warmup_s = prepare_backend(generator, prompts, cfg, log)
    load_s = generator.info().load_time_s
    log(f"fresh model for the next stage: load {load_s:.1f} s, prefix {prefix_s:.2f} s, warm-up {warmup_s:.1f} s")
    return generator, load_s + prefix_s + warmup_s


def _stage_done(result: RunResult, stage: StageResult, output_dir: Path, log: Callable[[str], None]) -> None:
    """Keep a finished stage and write it to the run folder before any pass that follows it can fail."""
    result.stages.append(stage)
    save_results(result, output_dir)
    retries = f", {stage.oom_retries} out-of-memory retries" if stage.oom_retries else ""
    interval = (
        f" [{stage.accuracy_low:.3f}-{stage.accuracy_high:.3f}]" if stage.accuracy_low == stage.accuracy_low else ""
    )
    forced = "" if stage.forced_share != stage.forced_share else f", forced share {stage.forced_share:.3f}"
    log(
        f"{stage.name} stage: {stage.wall_time_s:.2f} s, accuracy {stage.accuracy:.3f}{interval}{forced}, "
        f"peak memory {stage.peak_rss_mb:.0f} MiB{retries}"
    )


class _Reference:
    """The fp32 reference for fidelity, built on first use (the engine's and llama.cpp's own loss model when it is
    the reference already) and shared by both stages."""

    def __init__(self, cfg: Config, log: Callable[[str], None]):
        self.cfg, self.log, self.reference = cfg, log, None

    def get(self, backend: Backend):
        from pipeline.fidelity import Reference, is_reference

        if self.reference is None:
            model = backend.loss_model()[0]
            if not is_reference(model):
                from pipeline.models import load_model

                start = time.perf_counter()
                model = load_model(
                    self.cfg.model, torch.device("cpu"), torch.float32, "sdpa", self.cfg.runtime.seed
                ).model
                self.log(f"fidelity: loaded the fp32 reference in {time.perf_counter() - start:.1f} s")
            self.reference = Reference(model)
        return self.reference


def measure_fidelity(stage: StageResult, backend: Backend, reference, prompts: list[str], questions: int | None):
    """Fill `stage`'s KLD and top-1 agreement against the reference over its first `questions` sequences."""
    from pipeline.fidelity import compare

    chosen = [p for p in stage.predictions[:questions] if p.token_ids]
    prompt_ids = [backend.encode(prompts[p.index]) for p in chosen]
    continuations = [p.token_ids for p in chosen]
    batched = stage.name == "batched"
    candidate = backend.next_token_logprobs(prompt_ids, continuations, batched)
    result = compare(reference.logprobs(prompt_ids, continuations), candidate, reference.description)
    stage.kld_mean, stage.kld_stderr, stage.kld_p99 = result.kld_mean, result.kld_stderr, result.kld_p99
    stage.kld_p999, stage.kld_max, stage.top1_agreement = result.kld_p999, result.kld_max, result.top1_agreement
    stage.fidelity_tokens, stage.fidelity_reference = result.tokens, result.reference
    return result


def _after_stage(
    stage: StageResult,
    generator: Backend,
    cfg: Config,
    overhead_s: float,
    prompts: list[str],
    reference: _Reference,
    result: RunResult,
    output_dir: Path,
    log: Callable[[str], None],
) -> None:
    """The passes that follow a saved stage: the course's loss, fidelity; the stage is saved again after each."""
    if cfg.stages.grader_loss:
        grade_stage(
            stage, generator, overhead_s, cfg.generation.max_new_tokens, cfg.prompt.style, cfg.stages.grader_questions
        )
        save_results(result, output_dir)
        for line in grader_lines(stage):
            log(line)
    if cfg.stages.fidelity:
        start = time.perf_counter()
        try:
            measured = measure_fidelity(
                stage, generator, reference.get(generator), prompts, cfg.stages.fidelity_questions
            )
        except NotImplementedError as missing:
            log(f"{stage.name} fidelity: not measured ({missing})")
        else:
            log(f"{stage.name} fidelity: {measured.line()} ({time.perf_counter() - start:.1f} s)")
        save_results(result, output_dir)


def run_pipeline(
    cfg: Config,
    output_dir: Path,
    log: Callable[[str], None] = print,
    before_stages: Callable[[], None] | None = None,
) -> RunResult:
    """Run everything the config asks for; results land in `output_dir` after each stage and after each pass.

    `before_stages` runs once the engine is ready, before the first stage is timed (run.py waits there for
    the MLflow run its tracking agent opens meanwhile); its time counts in `first_stage_s`, not in `ready_s`.
    """
    device = resolve_device(cfg.runtime.device)
    _set_runtime(cfg, device)
    items, warning = select(load_items(cfg.dataset.path, cfg.dataset.name), cfg.dataset.num_questions)
    warnings = [warning] if warning else []
    memory.reset_peak()
    generator, backend_warnings = load_backend(cfg, log)
    peak_rss_load_mb = memory.peak_rss_mb()
    warnings += backend_warnings
    for message in warnings:
        log(f"warning: {message}")
    info = generator.info()
    log(f"loaded in {info.load_time_s:.1f} s from {info.source} (peak memory {peak_rss_load_mb:.0f} MiB)")
    prompts = [build_prompt(item.question, cfg.prompt, generator.tokenizer) for item in items]

    result = RunResult(
        dtype=info.dtype,
        weight_format=info.weight_format,
        weight_bytes=info.weight_bytes,
        device=info.device,
        attention=info.attention,
        model_source=info.source,
        load_time_s=info.load_time_s,
        warmup_time_s=0.0,
        num_questions=len(items),
        environment=environment(device),
        backend=info.name,
        peak_rss_load_mb=peak_rss_load_mb,
        tags={"backend": info.name, "weight_format": info.weight_format, **info.tags},
        warnings=warnings,
    )
    reference = _Reference(cfg, log)
    grad_context = torch.inference_mode if cfg.runtime.inference_mode else contextlib.nullcontext
    with grad_context():
        result.prefix_time_s, result.warmup_time_s = prepare_backend(generator, prompts, cfg, log)
        result.ready_s = memory.seconds_since_start()
        postprocess = make_postprocess(cfg.prompt)
        constraint_for = make_constraint_for(cfg.prompt, generator.tokenizer)
        if not getattr(generator, "applies_constraints", True):
            constraint_for = None  # a backend that decodes freely whatever is asked (it warned at load): a free stage
        if constraint_for is not None and items:
            # the unit lexicon (pint's registry) loads on first use, 0.3 s: a set-up cost like loading the
            # model, counted in the warm-up rather than in the first question of the single stage
            start = time.perf_counter()
            constraint_for(items[0].question)
            result.warmup_time_s += time.perf_counter() - start
        if before_stages is not None:
            before_stages()
        result.first_stage_s = memory.seconds_since_start()
        overhead_s = result.load_time_s + result.prefix_time_s + result.warmup_time_s
        try:
            if cfg.stages.single:
                stage = _timed_stage(
                    device,
                    lambda: run_single(
                        generator, items, prompts, cfg.dataset.tolerance, cfg.stages.single_budget_s, overhead_s,
                        postprocess, constraint_for,
                    ),
                    generator,
                )  # fmt: skip
                _stage_done(result, stage, output_dir, log)
                _after_stage(stage, generator, cfg, overhead_s, prompts, reference, result, output_dir, log)
            if cfg.stages.batched:
                if cfg.stages.single and cfg.stages.fresh_model_per_stage:
                    generator = None  # free the previous model first, as a new course case would
                    reference = _Reference(cfg, log)
                    generator, overhead_s = _fresh_backend(cfg, prompts, log)
                stage = _timed_stage(
                    device,
                    lambda: run_batched(
                        generator, items, prompts, cfg.dataset.tolerance, cfg.stages.batched_budget_s,
                        cfg.stages.micro_batch_size, overhead_s, postprocess=postprocess,
                        sort_by_length=cfg.stages.sort_by_length, constraint_for=constraint_for,
                    ),
                    generator,
                )  # fmt: skip
                _stage_done(result, stage, output_dir, log)
                _after_stage(stage, generator, cfg, overhead_s, prompts, reference, result, output_dir, log)
            reference = None  # the reference model's memory, before the null model's
            if cfg.stages.null_model and result.stages:
                _null_model(cfg, items, result, output_dir, log)
        except StageInterrupted as interrupted:
            result.stages.append(interrupted.partial)
            result.status = "killed"
            save_results(result, output_dir)
            log(f"interrupted: {interrupted}; partial results saved in {output_dir}")
            raise
        except KeyboardInterrupt:
            # after a stage (its loss pass, fidelity, the null model): every stage is saved as it was at that moment
            result.status = "killed"
            save_results(result, output_dir)
            log(f"interrupted between stages; the finished stages are saved in {output_dir}")
            raise
        except Exception as error:
            # a stage or a pass after one failed: what finished is kept, marked failed with the error, and said
            result.status, result.error = "failed", f"{type(error).__name__}: {error}"[:1000]
            try:
                save_results(result, output_dir)
            except PipelineError as unsaved:  # the folder itself cannot be written: say so, raise the cause
                log(f"error: {unsaved}")
            else:
                if result.stages:
                    done = " and ".join(stage.name for stage in result.stages)
                    log(f"failed after the {done} stage: its results are saved in {output_dir} (status failed)")
            raise
        gpu = [
            stage.peak_gpu_memory_mb for stage in result.stages if stage.peak_gpu_memory_mb == stage.peak_gpu_memory_mb
        ]
        result.peak_gpu_memory_mb = max(gpu, default=float("nan"))
        result.status = "finished"
        save_results(result, output_dir)
    return result


def _timed_stage(device: torch.device, run: Callable[[], StageResult], generator: Backend) -> StageResult:
    """Run one stage with its own peak memory (the process's resident set, and torch's on a GPU) and, on the
    engine, its count of layer passes by rows."""
    memory.reset_peak()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    engine = getattr(generator, "engine", None)
    before = dict(engine.steps) if engine is not None else {}
    stage = run()
    if engine is not None:
        stage.steps = {k: v - before.get(k, 0) for k, v in engine.steps.items() if v - before.get(k, 0)}
    stage.peak_rss_mb = memory.peak_rss_mb()
    if device.type == "cuda":
        stage.peak_gpu_memory_mb = torch.cuda.max_memory_allocated(device) / 2**20
    return stage


def _null_model(cfg: Config, items, result: RunResult, output_dir: Path, log: Callable[[str], None]) -> None:
    """The null model's accuracy beside each stage's (random weights, same config; cached)."""
    from pipeline.models import model_cache_dir
    from pipeline.null import null_score

    gc.collect()
    chosen = items[: cfg.stages.null_questions] if cfg.stages.null_questions else items
    score = null_score(cfg, chosen, model_cache_dir(cfg.model), log)
    log(score.line())
    for stage in result.stages:
        stage.accuracy_null = score.accuracy
    result.null_questions, result.null_backend = score.questions, score.backend
    save_results(result, output_dir)
