"""One pipeline run: build the model, warm up, run the stages, save each stage's results as soon as it ends."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.config import Config, PromptConfig
from pipeline.data import load_items, select
from pipeline.environment import environment
from pipeline.errors import PipelineError
from pipeline.generation import Generator
from pipeline.models import DTYPE_NAMES, LoadedModel, load_model, resolve_device, resolve_dtype, weight_format
from pipeline.prompts import build_prompt
from pipeline.quantize import weight_bytes
from pipeline.stages import (
    Postprocess,
    Prediction,
    StageInterrupted,
    StageResult,
    keep_output,
    run_batched,
    run_single,
    with_prefix,
)

RESULTS_FILE, PREDICTIONS_FILE = "results.json", "predictions.csv"


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
    prefix_time_s: float = 0.0  # computing the shared prompt prefix's KV cache once
    peak_gpu_memory_mb: float = float("nan")  # CUDA only: the most memory torch held during the stages
    status: str = "running"  # running, finished, or killed (interrupted; the stages done so far are kept)
    stages: list[StageResult] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

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
    """Write results.json and predictions.csv into the run folder (rewritten after every stage)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = output_dir / f".{RESULTS_FILE}.tmp"
    tmp.write_text(json.dumps(result.summary(), indent=2, default=str))
    tmp.replace(output_dir / RESULTS_FILE)
    fields = [f.name for f in dataclasses.fields(Prediction)]
    with open(output_dir / PREDICTIONS_FILE, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for stage in result.stages:
            writer.writerows(dataclasses.asdict(p) for p in stage.predictions)


def make_postprocess(prompt: PromptConfig) -> Postprocess:
    """What turns a model output into the text that is scored, for the prompt strategy."""
    if prompt.style == "tool":
        from pipeline.tool import solve

        return lambda text, question: solve(prompt.response_prefix + text, question)
    return with_prefix(prompt.response_prefix) if prompt.response_prefix else keep_output


def _set_runtime(cfg: Config, device: torch.device) -> None:
    if cfg.runtime.num_threads:
        torch.set_num_threads(cfg.runtime.num_threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.runtime.cudnn_benchmark
    random.seed(cfg.runtime.seed)
    torch.manual_seed(cfg.runtime.seed)


def warm_up(generator: Generator, prompts: list[str], micro_batch_size: int, full: bool = False) -> float:
    """One single and one batched call, so one-time costs (allocation, kernel choice, compilation) stay out of
    the stages. The longest prompts size the caches; `full` decodes the whole token budget in the batched
    call too (needed when compiling, where every new shape is a new compilation)."""
    start = time.perf_counter()
    generator.generate(max(prompts, key=len))
    batch = sorted(prompts, key=len, reverse=True)[:micro_batch_size]
    generator.batched_generate(batch, max_new_tokens=None if full else 2)
    return time.perf_counter() - start


def _load_llamacpp(cfg: Config, log: Callable[[str], None]):
    """The llama.cpp reference on the model's GGUF file, with the same tokenizer for the chat template."""
    from pipeline.llamacpp import LlamaCppGenerator
    from pipeline.models import default_cache_dir, embedded_gguf, gguf_tokenizer

    if cfg.model.source == "embedded":
        gguf = embedded_gguf()
    elif cfg.model.source == "local" and str(cfg.model.path).endswith(".gguf") and Path(cfg.model.path).is_file():
        gguf = Path(cfg.model.path)
    else:
        raise PipelineError(
            "backend=llamacpp needs a GGUF model: model=smollm2-135m or model=local model.path=FILE.gguf"
        )
    log(f"loading {gguf.name} with llama.cpp")
    start = time.perf_counter()
    cache_dir = Path(cfg.model.cache_dir).expanduser() if cfg.model.cache_dir else default_cache_dir()
    tokenizer = gguf_tokenizer(gguf, cache_dir)
    generator = LlamaCppGenerator(gguf, cfg.generation, cfg.runtime.num_threads)
    loaded = LoadedModel(
        None, tokenizer, torch.device("cpu"), torch.float32, "llama.cpp", time.perf_counter() - start, str(gguf)
    )
    return generator, loaded


def _stage_done(result: RunResult, stage: StageResult, output_dir: Path, log: Callable[[str], None]) -> None:
    """Keep a finished stage and write it to the run folder before anything else can fail."""
    result.stages.append(stage)
    save_results(result, output_dir)
    retries = f", {stage.oom_retries} out-of-memory retries" if stage.oom_retries else ""
    log(f"{stage.name} stage: {stage.wall_time_s:.2f} s, accuracy {stage.accuracy:.3f}{retries}")


def run_pipeline(cfg: Config, output_dir: Path, log: Callable[[str], None] = print) -> RunResult:
    """Run everything the config asks for; results land in `output_dir` after each stage."""
    device = resolve_device(cfg.runtime.device)
    dtype = resolve_dtype(cfg.precision.name, device)
    _set_runtime(cfg, device)
    items, warning = select(load_items(cfg.dataset.path), cfg.dataset.num_questions)
    warnings = [warning] if warning else []
    if device.type == "cpu" and dtype == torch.float16:
        warnings.append("fp16 on this CPU is emulated and slow in batches; precision=bf16 or auto is faster here")
    for message in warnings:
        log(f"warning: {message}")

    if cfg.backend.name == "llamacpp":
        generator, loaded = _load_llamacpp(cfg, log)
    else:
        log(
            f"loading model {cfg.model.name} ({DTYPE_NAMES[dtype]}, attention={cfg.attention.implementation}, {device})"
        )
        int8 = cfg.precision.name == "int8"
        loaded = load_model(cfg.model, device, dtype, cfg.attention.implementation, cfg.runtime.seed, int8)
        generator = Generator(loaded.model, loaded.tokenizer, cfg.generation, compile_mode=cfg.runtime.compile)
    log(f"loaded in {loaded.load_time_s:.1f} s from {loaded.source}")
    prompts = [build_prompt(item.question, cfg.prompt, loaded.tokenizer) for item in items]

    llamacpp = cfg.backend.name == "llamacpp"
    result = RunResult(
        dtype="gguf" if llamacpp else DTYPE_NAMES[dtype],
        weight_format=loaded.source.rsplit(".", 2)[-2] if llamacpp else weight_format(cfg.precision.name, dtype),
        weight_bytes=Path(loaded.source).stat().st_size if llamacpp else weight_bytes(loaded.model),
        device="cpu" if llamacpp else str(device),
        attention=loaded.attention,
        model_source=loaded.source,
        load_time_s=loaded.load_time_s,
        warmup_time_s=0.0,
        num_questions=len(items),
        environment=environment(device),
        warnings=warnings,
    )
    grad_context = torch.inference_mode if cfg.runtime.inference_mode else contextlib.nullcontext
    with grad_context():
        result.prefix_time_s = generator.set_shared_prefix(prompts)
        if generator.prefix_ids:
            log(f"shared prompt prefix: {len(generator.prefix_ids)} tokens cached in {result.prefix_time_s:.2f} s")
        if cfg.runtime.warmup:
            full = cfg.runtime.compile != "off"
            result.warmup_time_s = warm_up(generator, prompts, cfg.stages.micro_batch_size, full)
            log(f"warm-up took {result.warmup_time_s:.1f} s")
        overhead_s = result.load_time_s + result.prefix_time_s + result.warmup_time_s
        postprocess = make_postprocess(cfg.prompt)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            if cfg.stages.single:
                stage = run_single(
                    generator,
                    items,
                    prompts,
                    cfg.dataset.tolerance,
                    cfg.stages.single_budget_s,
                    overhead_s,
                    postprocess,
                )
                _stage_done(result, stage, output_dir, log)
            if cfg.stages.batched:
                stage = run_batched(
                    generator,
                    items,
                    prompts,
                    cfg.dataset.tolerance,
                    cfg.stages.batched_budget_s,
                    cfg.stages.micro_batch_size,
                    overhead_s,
                    postprocess=postprocess,
                    sort_by_length=cfg.stages.sort_by_length,
                )
                _stage_done(result, stage, output_dir, log)
        except StageInterrupted as interrupted:
            result.stages.append(interrupted.partial)
            result.status = "killed"
            save_results(result, output_dir)
            log(f"interrupted: {interrupted}; partial results saved in {output_dir}")
            raise
        if device.type == "cuda":
            result.peak_gpu_memory_mb = torch.cuda.max_memory_allocated(device) / 2**20
        result.status = "finished"
        save_results(result, output_dir)
    return result
