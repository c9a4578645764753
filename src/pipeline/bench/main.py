"""The bench command: measure the machine, run the rows in interleaved rounds, the accuracy runs and the ready
times, judge the targets, write the markdown."""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from pipeline.bench import machine as measure
from pipeline.bench.judge import all_targets
from pipeline.bench.report import Report, render
from pipeline.bench.rows import ACCURACY_QUESTIONS, ROWS, SETS, STRATEGIES
from pipeline.bench.run import COMMON, RowFailed, Sample, run_row
from pipeline.environment import PROJECT_ROOT, cpu_model, git_commit
from pipeline.errors import PipelineError

DEFAULT_OUT = PROJECT_ROOT / "docs" / "BENCHMARKS.md"
DEFAULT_WORK = PROJECT_ROOT / "outputs" / "bench"
# the one-question warm runs that measure what MLflow costs a run: (kind, what goes after the overrides)
TRACKING_KINDS = (
    ("untracked", COMMON),
    ("tracked_new", ("tracking.enabled=true", "tracking.uri={uri}", "stages.grader_loss=false")),
    ("tracked", ("tracking.enabled=true", "tracking.uri={uri}", "stages.grader_loss=false")),
)


def default_out(kind: str, first: Path = DEFAULT_OUT) -> Path:
    """`first`, unless it holds another CPU kind's report: then BENCHMARKS_<kind>.md beside it, so that a bench on
    one kind never overwrites another's figures (which could then be read as this kind's). `kind` is as
    `cpu.current().describe()` gives it, e.g. 'avx2' or 'avx2 (forced; the CPU is avx512_bf16)'."""
    if not first.is_file():
        return first
    stated = re.search(r"\*\*CPU kind: ([^*]+)\*\*", first.read_text(errors="replace"))
    if stated is None or stated.group(1).strip() == kind:
        return first
    name = re.sub(r"[^A-Za-z0-9]+", "_", kind).strip("_")
    return first.with_name(f"{first.stem}_{name}{first.suffix}")


def plan(only: list[str] | None) -> list[str]:
    """The speed rows to run, in order; an unknown name is one error naming the valid ones."""
    if not only:
        return list(ROWS)
    unknown = [name for name in only if name not in ROWS]
    if unknown:
        raise PipelineError(f"unknown bench row {unknown[0]!r}; choose from: {', '.join(ROWS)}")
    return [name for name in ROWS if name in only]


