"""Benchmark configurations side by side and write docs/BENCHMARKS.md.

    python -m pipeline.bench                 # all rows, 3 repetitions, 32 questions
    python -m pipeline.bench --reps 5 --only seed_before best

Each configuration runs as `run.py` in its own process (load, warm-up and compile stay out of the
stage times and are reported on their own); repetitions are interleaved across configurations so
machine drift hits all alike. Speed rows use the same raw questions in the same order. Accuracy rows
run the default cot prompt on the first 256 questions, fp32 against the fastest precision.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.backends.llamacpp import available as llamacpp_available
from pipeline.environment import PROJECT_ROOT, cpu_model, git_commit

RUN_PY = PROJECT_ROOT / "run.py"
DEFAULT_OUT = PROJECT_ROOT / "docs" / "BENCHMARKS.md"

# The original case's recipes, the best configuration found, and the llama.cpp reference.
SPEED_ROWS: dict[str, list[str]] = {
    "seed_before": ["experiment=seed_before"],
    "seed_after": ["experiment=seed_after"],
    "best": ["experiment=seed_after", "precision=int8", "stages.sort_by_length=true"],
    "llamacpp": ["experiment=seed_after", "backend=llamacpp"],
}
# The default (tool) prompt on the first 256 questions, fp32 against the faster precisions.
ACCURACY_ROWS: dict[str, list[str]] = {
    "fp32": ["precision=fp32"],
    "bf16": ["precision=bf16"],
    "int8": ["precision=int8"],
}
PROMPT_ROWS = ("raw", "instruct", "cot", "tool")
BASELINE, REFERENCE = "seed_before", "llamacpp"
TARGET_BATCHED_TOKENS_PER_S = 1000.0
TARGET_SINGLE_VS_LLAMACPP = 1.5
TARGET_ROOFLINE_SHARE = 0.60
TARGET_ACCURACY_DROP = 0.02


@dataclass
class Sample:
    """One process's results.json and predictions."""

    results: dict
    outputs: dict[tuple[str, int], str] = field(default_factory=dict)


def run_config(name: str, overrides: list[str], num_questions: int, folder: Path, extra: list[str] = ()) -> Sample:
    """Run one configuration in a fresh process and read back what it saved."""
    folder.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        str(RUN_PY),
        *overrides,
        *extra,
        f"dataset.num_questions={num_questions}",
        "tracking.enabled=false",
        f"hydra.run.dir={folder}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=PROJECT_ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    results = json.loads((folder / "results.json").read_text())
    with open(folder / "predictions.csv", newline="") as handle:
        outputs = {(row["stage"], int(row["index"])): row["output"] for row in csv.DictReader(handle)}
    return Sample(results, outputs)


