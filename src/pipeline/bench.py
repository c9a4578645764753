"""Benchmark the backends side by side on the default tool prompt and write docs/BENCHMARKS.md.

    python -m pipeline.bench                          # every row; about 20-25 minutes on 2 idle AVX2 cores
    python -m pipeline.bench --quick                  # smoke run: 1 rep, 8 questions, no prompt rows
    python -m pipeline.bench --only default llamacpp  # any rows, by name (see --help)

Each row runs as `run.py` in its own process (load, warm-up and compilation stay out of the stage times and
are reported on their own); repetitions are interleaved across rows so machine drift hits all alike. The
memory bandwidth is measured on the device the rows run on (CPU RAM, or GPU memory on CUDA) for the
roofline, and the engine's decode step is profiled beside transformers'. The Targets section is issues 10 and 12's
"Done means": each target with its measured value, met or MISSED with the margin, or "not measured" with the
reason when a row it needs is missing.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.backends.llamacpp import available as llamacpp_available
from pipeline.calibrate import SLOWER
from pipeline.environment import PROJECT_ROOT, cpu_kind, cpu_model, git_commit
from pipeline.errors import PipelineError

RUN_PY = PROJECT_ROOT / "run.py"
DEFAULT_OUT = PROJECT_ROOT / "docs" / "BENCHMARKS.md"
DEFAULT_WORK = PROJECT_ROOT / "outputs" / "bench"
PROCESS_TIMEOUT_S = 1800
# every row: no MLflow run, and no course-grader loss pass (it runs after the stages and only lengthens the process)
COMMON_OVERRIDES = ("tracking.enabled=false", "stages.grader_loss=false")


@dataclass(frozen=True)
class Row:
    """One configuration the bench can run: run.py overrides and how the row is compared."""

    name: str
    overrides: tuple[str, ...]
    about: str
    prompt: str = "tool"
    # the row whose time per token this one must not exceed by SLOWER without a warning;
    # "backend": the fp32 row of whichever backend the run used (backend=auto decides at run time)
    fp32_row: str | None = None
    slow: bool = False  # can take minutes per process on AVX2 CPUs: --slow-reps repetitions


TF, T32 = "backend=transformers", "transformers"
STAGES = ("single", "batched")
ROWS: dict[str, Row] = {row.name: row for row in [
    Row("default", (), "no overrides: what `make run` does", fp32_row="backend"),
    Row("default-free", ("prompt.constrained=false",), "the default, the tool form decoded freely (no constraint)",
        fp32_row="backend"),
    Row("engine-fp32", ("backend=engine", "precision=fp32"), "our engine, fp32 weights"),
    Row("engine-int8", ("backend=engine", "precision=int8", "precision.activations=fp32"),
        "our engine, q8 weights, fp32 activations", fp32_row="engine-fp32"),
    Row("engine-q4", ("backend=engine", "precision=q4", "precision.activations=fp32"),
        "our engine, q4 weights, fp32 activations", fp32_row="engine-fp32"),
    Row("engine-q4-x8", ("backend=engine", "precision=q4", "precision.activations=int8"),
        "our engine, q4 weights, int8 activations for one row (llama.cpp's scheme)", fp32_row="engine-fp32"),
    Row("transformers", (TF, "precision=fp32"), "today's default: transformers fp32"),
    Row("transformers-int8", (TF, "precision=int8"), "transformers, int8 weights", fp32_row=T32, slow=True),
    Row("llamacpp", ("backend=llamacpp",), "llama.cpp on the GGUF file: the outside reference"),
    Row("seed_before", ("experiment=seed_before",), "the original case before optimizing", "raw", slow=True),
    Row("seed_after", ("experiment=seed_after",), "the original case's recipe (half precision)", "raw",
        fp32_row="seed_before", slow=True),
    # GPU rows, run only by name (scripts/gpu_check.sh): on a CPU without AVX512-BF16 they are slow or emulated
    Row("transformers-fp16", (TF, "precision=fp16"), "transformers fp16", fp32_row=T32),
    Row("transformers-bf16", (TF, "precision=bf16"), "transformers bf16", fp32_row=T32),
]}  # fmt: skip
SPEED_ROWS = tuple(list(ROWS)[:11])  # what a plain run measures
HOLDOUT = "@holdout"  # an accuracy row on the independent set (dataset=unit_conversion_holdout)
HOLDOUT_OVERRIDES = ("dataset=unit_conversion_holdout",)
# transformers is the reference of token match; the holdout rows answer issue 12 (accuracy on both sets)
ACCURACY_ROWS = (
    "transformers", "default", "default-free", "engine-q4", "engine-int8",
    f"default{HOLDOUT}", f"default-free{HOLDOUT}",
)  # fmt: skip
PROMPTS = ("raw", "instruct", "cot", "tool")
PROMPT_ROWS = tuple(f"prompt-{p}" for p in PROMPTS)
LLAMACPP, TRANSFORMERS, DEFAULT = "llamacpp", "transformers", "default"
# token match is against the greedy fp32 transformers row of the same prompt
MATCH_REFERENCE = {"tool": TRANSFORMERS, "raw": "seed_before"}
FP32_OF_BACKEND = {"engine": "engine-fp32", "transformers": TRANSFORMERS}

# issue 10, "Done means"
TARGET_SINGLE_VS_LLAMACPP, STRETCH_SINGLE_VS_LLAMACPP = 1.0, 1.5
TARGET_BATCHED_VS_LLAMACPP, TARGET_BATCHED_VS_TRANSFORMERS = 3.0, 2.0
TARGET_ROOFLINE_SHARE = 0.50
TARGET_READY_S = 10.0
TARGET_ACCURACY_DROP = 0.01
TARGET_TOKEN_MATCH = 0.95
# issue 12, "Done means": the default tool prompt on both sets, and what its constraint costs
TARGET_ACCURACY, TARGET_ANSWER_RATE = 0.97, 0.995
TARGET_CONSTRAINED_VS_FREE = 1.1
# other processes using more than this share of the cores before the start: the report says the machine was busy
BUSY_SHARE = 0.25
# and on an H100-class GPU, for the 135M model
TARGET_GPU_SINGLE_S, TARGET_GPU_BATCHED_S = 1.0, 0.2


class RowFailed(PipelineError):
    """A row's process failed; the message is the reason shown in the report."""


@dataclass
class Sample:
    """One process's results.json and predictions."""

    results: dict
    outputs: dict[tuple[str, int], str] = field(default_factory=dict)
    process_s: float = math.nan  # the whole process, start to exit


# ---------------------------------------------------------------------------------------------- choosing rows


@dataclass
class Plan:
    speed: list[str]
    accuracy: list[str]
    prompts: list[str]