def _choices(sample: Sample) -> str:
    tags = sample.results.get("tags", {})
    keys = ("backend", "weight_format", "activations", "engine_kernel_rows", "tiles", "tile_rows", "gemm",
            "prefix_attention", "jump_forward", "kernel")  # fmt: skip
    return ", ".join(f"{key} {tags[key]}" for key in keys if key in tags)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Benchmark the rows side by side; writes docs/BENCHMARKS.md")
    parser.add_argument("--reps", type=int, help="interleaved rounds of the speed rows (3; --quick 1)")
    parser.add_argument("--questions", type=int, help="questions per speed row (32; --quick 4)")
    parser.add_argument(
        "--accuracy-questions", type=int, help=f"questions per accuracy run ({ACCURACY_QUESTIONS}; --quick 8)"
    )
    parser.add_argument("--only", nargs="+", metavar="ROW", help=f"speed rows to run (default all: {', '.join(ROWS)})")
    parser.add_argument("--model", help="model option for every row, e.g. tiny (a small random model, for tests)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round, 4 questions, 8 accuracy questions")
    parser.add_argument("--skip-accuracy", action="store_true", help="no 256-question accuracy runs")
    parser.add_argument("--skip-ready", action="store_true", help="no cold ready-time run")
    parser.add_argument("--out", type=Path, help=f"default {DEFAULT_OUT}, or docs/BENCHMARKS_<kind>.md where that file "
                        f"states another CPU kind ({DEFAULT_WORK}/BENCHMARKS_quick.md quick)")  # fmt: skip
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="where the rows' run folders go")
    args = parser.parse_args(argv)
    for key, full, quick in (("reps", 3, 1), ("questions", 32, 4), ("accuracy_questions", ACCURACY_QUESTIONS, 8)):
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    if min(args.reps, args.questions, args.accuracy_questions) < 1:
        parser.error("--reps and the question counts must be at least 1")
    try:
        names = plan(args.only)
    except PipelineError as error:
        parser.error(str(error))
    from pipeline import cpu

    out = args.out or (args.work / "BENCHMARKS_quick.md" if args.quick else default_out(cpu.current().describe()))
    model = [f"model={args.model}"] if args.model else []
    began = time.perf_counter()

    def say(message: str) -> None:
        print(f"[{time.perf_counter() - began:6.0f} s] {message}", flush=True)

    from pipeline import cpu

    facts = {
        "cpu": cpu_model(), "kind": cpu.current().describe(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "busy_before": measure.cpu_busy_share(),
        "bandwidth_gb_s": measure.read_bandwidth_gb_s(),
        "gemm_fp32_gflop_s": measure.gemm_gflop_s(torch.float32),
        "gemm_bf16_gflop_s": measure.gemm_gflop_s(torch.bfloat16),
        "int8_gop_s": measure.int8_gop_s(),
    }  # fmt: skip
    say(f"CPU kind {facts['kind']}; read {facts['bandwidth_gb_s']:.1f} GB/s; GEMM fp32 "
        f"{facts['gemm_fp32_gflop_s']:.0f}, bf16 {facts['gemm_bf16_gflop_s']:.0f} GFLOP/s, int8 "
        f"{facts['int8_gop_s']:.0f} GOP/s; "
        f"cores busy {facts['busy_before']:.0%}")  # fmt: skip

    missing: dict[str, str] = {}
    runnable = []
    for name in names:
        needs = ROWS[name].needs
        if needs and importlib.util.find_spec(needs) is None:
            missing[name] = f"{needs} is not installed (pip install -e '.[peers]'; .ci/run installs it)"
        else:
            runnable.append(name)
    rows: dict[str, list[Sample]] = {}
    # one untimed process of the default first: it fills what a first run fills (the calibration, the packed
    # weights, the prefix, the lexicon), so that round 1's rows find the caches warm like the later ones (a
    # calibration measured inside round 1 once made one warm ready time 22.7 s among 3.6 and 3.8)
    try:
        run_row([*model, "dataset.num_questions=1", "stages.batched=false", "stages.fidelity=false",
                 "stages.null_model=false"], args.work / "prime")  # fmt: skip
    except RowFailed as failure:
        say(f"priming run failed ({failure}); round 1 fills the caches")
    for rep in range(args.reps):
        order = runnable[rep % len(runnable) :] + runnable[: rep % len(runnable)] if runnable else []
        for name in order:
            if name in missing:
                continue
            # what is measured once (fidelity, the null model) in the first round only: later rounds are times
            once = [] if rep == 0 else ["stages.fidelity=false", "stages.null_model=false"]
            overrides = [*ROWS[name].overrides, *model, f"dataset.num_questions={args.questions}", *once]
            try:
                sample = run_row(overrides, args.work / f"round{rep}" / name)
            except RowFailed as failure:
                missing[name] = str(failure)
                rows.pop(name, None)
                say(f"{name}: FAILED {failure}")
                continue
            rows.setdefault(name, []).append(sample)
            say(f"round {rep + 1}: {name} single {sample.stage('single', 'wall_time_s'):.2f} s, "
                f"batched {sample.stage('batched', 'wall_time_s'):.2f} s")  # fmt: skip

    accuracy: dict[str, dict[str, tuple[int, int, int, int]]] = {}
    accuracy_extra: dict[str, dict[str, dict]] = {}
    if not args.skip_accuracy:
        for strategy in STRATEGIES:
            for set_name, set_overrides in SETS.items():
                overrides = [*strategy.overrides, *set_overrides, *model,
                             f"dataset.num_questions={args.accuracy_questions}", "stages.single=false",
                             "stages.fidelity=false", "stages.null_questions=null"]  # fmt: skip
                try:
                    sample = run_row(overrides, args.work / "accuracy" / f"{strategy.name}-{set_name}")
                except RowFailed as failure:
                    missing[f"accuracy {strategy.name} {set_name}"] = str(failure)
                    continue
                n = int(sample.stage("batched", "num_questions"))
                correct = sum(p["correct"] for k, p in sample.predictions.items() if k[0] == "batched")
                null = sample.stage("batched", "accuracy_null")
                null_n = int(sample.results.get("null_questions") or 0)
                if math.isnan(null):
                    null, null_n = 0.0, 0
                accuracy.setdefault(strategy.name, {})[set_name] = (correct, n, round(null * null_n), null_n)
                accuracy_extra.setdefault(strategy.name, {})[set_name] = {
                    "forced_share": sample.stage("batched", "forced_share"),
                    "answer_rate": sample.stage("batched", "answer_rate"),
                    "seconds": sample.stage("batched", "wall_time_s"),
                }
                say(f"accuracy {strategy.name} on {set_name}: {correct}/{n}, null {null:.3f}")

    ready: dict[str, list[float]] = {
        "warm": [s.results.get("ready_s", math.nan) for s in rows.get("default", [])],
        # the same processes to their first stage: the solver and the constraint's grammar loaded too
        "warm_first_stage": [s.results.get("first_stage_s", math.nan) for s in rows.get("default", [])],
        "cold": [],  # an empty model cache: the first run packs, calibrates, extracts the tokenizer
        "installed": [],  # the first process after `make venv`, which prepares them (python -m pipeline.prepare)
    }
    if not args.skip_ready:
        one = [*model, "dataset.num_questions=1", "stages.batched=false", "stages.fidelity=false",
               "stages.null_model=false"]  # fmt: skip
        for attempt in range(3 if not args.quick else 1):
            for kind in ("cold", "installed"):
                cache = Path(tempfile.mkdtemp(prefix=f"pipeline-{kind}-"))
                env = {"PIPELINE_CACHE_DIR": str(cache)}
                try:
                    if kind == "installed":
                        command = [sys.executable, "-m", "pipeline.prepare", *model]
                        environment = {**os.environ, **env}
                        prepared = subprocess.run(command, env=environment, capture_output=True, text=True,
                                                  cwd=PROJECT_ROOT)  # fmt: skip
                        # kept beside the run: what prepare measured explains a slow first process (one recalibrated)
                        log = args.work / f"{kind}{attempt}" / "prepare.log"
                        log.parent.mkdir(parents=True, exist_ok=True)
                        log.write_text(prepared.stdout + prepared.stderr)
                        if prepared.returncode != 0:
                            raise RowFailed(f"pipeline.prepare: {prepared.stderr.strip().splitlines()[-1:]}")
                    sample = run_row(one, args.work / f"{kind}{attempt}", env=env)
                    ready[kind].append(sample.results.get("ready_s", math.nan))
                    say(f"{kind} ready {ready[kind][-1]:.2f} s")
                except RowFailed as failure:
                    missing[f"{kind} ready"] = str(failure)
                finally:
                    shutil.rmtree(cache, ignore_errors=True)
            # MLflow's cost: warm one-question runs without it, into a new SQLite store (its tables made) and into
            # that store again, interleaved; ready, first stage and the whole process (the run closed) of each
            store = Path(tempfile.mkdtemp(prefix="pipeline-mlflow-"))
            try:
                for kind, common in TRACKING_KINDS:
                    uri = f"sqlite:///{store / 'mlflow.db'}"
                    overrides = [o.replace("{uri}", uri) for o in common]
                    try:
                        sample = run_row(one, args.work / f"{kind}{attempt}", common=tuple(overrides))
                    except RowFailed as failure:
                        missing[f"{kind} ready"] = str(failure)
                        continue
                    for key, value in (("", sample.results.get("ready_s", math.nan)),
                                       ("_first_stage", sample.results.get("first_stage_s", math.nan)),
                                       ("_process", sample.process_s)):  # fmt: skip
                        ready.setdefault(kind + key, []).append(value)
                    say(f"{kind}: ready {ready[kind][-1]:.2f} s, first stage {ready[kind + '_first_stage'][-1]:.2f} s, "
                        f"process {sample.process_s:.2f} s")  # fmt: skip
            finally:
                shutil.rmtree(store, ignore_errors=True)

    facts["busy_after"] = measure.cpu_busy_share()
    facts["choices"] = _choices(rows["default"][0]) if rows.get("default") else "-"
    report = Report(
        command="python -m pipeline.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), commit=git_commit(), machine=facts, rows=rows,
        missing=missing, accuracy=accuracy, accuracy_extra=accuracy_extra, ready=ready, questions=args.questions,
        reps=args.reps,
    )  # fmt: skip
    report.targets = all_targets(rows, accuracy, ready, facts, missing)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(report))
    say(f"wrote {out}")