def measure_read_bandwidth_gb_s(threads: int, size_mb: int = 512, repeats: int = 7) -> float:
    """Memory read bandwidth: the best of `repeats` sums over a buffer far larger than the caches."""
    torch.set_num_threads(threads)
    buffer = torch.ones(size_mb * 1024 * 1024 // 4, dtype=torch.float32)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        buffer.sum()
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


def _stats(values: list[float]) -> tuple[float, float, float]:
    clean = [v for v in values if not math.isnan(v)]
    if not clean:
        return math.nan, math.nan, math.nan
    stdev = statistics.stdev(clean) if len(clean) > 1 else 0.0
    return statistics.median(clean), min(clean), stdev


def _stage(sample: Sample, stage: str, key: str) -> float:
    return float(sample.results["stages"].get(stage, {}).get(key, math.nan))


def summarize(name: str, samples: list[Sample], bandwidth_gb_s: float) -> dict:
    """Median, min and sample stddev over repetitions of the figures a row shows."""
    first = samples[0].results
    row = {"name": name, "reps": len(samples), "dtype": first["dtype"], "weights": first["weight_format"]}
    for stage in ("single", "batched"):
        row[f"{stage}_time"] = _stats([_stage(s, stage, "wall_time_s") for s in samples])
        row[f"{stage}_tokens_per_s"] = _stats([_stage(s, stage, "tokens_per_s") for s in samples])[0]
        row[f"{stage}_accuracy"] = _stage(samples[0], stage, "accuracy")
        row[f"{stage}_tokens"] = _stage(samples[0], stage, "generated_tokens")
    row["first_token_s"] = _stats([_stage(s, "single", "first_token_mean_s") for s in samples])[0]
    row["decode_tokens_per_s"] = _stats([_stage(s, "single", "decode_tokens_per_s") for s in samples])[0]
    row["load_s"] = _stats([s.results["load_time_s"] for s in samples])[0]
    row["warmup_s"] = _stats([s.results["warmup_time_s"] for s in samples])[0]
    row["weight_gb"] = first["weight_bytes"] / 1e9
    row["weight_gb_s"] = row["weight_gb"] * row["decode_tokens_per_s"]
    row["roofline_share"] = row["weight_gb_s"] / bandwidth_gb_s
    return row


def _fmt(stats: tuple[float, float, float]) -> str:
    median, low, stdev = stats
    return f"{median:.2f} ({low:.2f}, ±{stdev:.2f})"


def speed_table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["name"] == BASELINE), rows[0])
    headers = [
        "config", "dtype/weights", "single s: median (min, ±sd)", "batched s: median (min, ±sd)",
        "speed-up single", "speed-up batched", "TTFT s", "decode tok/s", "batched tok/s",
        "weights GB/s", "% roofline", "tokens single/batched", "token match vs fp32", "accuracy", "load s", "warm-up s",
    ]  # fmt: skip
    body = []
    for r in rows:
        body.append(
            [
                r["name"], f"{r['dtype']}/{r['weights']}", _fmt(r["single_time"]), _fmt(r["batched_time"]),
                f"{base['single_time'][0] / r['single_time'][0]:.2f}x",
                f"{base['batched_time'][0] / r['batched_time'][0]:.2f}x",
                f"{r['first_token_s']:.3f}", f"{r['decode_tokens_per_s']:.1f}", f"{r['batched_tokens_per_s']:.0f}",
                f"{r['weight_gb_s']:.1f}", f"{100 * r['roofline_share']:.0f}%",
                f"{r['single_tokens']:.0f}/{r['batched_tokens']:.0f}", f"{r['token_match']:.3f}",
                f"{r['single_accuracy']:.3f}", f"{r['load_s']:.1f}", f"{r['warmup_s']:.1f}",
            ]
        )  # fmt: skip
    return markdown_table(headers, body)


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def decode_profile(overrides: list[str], steps: int = 8) -> list[tuple[str, float]]:
    """Top operators of single-stream decode steps of a configuration, as shares of the step time."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    sys.path.insert(0, str(PROJECT_ROOT))
    from run import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = OmegaConf.to_object(compose(config_name="config", overrides=overrides))
    from pipeline.models import load_model, resolve_device, resolve_dtype

    device = resolve_device(cfg.runtime.device)
    dtype = resolve_dtype(cfg.precision.name, device)
    loaded = load_model(cfg.model, device, dtype, cfg.attention.implementation, 0, cfg.precision.name == "int8")
    from transformers import DynamicCache

    model = loaded.model
    ids = loaded.tokenizer("How many grams are in 6 kg?", return_tensors="pt")["input_ids"].to(device)
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        token = model(input_ids=ids, past_key_values=cache).logits[:, -1:].argmax(-1)
        for _ in range(3):
            token = model(input_ids=token, past_key_values=cache).logits[:, -1:].argmax(-1)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                token = model(input_ids=token, past_key_values=cache).logits[:, -1:].argmax(-1)
    from pipeline.quantize import weight_bytes

    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:6]
    return [(e.key, e.self_cpu_time_total / total) for e in top] + [
        ("weight_bytes", float(weight_bytes(model))),
        ("step_ms", total / steps / 1000),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Benchmark configurations side by side; writes docs/BENCHMARKS.md")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--accuracy-questions", type=int, default=256)
    parser.add_argument("--only", nargs="*", help="speed rows to run (default: all)")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--work", type=Path, default=PROJECT_ROOT / "outputs" / "bench")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.questions < 1:
        parser.error("--reps and --questions must be at least 1")

    names = [n for n in SPEED_ROWS if not args.only or n in args.only]
    if REFERENCE in names and not llamacpp_available():
        print("llama-cpp-python is not installed: the llama.cpp row is left out (pip install llama-cpp-python)")
        names.remove(REFERENCE)
    threads = torch.get_num_threads()
    bandwidth_gb_s = measure_read_bandwidth_gb_s(threads)
    print(f"memory read bandwidth: {bandwidth_gb_s:.1f} GB/s on {threads} threads")

    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    samples: dict[str, list[Sample]] = {n: [] for n in names}
    for rep in range(args.reps):  # interleaved: every configuration once per round
        for name in names:
            print(f"round {rep + 1}/{args.reps}: {name}", flush=True)
            folder = args.work / stamp / name / str(rep)
            samples[name].append(run_config(name, SPEED_ROWS[name], args.questions, folder))

    from pipeline.models import default_cache_dir, embedded_gguf, gguf_tokenizer

    tokenizer = gguf_tokenizer(embedded_gguf(), default_cache_dir())
    rows = [summarize(n, samples[n], bandwidth_gb_s) for n in names]
    reference = samples[BASELINE][0].outputs if BASELINE in samples else {}
    for row in rows:
        row["token_match"] = token_match_rate(tokenizer, samples[row["name"]][0].outputs, reference)

    accuracy_rows, prompt_rows = [], []
    if not args.skip_accuracy:
        for name, overrides in ACCURACY_ROWS.items():
            print(f"accuracy: {name} on {args.accuracy_questions} questions", flush=True)
            folder = args.work / stamp / "accuracy" / name
            sample = run_config(name, overrides, args.accuracy_questions, folder, ["stages.single=false"])
            accuracy_rows.append((name, sample))
        for prompt in PROMPT_ROWS:
            print(f"prompt: {prompt}", flush=True)
            timed = run_config(prompt, [f"prompt={prompt}"], args.questions, args.work / stamp / "prompt" / prompt)
            folder = args.work / stamp / "prompt" / f"{prompt}-accuracy"
            scored = run_config(prompt, [f"prompt={prompt}"], args.accuracy_questions, folder, ["stages.single=false"])
            prompt_rows.append((prompt, timed, scored))

    profile_overrides = SPEED_ROWS["best"] if "best" in names else SPEED_ROWS[names[0]]
    profile = decode_profile(profile_overrides)
    report = render(rows, accuracy_rows, prompt_rows, tokenizer, bandwidth_gb_s, threads, profile, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)
    log_to_mlflow(rows, args.out)


def _targets(rows: list[dict], accuracy: list[tuple[str, float]]) -> list[list[str]]:
    by_name = {r["name"]: r for r in rows}
    fastest = max(rows, key=lambda r: r["batched_tokens_per_s"])
    checks = []
    got = fastest["batched_tokens_per_s"]
    checks.append(
        [
            "batched >= 1000 generated tok/s",
            f"{got:.0f} tok/s ({fastest['name']})",
            _verdict(got, TARGET_BATCHED_TOKENS_PER_S),
        ]
    )
    best_single = max(rows, key=lambda r: r["single_tokens_per_s"] if r["name"] != REFERENCE else 0)
    if REFERENCE in by_name:
        ratio = best_single["single_tokens_per_s"] / by_name[REFERENCE]["single_tokens_per_s"]
        checks.append(
            [
                "single >= 1.5x llama.cpp tok/s",
                f"{ratio:.2f}x ({best_single['name']})",
                _verdict(ratio, TARGET_SINGLE_VS_LLAMACPP),
            ]
        )
    else:
        checks.append(["single >= 1.5x llama.cpp tok/s", "llama.cpp not installed", "not measured"])
    share = best_single["roofline_share"]
    checks.append(
        [
            "single >= 60% of bandwidth roofline",
            f"{100 * share:.0f}% ({best_single['name']})",
            _verdict(share, TARGET_ROOFLINE_SHARE),
        ]
    )
    if accuracy:
        base = dict(accuracy).get("fp32")
        worst = min((acc - base, name) for name, acc in accuracy)
        drop = -worst[0]
        met = "met" if drop <= TARGET_ACCURACY_DROP else f"MISSED by {100 * (drop - TARGET_ACCURACY_DROP):.1f} points"
        checks.append(
            ["accuracy within 2 points of fp32 (256 q)", f"largest drop {100 * drop:.1f} points ({worst[1]})", met]
        )
    return checks


def _verdict(got: float, target: float) -> str:
    return "met" if got >= target else f"MISSED by {100 * (1 - got / target):.0f}%"


def prompt_table(prompt_rows, args) -> str:
    """One row per prompt strategy: accuracy and answer rate on the accuracy set, stage times on the speed set."""
    headers = [
        f"prompt ({args.accuracy_questions} q accuracy, {args.questions} q times)", "accuracy", "answer rate",
        "single s", "batched s", "tokens single", "worst family",
    ]  # fmt: skip
    body = []
    for prompt, timed, scored in prompt_rows:
        stage = scored.results["stages"]["batched"]
        families = stage.get("accuracy_by_family") or {}
        worst = min(families.items(), key=lambda kv: kv[1]) if families else ("-", math.nan)
        body.append(
            [
                prompt, f"{stage['accuracy']:.3f}", f"{stage['answer_rate']:.3f}",
                f"{_stage(timed, 'single', 'wall_time_s'):.2f}", f"{_stage(timed, 'batched', 'wall_time_s'):.2f}",
                f"{_stage(timed, 'single', 'generated_tokens'):.0f}", f"{worst[0]} {worst[1]:.3f}",
            ]
        )  # fmt: skip
    families = prompt_rows[-1][2].results["stages"]["batched"].get("accuracy_by_family") or {}
    lines = [markdown_table(headers, body)]
    if families:
        lines += ["", f"Accuracy by unit family, prompt={prompt_rows[-1][0]}: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in families.items())]  # fmt: skip
    return "\n".join(lines)


def render(rows, accuracy_rows, prompt_rows, tokenizer, bandwidth_gb_s, threads, profile, args) -> str:
    import transformers

    accuracy = [(name, float(s.results["stages"]["batched"]["accuracy"])) for name, s in accuracy_rows]
    fp32 = dict(accuracy_rows).get("fp32")
    acc_body = []
    for name, sample in accuracy_rows:
        stage = sample.results["stages"]["batched"]
        match = token_match_rate(tokenizer, sample.outputs, fp32.outputs, "batched") if fp32 else math.nan
        acc_body.append(
            [
                name,
                f"{stage['accuracy']:.3f}",
                f"{stage['answer_rate']:.3f}",
                f"{match:.3f}",
                f"{stage['wall_time_s']:.1f}",
            ]
        )
    command = "python -m pipeline.bench" + (f" --reps {args.reps}" if args.reps != 3 else "")
    command += f" --questions {args.questions}" if args.questions != 32 else ""
    roofline = {r["name"]: bandwidth_gb_s / r["weight_gb"] for r in rows}
    lines = [
        "# Benchmarks",
        "",
        f"Made by `{command}` on {time.strftime('%Y-%m-%d %H:%M')} (the file is overwritten by each run).",
        "",
        "## Machine",
        "",
        f"- CPU: {cpu_model()}, {os.cpu_count()} cores, torch threads {threads}; GPU: "
        + (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"),
        f"- measured memory read bandwidth: {bandwidth_gb_s:.1f} GB/s (sum over a 512 MB buffer, best of 7)",
        f"- torch {torch.__version__}, transformers {transformers.__version__}, python {sys.version.split()[0]}, "
        f"commit {git_commit()}",
        "",
        f"## Speed: {args.questions} raw questions, {args.reps} interleaved repetitions, each in its own process",
        "",
        "Stage times exclude model load and warm-up (reported on their own). TTFT is the mean time to the first",
        "token of a single-stage call (prefill); decode tok/s counts the single stage's tokens after the first.",
        "Weights GB/s = weight bytes read per token x decode tok/s; % roofline divides it by the measured",
        "bandwidth (single-stream ceilings: "
        + ", ".join(f"{n} {v:.0f} tok/s" for n, v in roofline.items())
        + "). Token match compares greedy outputs position by position with `seed_before` (fp32).",
        "seed_before decodes up to 50 tokens, the others 20 (the recipes differ there by definition).",
        "",
        speed_table(rows),
        "",
    ]
    if acc_body:
        lines += [
            f"## Accuracy by precision: default (tool) prompt, first {args.accuracy_questions} questions, "
            "batched stage",
            "",
            markdown_table(["precision", "accuracy", "answer rate", "token match vs fp32", "batched s"], acc_body),
            "",
            "## Prompt strategies (default settings otherwise)",
            "",
            prompt_table(prompt_rows, args),
            "",
        ]
    lines += [
        "## Targets",
        "",
        markdown_table(["target", "measured", "verdict"], _targets(rows, accuracy)),
        "",
        "## What limits single-stream decoding here",
        "",
        f"torch profiler over single-stream decode steps of `{' '.join(SPEED_ROWS.get('best', []))}` "
        f"({profile[-1][1]:.1f} ms per step, operator self time):",
        "",
        markdown_table(["operator", "share of step"], [[k, f"{100 * v:.0f}%"] for k, v in profile[:-2]]),
        "",
        _limit_note(profile, bandwidth_gb_s),
        "",
    ]
    return "\n".join(lines) + "\n"


def _limit_note(profile: list[tuple[str, float]], bandwidth_gb_s: float) -> str:
    """Turn the profile into the sentence a reader needs: is the matmul kernel or memory the limit?"""
    top_name, top_share = profile[0]
    weight_gb, step_ms = profile[-2][1] / 1e9, profile[-1][1]
    kernel_gb_s = weight_gb / (top_share * step_ms / 1000)
    share_of_bandwidth = kernel_gb_s / bandwidth_gb_s
    verdict = (
        "So the matrix-vector kernel, not memory, bounds single-stream decoding here"
        if share_of_bandwidth < 0.7
        else "So memory bandwidth bounds single-stream decoding here"
    )
    return (
        f"The top operator, `{top_name}`, takes {100 * top_share:.0f}% of a {step_ms:.1f} ms step; reading "
        f"{weight_gb:.2f} GB of weights in that time is {kernel_gb_s:.1f} GB/s, "
        f"{100 * share_of_bandwidth:.0f}% of the measured {bandwidth_gb_s:.1f} GB/s. {verdict}; the rest of "
        "the step is per-operator overhead (eager PyTorch launches several hundred small operators per token; "
        "`runtime.compile` fuses some of them, at a compile cost reported as warm-up). llama.cpp's hand-written "
        "quantized kernels get closer to the memory limit on the same weights."
    )


def log_to_mlflow(rows: list[dict], report: Path) -> None:
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
        for row in rows:
            prefix = row["name"]
            mlflow.log_metrics(
                {
                    f"{prefix}/single_time_s_median": row["single_time"][0],
                    f"{prefix}/batched_time_s_median": row["batched_time"][0],
                    f"{prefix}/decode_tokens_per_s": row["decode_tokens_per_s"],
                    f"{prefix}/batched_tokens_per_s": row["batched_tokens_per_s"],
                    f"{prefix}/roofline_share": row["roofline_share"],
                }
            )
        mlflow.log_artifact(str(report))


if __name__ == "__main__":
    main()