def plan_rows(only: list[str] | None, skip_accuracy: bool = False, skip_prompts: bool = False) -> Plan:
    """The rows to run: all of a plain run's, or those `only` names (speed, accuracy and prompt rows alike)."""
    known = [*ROWS, *PROMPT_ROWS]
    unknown = [name for name in only or [] if name not in known]
    if unknown:
        raise PipelineError(f"unknown row {', '.join(map(repr, unknown))}; rows are: {', '.join(known)}")
    if only:
        chosen = [n for n in known if n in only]  # the bench's order, whatever the command line's
        speed = [n for n in chosen if n in ROWS]
        accuracy = [n for n in ACCURACY_ROWS if n.removesuffix(HOLDOUT) in only]
        prompts = [n for n in PROMPT_ROWS if n in only]
    else:
        speed, accuracy, prompts = list(SPEED_ROWS), list(ACCURACY_ROWS), list(PROMPT_ROWS)
    return Plan(speed, [] if skip_accuracy else accuracy, [] if skip_accuracy or skip_prompts else prompts)


# ---------------------------------------------------------------------------------------------- running rows


def _reason(done: subprocess.CompletedProcess) -> str:
    """The line that says why a run failed: its `error:` line, else its exception's last line, else its last line."""
    lines = [line.strip() for line in (done.stdout + "\n" + done.stderr).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    errors = errors or [line for line in lines if re.match(r"[\w.]*(Error|Exception|Interrupt)\b", line)]
    last = errors[-1] if errors else (lines[-1] if lines else "no output")
    return f"exit {done.returncode}: {last[:300]}"


def run_config(
    name: str, overrides: list[str], num_questions: int, folder: Path, timeout_s: float = PROCESS_TIMEOUT_S
) -> Sample:
    """Run one configuration in a fresh process and read back what it saved; RowFailed says why it did not."""
    folder.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        str(RUN_PY),
        *overrides,
        f"dataset.num_questions={num_questions}",
        *COMMON_OVERRIDES,
        f"hydra.run.dir={folder}",
    ]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise RowFailed(f"{name}: no result within {timeout_s:.0f} s") from None
    process_s = time.perf_counter() - start
    (folder / "bench.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0 or not (folder / "results.json").is_file():
        raise RowFailed(f"{_reason(done)} (log: {folder / 'bench.log'})")
    results = json.loads((folder / "results.json").read_text())
    with open(folder / "predictions.csv", newline="") as handle:
        outputs = {(row["stage"], int(row["index"])): row["output"] for row in csv.DictReader(handle)}
    return Sample(results, outputs, process_s)


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat; None where there is no such file."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return total - idle, total


def cpu_busy_share(seconds: float = 2.0) -> float:
    """Share of all cores in use over `seconds` (NaN where /proc/stat is missing).

    The 1-minute load average lags: right after another job ends it still reads high, and a job that just
    started reads low; this says what the cores do now.
    """
    before = _cpu_times()
    time.sleep(seconds)
    after = _cpu_times()
    if before is None or after is None or after[1] == before[1]:
        return math.nan
    return (after[0] - before[0]) / (after[1] - before[1])


def measure_read_bandwidth_gb_s(
    threads: int, size_mb: int | None = None, repeats: int = 7, device: str = "cpu"
) -> float:
    """Memory read bandwidth of `device`: the best of `repeats` sums over a buffer far larger than its caches."""
    torch.set_num_threads(threads)
    size_mb = size_mb or (2048 if device == "cuda" else 512)
    buffer = torch.ones(size_mb * 1024 * 1024 // 4, dtype=torch.float32, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    buffer.sum()
    sync()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        buffer.sum()
        sync()
        best = min(best, time.perf_counter() - start)
    return buffer.numel() * 4 / best / 1e9


def token_match_rate(tokenizer, outputs: dict, reference: dict, stage: str = "single") -> float:
    """Share of generated token positions equal to the reference's, over the shorter of the two outputs."""
    equal = compared = 0
    for key, text in outputs.items():
        if key[0] != stage or key not in reference:
            continue
        ours = tokenizer(text, add_special_tokens=False)["input_ids"]
        theirs = tokenizer(reference[key], add_special_tokens=False)["input_ids"]
        length = min(len(ours), len(theirs))
        equal += sum(a == b for a, b in zip(ours[:length], theirs[:length]))
        compared += length
    return equal / compared if compared else math.nan


# ---------------------------------------------------------------------------------------------- statistics


def _stats(values: list[float]) -> tuple[float, float, float]:
    clean = [v for v in values if not math.isnan(v)]
    if not clean:
        return math.nan, math.nan, math.nan
    stdev = statistics.stdev(clean) if len(clean) > 1 else 0.0
    return statistics.median(clean), min(clean), stdev


def _stage(sample: Sample, stage: str, key: str) -> float:
    value = sample.results.get("stages", {}).get(stage, {}).get(key, math.nan)
    return float(value) if value is not None else math.nan


def summarize(name: str, samples: list[Sample], bandwidth_gb_s: float) -> dict:
    """Median, min and sample stddev over repetitions of the figures a row shows.

    Load and warm-up come from the processes after the first, when the caches (dequantized model, calibration,
    built kernel, page cache) are warm: what a user's second run pays.
    """
    first = samples[0].results
    later = samples[1:] or samples
    warnings = sorted({w for s in samples for w in s.results.get("warnings", [])})
    row = {
        "name": name,
        "reps": len(samples),
        "backend": first.get("backend", "transformers"),
        "dtype": first.get("dtype", "?"),
        "weights": first.get("weight_format", "?"),
        "environment": first.get("environment", {}),
        "tags": first.get("tags", {}),
        "warnings": warnings,
        "slower_warning": any("slower" in w.lower() for w in warnings),
        "token_match": math.nan,
    }
    for stage in ("single", "batched"):
        row[f"{stage}_time"] = _stats([_stage(s, stage, "wall_time_s") for s in samples])
        row[f"{stage}_tokens"] = _stage(samples[0], stage, "generated_tokens")
        row[f"{stage}_accuracy"] = _stage(samples[0], stage, "accuracy")
        tokens = row[f"{stage}_tokens"]
        row[f"{stage}_s_per_token"] = row[f"{stage}_time"][0] / tokens if tokens and tokens > 0 else math.nan
    row["first_token_s"] = _stats([_stage(s, "single", "first_token_mean_s") for s in samples])[0]
    row["decode_tokens_per_s"] = _stats([_stage(s, "single", "decode_tokens_per_s") for s in samples])[0]
    row["load_s"] = _stats([float(s.results.get("load_time_s", math.nan)) for s in later])[0]
    row["warmup_s"] = _stats(
        [float(s.results.get("prefix_time_s", 0.0)) + float(s.results.get("warmup_time_s", math.nan)) for s in later]
    )[0]
    stage_s = [
        sum(v for v in (_stage(s, "single", "wall_time_s"), _stage(s, "batched", "wall_time_s")) if not math.isnan(v))
        for s in later
    ]
    row["ready_s"] = _stats([s.process_s - t for s, t in zip(later, stage_s)])[0]  # imports included
    row["ready_from_second_process"] = len(samples) > 1
    row["weight_gb"] = float(first.get("weight_bytes", math.nan)) / 1e9
    row["weight_gb_s"] = row["weight_gb"] * row["decode_tokens_per_s"]
    row["roofline_share"] = row["weight_gb_s"] / bandwidth_gb_s
    return row


def ratio(rows: dict[str, dict], reference: str, name: str, stage: str) -> float:
    """How many times faster row `name` is than `reference` in `stage` (median times); NaN when one is missing."""
    if reference not in rows or name not in rows:
        return math.nan
    return rows[reference][f"{stage}_time"][0] / rows[name][f"{stage}_time"][0]


def fp32_reference(row: dict) -> str | None:
    """The fp32 row of the same backend and prompt that `row` is compared with (None: it is one, or has none)."""
    reference = ROWS[row["name"]].fp32_row if row["name"] in ROWS else None
    if reference == "backend":
        reference = FP32_OF_BACKEND.get(row["backend"])
    return None if reference == row["name"] else reference


def slower_check(rows: dict[str, dict]) -> list[dict]:
    """Each row against the fp32 row of its backend, by time per generated token in the worse of the two stages.

    Per token, because a recipe's token budget may differ from its fp32 reference's (seed_after 20, seed_before
    50). A row more than SLOWER times slower must carry a results.json warning that says "slower".
    """
    checks = []
    for name, row in rows.items():
        reference = fp32_reference(row)
        if reference is None:
            continue
        check = {"name": name, "reference": reference, "warned": row["slower_warning"], "ratio": math.nan, "stage": ""}
        if reference in rows:
            per_stage = {
                stage: row[f"{stage}_s_per_token"] / rows[reference][f"{stage}_s_per_token"]
                for stage in ("single", "batched")
            }
            per_stage = {k: v for k, v in per_stage.items() if not math.isnan(v)}
            if per_stage:
                check["stage"], check["ratio"] = max(per_stage.items(), key=lambda kv: kv[1])
        check["offender"] = check["ratio"] > SLOWER and not check["warned"]
        checks.append(check)
    return checks


# ---------------------------------------------------------------------------------------------- targets


def _verdict(got: float, target: float) -> str:
    return "met" if got >= target else f"MISSED by {100 * (1 - got / target):.0f}%"


def _absent(names: list[str], rows: dict, missing: dict[str, str]) -> str:
    """Why a target cannot be measured ('' when every row it needs is there)."""
    gone = [n for n in names if n not in rows]
    return "; ".join(f"{n}: {missing.get(n, 'not run')}" for n in gone)


def targets(
    rows: dict[str, dict],
    missing: dict[str, str],
    accuracy: dict[str, dict],
    bandwidth_gb_s: float,
    device: str = "cpu",
    profile: Profile | None = None,
) -> list[list[str]]:
    """Issues 10 and 12's Done means: [target, measured value, verdict] for each, on the default row.

    `profile`, the default backend's profiled decode step where there is one, measures the roofline target.
    """
    checks: list[list[str]] = []

    accuracy_missing = {k.removeprefix("accuracy:"): v for k, v in missing.items() if k.startswith("accuracy:")}

    def add(target: str, needs: list[str], table: dict, measure) -> None:
        why = _absent(needs, table, accuracy_missing if table is accuracy else missing)
        checks.append([target, why, "not measured"] if why else [target, *measure()])

    def single_vs_llamacpp():
        got = ratio(rows, LLAMACPP, DEFAULT, "single")
        stretch = "stretch met" if got >= STRETCH_SINGLE_VS_LLAMACPP else "stretch missed"
        verdict = _verdict(got, TARGET_SINGLE_VS_LLAMACPP)
        times = f"{rows[DEFAULT]['single_time'][0]:.2f} s vs {rows[LLAMACPP]['single_time'][0]:.2f} s"
        return f"{got:.2f}x ({times})", f"{verdict}; {stretch} (1.5x)"

    def batched_vs(reference: str, target: float):
        got = ratio(rows, reference, DEFAULT, "batched")
        times = f"{rows[DEFAULT]['batched_time'][0]:.2f} s vs {rows[reference]['batched_time'][0]:.2f} s"
        return f"{got:.2f}x ({times})", _verdict(got, target)

    def roofline():
        row = rows[DEFAULT]
        if profile is not None:
            # one whole step, lm_head included: the stage's tokens/s would count a constrained row's steps,
            # which skip the lm_head, as if they read all the weights
            gb_s = profile.weight_bytes / 1e9 / (profile.step_ms / 1e3)
            got = gb_s / bandwidth_gb_s
            measured = (
                f"{100 * got:.0f}% ({row['weights']} weights: one free decode step, {profile.step_ms:.1f} ms for "
                f"{profile.weight_bytes / 1e6:.0f} MB, {gb_s:.1f} of {bandwidth_gb_s:.1f} GB/s; the stage's tokens "
                f"say {100 * row['roofline_share']:.0f}%, its constrained steps skipping the lm_head)"
            )
            return measured, _verdict(got, TARGET_ROOFLINE_SHARE)
        got = row["roofline_share"]
        measured = (
            f"{100 * got:.0f}% ({row['weights']} weights: {row['weight_gb_s']:.1f} of {bandwidth_gb_s:.1f} GB/s, "
            f"{row['decode_tokens_per_s']:.0f} of {bandwidth_gb_s / row['weight_gb']:.0f} tok/s)"
        )
        return measured, _verdict(got, TARGET_ROOFLINE_SHARE)

    def ready():
        row = rows[DEFAULT]
        got = row["load_s"] + row["warmup_s"]
        which = "" if row["ready_from_second_process"] else "; one process only, after the bench warmed the caches"
        measured = (
            f"{row['load_s']:.1f} s + {row['warmup_s']:.1f} s = {got:.1f} s "
            f"(the whole process less its stages, imports included: {row['ready_s']:.1f} s{which})"
        )
        return measured, "met" if got <= TARGET_READY_S else f"MISSED by {got - TARGET_READY_S:.1f} s"

    def accuracy_drop():
        got, reference = accuracy[DEFAULT]["accuracy"], accuracy[TRANSFORMERS]["accuracy"]
        drop = reference - got
        met = drop <= TARGET_ACCURACY_DROP + 1e-9
        verdict = "met" if met else f"MISSED by {100 * (drop - TARGET_ACCURACY_DROP):.1f} points"
        return f"{got:.3f} vs {reference:.3f} ({100 * (got - reference):+.1f} points)", verdict

    def token_match():
        got = accuracy[DEFAULT]["token_match"]
        return f"{got:.3f}", _verdict(got, TARGET_TOKEN_MATCH)

    def no_silent_slowdown():
        checks_ = slower_check(rows)
        offenders = [c for c in checks_ if c["offender"]]
        unchecked = [c["name"] for c in checks_ if math.isnan(c["ratio"])]
        checked = len(checks_) - len(unchecked)
        note = f"; not measured for {', '.join(unchecked)} (its fp32 row is missing)" if unchecked else ""
        if offenders:
            listed = ", ".join(
                f"{c['name']} ({c['ratio']:.1f}x the time per token of {c['reference']}, {c['stage']}, no warning)"
                for c in offenders
            )
            return f"{len(offenders)} of {checked} rows slower than fp32 without a warning: {listed}{note}", (
                f"MISSED ({len(offenders)} offender{'s' if len(offenders) > 1 else ''})"
            )
        if not checked:
            return f"no row has its fp32 row measured{note}", "not measured"
        warned = [c["name"] for c in checks_ if c["ratio"] > SLOWER]
        said = f"; slower and warned: {', '.join(warned)}" if warned else ""
        return f"{checked} rows checked against their backend's fp32 row{said}{note}", "met"

    add("single stage >= 1.0x llama.cpp (stretch 1.5x)", [DEFAULT, LLAMACPP], rows, single_vs_llamacpp)
    add(
        "batched stage >= 3x llama.cpp's",
        [DEFAULT, LLAMACPP],
        rows,
        lambda: batched_vs(LLAMACPP, TARGET_BATCHED_VS_LLAMACPP),
    )
    add(
        "batched stage >= 2x today's default (transformers fp32)",
        [DEFAULT, TRANSFORMERS],
        rows,
        lambda: batched_vs(TRANSFORMERS, TARGET_BATCHED_VS_TRANSFORMERS),
    )
    add("single-stream decode >= 50% of the roofline of the format used", [DEFAULT], rows, roofline)
    add("a second process's load + warm-up <= 10 s", [DEFAULT], rows, ready)
    add("accuracy within 1 point of transformers fp32", [DEFAULT, TRANSFORMERS], accuracy, accuracy_drop)
    add("token match vs transformers fp32 >= 0.95", [DEFAULT, TRANSFORMERS], accuracy, token_match)
    checks.append(["no row slower than fp32 on this device without a warning", *no_silent_slowdown()])

    def set_accuracy(key: str):
        a = accuracy[key]
        met = a["accuracy"] >= TARGET_ACCURACY and a["answer_rate"] >= TARGET_ANSWER_RATE
        return f"accuracy {a['accuracy']:.3f}, answer rate {a['answer_rate']:.3f}", "met" if met else "MISSED"

    def constrained_vs_free():
        free = "default-free"
        got = {stage: rows[DEFAULT][f"{stage}_time"][0] / rows[free][f"{stage}_time"][0] for stage in STAGES}
        worst = max(got.values())
        times = "; ".join(
            f"{stage} {rows[DEFAULT][f'{stage}_time'][0]:.2f} s vs {rows[free][f'{stage}_time'][0]:.2f} s"
            for stage in STAGES
        )
        return f"{worst:.2f}x at worst ({times})", "met" if worst <= TARGET_CONSTRAINED_VS_FREE else "MISSED"

    for key, label in ((DEFAULT, "shipped"), (f"{DEFAULT}{HOLDOUT}", "holdout")):
        add(f"{label} set: accuracy >= 0.97 and answer rate >= 0.995 (issue 12)", [key], accuracy,
            lambda key=key: set_accuracy(key))  # fmt: skip
    add("constrained stage time <= 1.1x free (issue 12)", [DEFAULT, "default-free"], rows, constrained_vs_free)
    if device == "cuda":
        fastest = min(rows.values(), key=lambda r: r["single_time"][0], default=None)
        if fastest is not None:
            got = fastest["single_time"][0]
            checks.append(
                ["(GPU) 32 single generations <= 1.0 s", f"{got:.2f} s ({fastest['name']})",
                 "met" if got <= TARGET_GPU_SINGLE_S else f"MISSED by {got - TARGET_GPU_SINGLE_S:.2f} s"]
            )  # fmt: skip
            fastest = min(rows.values(), key=lambda r: r["batched_time"][0])
            got = fastest["batched_time"][0]
            checks.append(
                ["(GPU) a batch of 32 <= 0.2 s", f"{got:.3f} s ({fastest['name']})",
                 "met" if got <= TARGET_GPU_BATCHED_S else f"MISSED by {got - TARGET_GPU_BATCHED_S:.3f} s"]
            )  # fmt: skip
    return checks


# ---------------------------------------------------------------------------------------------- profiles


@dataclass
class Profile:
    """Where the time of one single-stream decode step goes."""

    label: str  # what was profiled
    step_ms: float  # median step time without the profiler
    weight_bytes: int  # bytes of weights one step reads
    operators: list[tuple[str, float]]  # top operators (or CUDA kernels) and their share of the profiled time
    weight_kernel_share: float  # share of the weight matmul kernels, all of them together


def _is_weight_kernel(name: str) -> bool:
    """Operators and CUDA kernels that multiply by the weights (not attention's matmuls; the engine's fused
    layer counts whole, its attention included)."""
    lowered = name.lower()
    parts = ("aten::mm", "aten::addmm", "pack_mm", "_linear", "gemm", "gemv", "cutlass", "decoder_layer")
    return any(part in lowered for part in parts)


def _profile_steps(step, steps: int, device: str) -> tuple[float, list[tuple[str, float]], float]:
    """Median step time (ms) unprofiled, then the operators' shares over `steps` profiled steps."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):
        step()
    sync()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync()
    averages = prof.key_averages()
    if device == "cuda":  # the GPU kernels themselves, by device time
        from torch.autograd import DeviceType

        events = [(e.key, e.self_device_time_total) for e in averages if e.device_type == DeviceType.CUDA]
    else:
        events = [(e.key, e.self_cpu_time_total) for e in averages if "::" in e.key]
    total = sum(t for _, t in events) or 1.0
    top = sorted(events, key=lambda kv: kv[1], reverse=True)[:6]
    kernel_share = sum(t for key, t in events if _is_weight_kernel(key)) / total
    return statistics.median(times) * 1e3, [(key, t / total) for key, t in top], kernel_share


def compose(overrides: list[str]):
    """The typed Config run.py would build from `overrides`."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    sys.path.insert(0, str(PROJECT_ROOT))
    from run import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        return OmegaConf.to_object(hydra_compose(config_name="config", overrides=overrides))


def _first_prompt(cfg, tokenizer) -> str:
    from pipeline.data import load_items
    from pipeline.prompts import build_prompt

    return build_prompt(load_items(cfg.dataset.path)[0].question, cfg.prompt, tokenizer)


def engine_profile(overrides: list[str], steps: int = 16) -> tuple[Profile, dict[str, str]]:
    """Profile `Engine.decode_one_token` in the format the config picks; returns it and the backend's tags."""
    from pipeline.backends.engine import EngineBackend
    from pipeline.engine import StopTokens

    cfg = compose(["backend=engine", *overrides])
    backend = EngineBackend(cfg, log=lambda message: None)
    engine = backend.engine
    ids = backend.tokenizer(_first_prompt(cfg, backend.tokenizer), add_special_tokens=False)["input_ids"]
    never = StopTokens(backend.tokenizer, None, [])
    with torch.inference_mode():
        # prefill the prompt and make room for the steps below: they all decode at the prompt's end
        first = engine.generate([ids], 2, never, slots=1)[0].generated[0]
        token, position = torch.tensor([first]), torch.tensor([len(ids)])
        step_ms, operators, kernel_share = _profile_steps(
            lambda: engine.decode_one_token(token, position), steps, "cpu"
        )
    info = backend.info()
    label = f"engine {info.weight_format} weights (`Engine.decode_one_token`, {len(ids)} tokens of context)"
    return Profile(label, step_ms, info.weight_bytes, operators, kernel_share), info.tags


def transformers_profile(overrides: list[str], device: str, steps: int = 16) -> Profile:
    """Profile one transformers forward pass of a single token over a DynamicCache, as `generate` runs it."""
    from transformers import DynamicCache

    from pipeline.backends.hf import TransformersBackend

    cfg = compose(overrides)
    backend = TransformersBackend(cfg, log=lambda message: None)
    model, info = backend.model, backend.info()
    inputs = backend.tokenizer(_first_prompt(cfg, backend.tokenizer), return_tensors="pt")
    ids = inputs["input_ids"].to(model.device)
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        token = model(input_ids=ids, past_key_values=cache).logits[:, -1:].argmax(-1)
        length = ids.shape[1]

        def step():
            model(input_ids=token, past_key_values=cache)
            cache.crop(-1)  # every step decodes at the same position, as in the engine's profile

        step_ms, operators, kernel_share = _profile_steps(step, steps, device)
    label = f"transformers {info.weight_format} on {device} (a `model(...)` call, {length} tokens of context)"
    return Profile(label, step_ms, info.weight_bytes, operators, kernel_share)


def limit_note(profile: Profile, bandwidth_gb_s: float) -> str:
    """The sentence a reader needs: do the weight kernels or the rest of the step bound decoding?"""
    weight_gb = profile.weight_bytes / 1e9
    whole_gb_s = weight_gb / (profile.step_ms / 1e3)
    share = profile.weight_kernel_share
    if share <= 0:
        return f"A step reads {weight_gb:.3f} GB of weights in {profile.step_ms:.1f} ms: {whole_gb_s:.1f} GB/s."
    kernel_gb_s = weight_gb / (share * profile.step_ms / 1e3)
    fused = " (the fused layers, their attention included, and the lm_head)" if any(
        "decoder_layer" in name for name, _ in profile.operators
    ) else ""  # fmt: skip
    of_bandwidth = kernel_gb_s / bandwidth_gb_s
    verdict = (
        "the kernels read at close to the memory limit, so the rest of the step is what is left to win"
        if of_bandwidth >= 0.7
        else "the kernels themselves are well below the memory limit"
    )
    return (
        f"The weight kernels{fused} take {100 * share:.0f}% of a {profile.step_ms:.1f} ms step; reading "
        f"{weight_gb:.3f} GB of weights in that time is {kernel_gb_s:.1f} GB/s, {100 * of_bandwidth:.0f}% of the "
        f"measured {bandwidth_gb_s:.1f} GB/s: {verdict}. The whole step reads at {whole_gb_s:.1f} GB/s "
        f"({100 * whole_gb_s / bandwidth_gb_s:.0f}% of the roofline)."
    )


# ---------------------------------------------------------------------------------------------- rendering


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(stats: tuple[float, float, float]) -> str:
    median, low, stdev = stats
    return f"{median:.2f} ({low:.2f}, ±{stdev:.2f})"


def _x(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}x"


def _num(value: float, digits: int) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def speed_table(rows: dict[str, dict], missing: dict[str, str], order: list[str]) -> str:
    """One line per speed row, in `order`; a missing row shows as such."""
    headers = [
        "row", "backend", "dtype/weights", "single s: median (min, ±sd)", "batched s: median (min, ±sd)",
        "vs llama.cpp single/batched", "vs transformers single/batched", "TTFT s", "decode tok/s",
        "weights GB/s", "% roofline", "load s", "warm-up s", "token match", "accuracy", "slower-than-fp32 warning",
    ]  # fmt: skip
    body = []
    for name in order:
        if name not in rows:
            body.append([name, "missing", *["-"] * (len(headers) - 2)])
            continue
        r = rows[name]
        comparable = ROWS[name].prompt == "tool" if name in ROWS else True
        versus = []
        for reference in (LLAMACPP, TRANSFORMERS):
            pair = [ratio(rows, reference, name, s) if comparable else math.nan for s in ("single", "batched")]
            versus.append("-" if all(math.isnan(v) for v in pair) else f"{_x(pair[0])} / {_x(pair[1])}")
        mark = "" if r["ready_from_second_process"] else "*"
        body.append(
            [
                name, r["backend"], f"{r['dtype']}/{r['weights']}", _fmt(r["single_time"]), _fmt(r["batched_time"]),
                *versus, _num(r["first_token_s"], 3), _num(r["decode_tokens_per_s"], 1),
                _num(r["weight_gb_s"], 1), f"{_num(100 * r['roofline_share'], 0)}%",
                _num(r["load_s"], 1) + mark, _num(r["warmup_s"], 1) + mark, _num(r["token_match"], 3),
                _num(r["single_accuracy"], 3), "yes" if r["slower_warning"] else "no",
            ]
        )  # fmt: skip
    return markdown_table(headers, body)


def parse_calibration(tag: str) -> dict[str, tuple[float, float]]:
    """The calibration tag of a run ('engine:q4 15.6/173 ms, ...') as {candidate: (1-row ms, 32-row ms)}."""
    found = re.findall(r"(\S+?:\S+) ([\d.]+|inf)/([\d.]+|inf) ms", tag or "")
    return {name: (float(one), float(batch)) for name, one, batch in found}


def calibration_table(calibration: dict[str, tuple[float, float]]) -> str:
    """The calibrated step times, each against the fp32 of its backend."""
    body = []
    for name, (one, batch) in calibration.items():
        fp32 = calibration.get(f"{name.split(':', 1)[0]}:fp32")
        ratios = [a / b if b > 0 else math.nan for a, b in zip((one, batch), fp32)] if fp32 else []
        versus = " / ".join(_x(r) for r in ratios) or "-"
        slower = any(r > SLOWER for r in ratios)
        body.append([name, f"{one:.1f}", f"{batch:.1f}", versus + (" (slower)" if slower else "")])
    return markdown_table(["backend:format", "decode step ms (1 row)", "batched step ms (32 rows)",
                           "time vs its fp32 (1 / 32 rows)"], body)  # fmt: skip


KIND_NOTES = {
    "avx2": "AVX2 only: no AVX512 and no AMX, so bf16 matmuls are converted to fp32 and run slower than fp32, "
    "and torch's int8 weight kernel takes a scalar path with fp32 activations",
    "avx512": "AVX512 without BF16: bf16 matmuls are still converted to fp32",
    "avx512_bf16": "AVX512-BF16: bf16 matmuls and torch's int8 kernel with bf16 activations are fast",
    "amx": "AMX: bf16 and int8 matrix tiles, so bf16 and int8 GEMMs are much faster than fp32",
}


@dataclass
class Report:
    """Everything the rendered file says; built by `main`, or by hand in the tests."""

    rows: dict[str, dict]
    missing: dict[str, str]
    order: list[str]
    bandwidth_gb_s: float
    device: str = "cpu"
    cpu_kind: str = "avx2"
    calibration: dict[str, tuple[float, float]] = field(default_factory=dict)
    calibration_source: str = ""
    accuracy: dict[str, dict] = field(default_factory=dict)
    accuracy_questions: int = 256
    prompts: list[dict] = field(default_factory=list)
    profiles: list[Profile] = field(default_factory=list)
    profile_missing: list[str] = field(default_factory=list)
    command: str = "python -m pipeline.bench"
    reps: int = 3
    slow_reps: int = 1
    questions: int = 32
    machine_lines: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    elapsed_min: float = math.nan
    load_at_start: float = math.nan  # 1-minute load average before the bench started anything
    busy_at_start: float = math.nan  # share of the cores other processes used over 2 s before the start
    cores: int = 0


def _default_profile(report: Report) -> Profile | None:
    """The profiled decode step of the backend the default row ran on (engine or transformers), if any."""
    backend = report.rows.get(DEFAULT, {}).get("backend")
    return next((p for p in report.profiles if backend and p.label.startswith(backend)), None)


def _machine_section(report: Report) -> list[str]:
    kind, what = report.cpu_kind, "GPU memory" if report.device == "cuda" else "memory"
    lines = [
        "## Machine",
        "",
        *report.machine_lines,
        f"- measured {what} read bandwidth: {report.bandwidth_gb_s:.1f} GB/s (a sum over a buffer far larger than "
        "the caches, best of 7)",
    ]
    if not math.isnan(report.busy_at_start):
        lines.append(
            f"- CPU in use before the bench started: {100 * report.busy_at_start:.0f}% of {report.cores} cores "
            f"over 2 s (1-minute load average {report.load_at_start:.1f}, which lags by a minute)"
        )
    elif not math.isnan(report.load_at_start):
        load = f"{report.load_at_start:.1f} on {report.cores} cores"
        lines.append(f"- load average (1 minute) before the bench started: {load}")
    busy = report.busy_at_start > BUSY_SHARE if not math.isnan(report.busy_at_start) else (
        report.load_at_start > report.cores / 2
    )  # fmt: skip
    if busy:
        lines += ["", "**The machine was busy**: other work competed with the rows for the cores, so the times "
                      "below are inflated and noisy (a parallel operator waits for a free core); rerun on an idle "
                      "machine before trusting them."]  # fmt: skip
    lines += [
        "",
        f"**CPU kind: {kind}** ({KIND_NOTES.get(kind, 'none of AVX2, AVX512, AMX')}). Advice from one CPU kind "
        "does not carry to another: which weight format and backend is fastest, and whether a knob helps or "
        "hurts, changes with the CPU kind, so rerun this bench on the machine you care about (`precision=auto` "
        "recalibrates on each machine by itself).",
        "",
    ]
    if report.calibration:
        lines += [
            f"What `precision=auto` measured on this CPU ({report.calibration_source}): the linear layers of one "
            "decode step and of one batched step, per backend and weight format.",
            "",
            calibration_table(report.calibration),
            "",
        ]
    else:
        lines += ["No calibration was recorded in this run (the default row did not run the engine).", ""]
    default = report.rows.get(DEFAULT)
    if default:
        rows = default["tags"].get("engine_kernel_rows")
        kernel = f", our kernel up to {rows} rows" if rows else ""
        ran = f"{default['backend']}, {default['dtype']}/{default['weights']}{kernel}"
        lines += [f"The default config ran on: {ran}.", ""]
    return lines


def _speed_section(report: Report) -> list[str]:
    rows, missing = report.rows, report.missing
    slow = [n for n in report.order if n in ROWS and ROWS[n].slow]
    reps = f"{report.reps} interleaved repetition{'s' if report.reps > 1 else ''}"
    if slow and report.slow_reps != report.reps:
        reps += f" ({report.slow_reps} for {', '.join(slow)}, which can take minutes per process on AVX2 CPUs)"
    ceilings = ", ".join(
        f"{n} {report.bandwidth_gb_s / r['weight_gb']:.0f}" for n, r in rows.items() if r["weight_gb"] > 0
    )
    lines = [
        f"## Speed: the default tool prompt, {report.questions} questions, {reps}, each in its own process",
        "",
        "Rows: " + "; ".join(f"`{n}`: {ROWS[n].about}" for n in report.order if n in ROWS) + ".",
        "",
        "Stage times exclude load and warm-up (reported on their own). `vs` columns: how many times faster than "
        "the llama.cpp row and than `transformers` (today's default, fp32), by median stage time; the seed rows "
        "use the raw prompt, so they are not compared. TTFT: mean time to the first token of a single-stage call. "
        "Decode tok/s: single-stage tokens after the first per second. Weights GB/s = weight bytes per token "
        "(the row's own format) x decode tok/s; % roofline divides it by the measured bandwidth (ceilings in "
        f"tok/s: {ceilings}). Load s and warm-up s (shared-prefix cache + warm-up calls) are the median over the "
        "processes after a row's first, when the caches are warm (* : the row ran once, after the bench's profile "
        "had warmed the caches). Token match: greedy tokens equal, position by position, to the `transformers` "
        "row's (the seed rows: to `seed_before`'s). Accuracy: single stage. The warning column: whether the run "
        "said it is slower than fp32 (results.json `warnings`).",
        "",
        speed_table(rows, missing, report.order),
        "",
    ]
    for name in report.order:
        if name in missing:
            state = "missing" if name not in rows else "had a failed repetition"
            lines.append(f"- `{name}` {state}: {missing[name]}")
    for name in report.order:
        for warning in rows.get(name, {}).get("warnings", []):
            lines.append(f"- `{name}` warned: {warning}")
    return lines + [""]


def _accuracy_section(report: Report) -> list[str]:
    if not report.accuracy and not any(n in report.missing for n in ACCURACY_ROWS):
        return []
    body = []
    for name in ACCURACY_ROWS:
        a = report.accuracy.get(name)
        if a is None:
            if f"accuracy:{name}" in report.missing:
                body.append([name, "missing", "-", "-", "-", "-"])
            continue
        row, _, holdout = name.partition("@")
        body.append([row, "holdout" if holdout else "shipped", f"{a['backend']} {a['weights']}", f"{a['accuracy']:.3f}",
                     f"{a['answer_rate']:.3f}", _num(a["token_match"], 3), f"{a['batched_s']:.1f}"])  # fmt: skip
    lines = [
        f"## Accuracy: default tool prompt, first {report.accuracy_questions} questions of each set, batched stage",
        "",
        "shipped: the data set the prompt's examples were written against; holdout: `dataset=unit_conversion_holdout`, "
        "phrasings and spellings written apart from it (token match is measured on the shipped set only).",
        "",
        markdown_table(
            [
                "row",
                "set",
                "backend weights",
                "accuracy",
                "answer rate",
                "token match vs transformers fp32",
                "batched s",
            ],
            body,
        ),  # fmt: skip
        "",
    ]
    for name in ACCURACY_ROWS:
        if f"accuracy:{name}" in report.missing:
            lines.append(f"- `{name}` missing: {report.missing[f'accuracy:{name}']}")
    return lines + [""]


def prompt_table(prompts: list[dict], questions: int) -> str:
    """One row per prompt strategy: accuracy on its accuracy questions, stage times on the speed questions."""
    headers = [
        f"prompt (times: {questions} q)", "accuracy (questions)", "answer rate", "single s", "batched s",
        "tokens single", "worst family",
    ]  # fmt: skip
    body = []
    for p in prompts:
        if "missing" in p:
            body.append([p["prompt"], f"missing: {p['missing']}", *["-"] * 5])
            continue
        families = p["families"]
        worst = min(families.items(), key=lambda kv: kv[1]) if families else ("-", math.nan)
        accuracy = f"{p['accuracy']:.3f} ({p['questions']})"
        body.append([p["prompt"], accuracy, f"{p['answer_rate']:.3f}", _num(p["single_s"], 2),
                     _num(p["batched_s"], 2), _num(p["tokens"], 0), f"{worst[0]} {_num(worst[1], 3)}"])  # fmt: skip
    lines = [markdown_table(headers, body)]
    last = next((p for p in reversed(prompts) if p.get("families")), None)
    if last:
        lines += ["", f"Accuracy by unit family, prompt={last['prompt']}: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in last["families"].items())]  # fmt: skip
    return "\n".join(lines)


def _profile_section(report: Report) -> list[str]:
    lines = ["## What limits single-stream decoding here", ""]
    for i, profile in enumerate(report.profiles):
        if i == 1:
            lines += ["For comparison, the transformers path:", ""]
        lines += [
            f"{profile.label}: {profile.step_ms:.1f} ms per step (median, unprofiled), "
            f"{profile.weight_bytes / 1e6:.0f} MB of weights; shares of the profiled time:",
            "",
            markdown_table(["operator", "share"], [[f"`{k}`", f"{100 * v:.0f}%"] for k, v in profile.operators]),
            "",
            limit_note(profile, report.bandwidth_gb_s),
            "",
        ]
    lines += [f"- not profiled: {why}" for why in report.profile_missing]
    return lines + ([""] if report.profile_missing else [])


def render(report: Report) -> str:
    """The whole BENCHMARKS.md."""
    took = "" if math.isnan(report.elapsed_min) else f" in {report.elapsed_min:.0f} minutes"
    lines = [
        "# Benchmarks",
        "",
        f"Made by `{report.command}` on {time.strftime('%Y-%m-%d %H:%M')}{took} (the file is overwritten by each run).",
        "",
        *_machine_section(report),
        *_speed_section(report),
        *_accuracy_section(report),
    ]
    if report.prompts:
        lines += ["## Prompt strategies (default settings otherwise)", "",
                  "Accuracy on the first questions as counted (tool: the default accuracy row's); times on the "
                  "speed rows' questions.", "",
                  prompt_table(report.prompts, report.questions), ""]  # fmt: skip
    lines += [
        "## Targets (issues 10 and 12, Done means: the default config)",
        "",
        markdown_table(
            ["target", "measured", "verdict"],
            targets(
                report.rows,
                report.missing,
                report.accuracy,
                report.bandwidth_gb_s,
                report.device,
                _default_profile(report),
            ),  # fmt: skip
        ),
        "",
        *_profile_section(report),
    ]
    if report.notes:
        lines += ["## Notes", "", *[f"- {note}" for note in report.notes], ""]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------- main


def _machine_lines(threads: int, device: str) -> list[str]:
    import transformers

    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "none"
    return [
        f"- CPU: {cpu_model()}, {os.cpu_count()} cores, torch threads {threads}; GPU: {gpu}",
        f"- torch {torch.__version__}, transformers {transformers.__version__}, python {sys.version.split()[0]}, "
        f"commit {git_commit()}",
    ]


def _accuracy_record(sample: Sample, tokenizer, reference: Sample | None) -> dict:
    stage = sample.results["stages"]["batched"]
    match = token_match_rate(tokenizer, sample.outputs, reference.outputs, "batched") if reference else math.nan
    return {
        "backend": sample.results.get("backend", "transformers"),
        "weights": sample.results.get("weight_format", "?"),
        "accuracy": float(stage["accuracy"]),
        "answer_rate": float(stage["answer_rate"]),
        "token_match": match,
        "batched_s": float(stage["wall_time_s"]),
    }


def _prompt_record(prompt: str, timed: Sample, scored: Sample) -> dict:
    stage = scored.results["stages"]["batched"]
    return {
        "prompt": prompt,
        "accuracy": float(stage["accuracy"]),
        "questions": int(stage["num_questions"]),
        "answer_rate": float(stage["answer_rate"]),
        "single_s": _stage(timed, "single", "wall_time_s"),
        "batched_s": _stage(timed, "batched", "wall_time_s"),
        "tokens": _stage(timed, "single", "generated_tokens"),
        "families": stage.get("accuracy_by_family") or {},
    }


def run_profiles(model: list[str], device: str) -> tuple[list[Profile], list[str], dict[str, str]]:
    """The engine's decode step (CPU only) and transformers'; a profile that fails is named with its reason."""
    profiles, missing, engine_tags = [], [], {}
    if device == "cpu":
        try:
            profile, engine_tags = engine_profile(model)
            profiles.append(profile)
        except Exception as error:  # a report with a reason beats a crashed bench
            missing.append(f"the engine ({type(error).__name__}: {error})")
    else:
        missing.append("the engine: it runs on the CPU only (backends/engine.py refuses other devices)")
    try:
        overrides = ["backend=transformers", *(["precision=fp32"] if device == "cpu" else []), *model]
        profiles.append(transformers_profile(overrides, device))
    except Exception as error:
        missing.append(f"transformers ({type(error).__name__}: {error})")
    return profiles, missing, engine_tags


def run_speed_rows(names: list[str], args, model: list[str], work: Path, missing: dict[str, str], say):
    """Every speed row, interleaved: each once per round; a row that fails is left out of later rounds."""
    if LLAMACPP in names and not llamacpp_available():
        missing[LLAMACPP] = "llama-cpp-python is not installed (.venv/bin/pip install llama-cpp-python)"
    samples: dict[str, list[Sample]] = {n: [] for n in names}
    reps = {n: args.slow_reps if ROWS[n].slow else args.reps for n in names}
    for round_ in range(max(reps.values(), default=0)):
        for name in names:
            if name in missing or round_ >= reps[name]:
                continue
            try:
                sample = run_config(name, [*ROWS[name].overrides, *model], args.questions, work / name / str(round_))
                samples[name].append(sample)
                say(f"round {round_ + 1}: {name} in {sample.process_s:.0f} s")
            except RowFailed as error:
                missing[name] = str(error)
                say(f"round {round_ + 1}: {name} FAILED: {error}")
        if round_ == 0:
            minutes = sum(reps[n] * s[0].process_s for n, s in samples.items() if s) / 60
            say(f"the speed rows take about {minutes:.0f} minutes in all, by this round's times")
    return samples


def run_prompt_rows(names, args, model, work: Path, samples, accuracy_samples, say) -> list[dict]:
    """Each prompt strategy: stage times on the speed questions, accuracy on the accuracy questions."""
    prompts = []
    for row_name in names:
        prompt = row_name.removeprefix("prompt-")
        overrides = [f"prompt={prompt}", *model]
        try:
            # prompt=tool is the default config: the default rows measured it already
            timed = samples[DEFAULT][0] if prompt == "tool" and samples.get(DEFAULT) else None
            timed = timed or run_config(row_name, overrides, args.questions, work / "prompt" / prompt)
            scored = accuracy_samples.get(DEFAULT) if prompt == "tool" else None
            folder, only_batched = work / "prompt" / f"{prompt}-accuracy", [*overrides, "stages.single=false"]
            scored = scored or run_config(row_name, only_batched, args.prompt_questions, folder)
            prompts.append(_prompt_record(prompt, timed, scored))
            say(f"prompt: {prompt}")
        except RowFailed as error:
            prompts.append({"prompt": prompt, "missing": str(error)})
    return prompts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Benchmark the backends side by side; writes docs/BENCHMARKS.md",
        epilog=f"rows: {', '.join([*ROWS, *PROMPT_ROWS])} (the last two speed rows run only when named)",
    )
    parser.add_argument("--reps", type=int, help="repetitions of each speed row (3; --quick 1)")
    parser.add_argument("--slow-reps", type=int, help="repetitions of the slow rows (1)")
    parser.add_argument("--questions", type=int, help="questions of the speed rows (32; --quick 8)")
    parser.add_argument("--accuracy-questions", type=int, help="questions of the accuracy rows (256; --quick 32)")
    parser.add_argument("--prompt-questions", type=int, help="accuracy questions of the prompt rows but tool (64)")
    parser.add_argument("--only", nargs="+", metavar="ROW", help="rows to run (default: every row but the GPU ones)")
    parser.add_argument("--model", help="model option for every row, e.g. tiny (a small random model, for tests)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 rep, 8 questions, 32 accuracy questions")
    parser.add_argument("--skip-accuracy", action="store_true", help="no accuracy or prompt rows")
    parser.add_argument("--skip-profile", action="store_true")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow (--quick never does)")
    parser.add_argument("--out", type=Path, help=f"default {DEFAULT_OUT} ({DEFAULT_WORK}/BENCHMARKS_quick.md quick)")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="where the rows' run folders go")
    args = parser.parse_args(argv)
    for key, full, quick in (
        ("reps", 3, 1),
        ("slow_reps", 1, 1),
        ("questions", 32, 8),
        ("accuracy_questions", 256, 32),
        ("prompt_questions", 64, 32),
    ):
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    if min(args.reps, args.slow_reps, args.questions, args.accuracy_questions, args.prompt_questions) < 1:
        parser.error("--reps, --slow-reps and the question counts must be at least 1")
    try:
        plan = plan_rows(args.only, args.skip_accuracy, skip_prompts=args.quick)
    except PipelineError as error:
        parser.error(str(error))
    out = args.out or (args.work / "BENCHMARKS_quick.md" if args.quick else DEFAULT_OUT)
    model = [f"model={args.model}"] if args.model else []
    load_at_start, busy_at_start = os.getloadavg()[0], cpu_busy_share()
    began = time.perf_counter()

    def say(message: str) -> None:
        print(f"[{time.perf_counter() - began:6.0f} s] {message}", flush=True)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    threads = torch.get_num_threads()
    bandwidth_gb_s = measure_read_bandwidth_gb_s(threads, device=device)
    say(f"{device} memory read bandwidth: {bandwidth_gb_s:.1f} GB/s ({threads} threads)")

    # profiles first: they load the model the rows load, so every row's process finds the caches warm
    profiles, profile_missing, engine_tags = [], [], {}
    if not args.skip_profile:
        profiles, profile_missing, engine_tags = run_profiles(model, device)
        say(f"decode steps profiled ({len(profiles)} of 2)")
    work = args.work / time.strftime("%Y-%m-%d_%H-%M-%S")
    missing: dict[str, str] = {}
    samples = run_speed_rows(plan.speed, args, model, work, missing, say)

    from pipeline.models import default_cache_dir, embedded_gguf, gguf_tokenizer

    tokenizer = gguf_tokenizer(embedded_gguf(), default_cache_dir())  # the embedded and the tiny model share it
    rows = {n: summarize(n, samples[n], bandwidth_gb_s) for n in plan.speed if samples[n]}
    for name, row in rows.items():
        reference = MATCH_REFERENCE.get(ROWS[name].prompt)
        if reference in rows:
            row["token_match"] = token_match_rate(tokenizer, samples[name][0].outputs, samples[reference][0].outputs)
    accuracy_samples: dict[str, Sample] = {}
    for name in plan.accuracy:
        try:
            holdout = HOLDOUT_OVERRIDES if name.endswith(HOLDOUT) else ()
            overrides = [*ROWS[name.removesuffix(HOLDOUT)].overrides, *holdout, *model, "stages.single=false"]
            accuracy_samples[name] = run_config(name, overrides, args.accuracy_questions, work / "accuracy" / name)
            say(f"accuracy: {name} on {args.accuracy_questions} questions")
        except RowFailed as error:
            missing[f"accuracy:{name}"] = str(error)
            say(f"accuracy: {name} FAILED: {error}")
    reference = accuracy_samples.get(TRANSFORMERS)
    accuracy = {n: _accuracy_record(s, tokenizer, reference) for n, s in accuracy_samples.items()}
    prompts = run_prompt_rows(plan.prompts, args, model, work, samples, accuracy_samples, say)

    default = rows.get(DEFAULT)
    calibration = parse_calibration(default["tags"].get("calibration", "")) if default else {}
    source = "the default run's results.json tags"
    if not calibration and engine_tags:
        calibration, source = parse_calibration(engine_tags.get("calibration", "")), "the cached calibration"
    kind = (default or {}).get("environment", {}).get("cpu_kind") or cpu_kind()
    notes = []
    if any(ROWS[n].slow for n in plan.speed) and args.slow_reps < args.reps:
        notes.append(
            f"The slow rows ran {args.slow_reps} of {args.reps} repetitions to keep the whole bench near 20 minutes "
            "on 2 cores; their spread is not measured (--slow-reps to change)."
        )
    report = Report(
        rows=rows,
        missing=missing,
        order=plan.speed,
        bandwidth_gb_s=bandwidth_gb_s,
        device=device,
        cpu_kind=kind,
        calibration=calibration,
        calibration_source=source,
        accuracy=accuracy,
        accuracy_questions=args.accuracy_questions,
        prompts=prompts,
        profiles=profiles,
        profile_missing=profile_missing,
        command="python -m pipeline.bench" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip(),
        reps=args.reps,
        slow_reps=args.slow_reps,
        questions=args.questions,
        machine_lines=_machine_lines(threads, device),
        notes=notes,
        elapsed_min=(time.perf_counter() - began) / 60,
        load_at_start=load_at_start,
        busy_at_start=busy_at_start,
        cores=os.cpu_count() or 1,
    )
    text = render(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"written to {out}")
    if not (args.quick or args.no_mlflow):
        log_to_mlflow(rows, out)


def log_to_mlflow(rows: dict[str, dict], report: Path) -> None:
    """One MLflow run in experiment 'benchmarks' with every row's medians and the report."""
    try:
        import mlflow
    except ImportError:  # e.g. a lent GPU machine that carries only the core's wheels
        print("mlflow is not installed: the benchmark is not logged to MLflow")
        return

    from pipeline.tracking import default_uri

    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or default_uri(PROJECT_ROOT))
    mlflow.set_experiment("benchmarks")
    with mlflow.start_run(run_name=f"bench {time.strftime('%Y-%m-%d %H:%M')}"):
        for name, row in rows.items():
            metrics = {
                f"{name}/single_time_s_median": row["single_time"][0],
                f"{name}/batched_time_s_median": row["batched_time"][0],
                f"{name}/decode_tokens_per_s": row["decode_tokens_per_s"],
                f"{name}/roofline_share": row["roofline_share"],
            }
            mlflow.log_metrics({k: v for k, v in metrics.items() if not math.isnan(v)})
        mlflow.log_artifact(str(report))


if __name__ == "__main__":
    main()
