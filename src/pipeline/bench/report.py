"""docs/BENCHMARKS.md: one table a person reads at a glance, then accuracy, rooflines and the targets' verdicts."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from pipeline.bench.judge import STAGES, Target, ratio, roofline_shares, times
from pipeline.bench.rows import CONSTRAINED, OURS, ROWS, STRATEGIES
from pipeline.bench.run import Sample, token_match
from pipeline.stats import wilson


@dataclass
class Report:
    command: str
    date: str
    commit: str
    machine: dict  # cpu model, kind, threads, torch, busy shares, bandwidth, GEMM rates
    rows: dict[str, list[Sample]]
    missing: dict[str, str]  # row -> why it did not run
    accuracy: dict[str, dict[str, tuple[int, int, int, int]]]  # strategy -> set -> (correct, n, null correct, null n)
    accuracy_extra: dict[str, dict[str, dict]]  # strategy -> set -> {"forced_share", "answer_rate", "seconds"}
    ready: dict[str, list[float]]
    targets: list[Target] = field(default_factory=list)
    questions: int = 32
    reps: int = 3


def tiles_clause(tags: dict, machine: dict) -> str:
    """How passes through the int8 tiles count in the roofline, '' where the default has none."""
    tiles = tags.get("tiles", "none")
    if tiles == "none":
        return ""
    rate = machine.get("int8_gop_s", float("nan"))
    halved = ", halved for two digits" if tiles == "int8x2" else ""
    upto = tags.get("tile_rows", "?")
    upto = "every pass past the kernel" if str(upto) == str(1 << 62) else f"passes of up to {upto} rows"
    return f"; {upto} ran the {tiles} tiles: the int8 product's rate (torch._int_mm, {rate:.0f} GOP/s{halved})"


def _median(values: list[float]) -> float:
    clean = [v for v in values if not math.isnan(v)]
    return statistics.median(clean) if clean else math.nan


def _fmt_times(values: list[float]) -> str:
    clean = [v for v in values if not math.isnan(v)]
    if not clean:
        return "-"
    if len(clean) == 1:
        return f"{clean[0]:.2f}"
    return f"{statistics.median(clean):.2f} [{min(clean):.2f}-{max(clean):.2f}]"


def _num(value: float, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _list(values: list[float] | None) -> str:
    return ", ".join(f"{v:.2f}" for v in values or []) or "-"


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _first(samples: list[Sample], stage: str, key: str) -> float:
    """A value measured once per row (fidelity, null, accuracy: the first round computes them)."""
    for sample in samples:
        value = sample.stage(stage, key)
        if not math.isnan(value):
            return value
    return math.nan


def speed_table(report: Report) -> str:
    headers = ["row", "mode", "single s", "batched s", "vs default (single, batched)", "KLD single / batched",
               "top-1", "accuracy (32 q)", "null", "forced", "token match", "peak MiB", "ready s"]  # fmt: skip
    lines = []
    for name, row in ROWS.items():
        samples = report.rows.get(name)
        if not samples:
            continue
        ours = OURS[row.mode]
        versus = "-"
        if ours in report.rows and name != ours:
            versus = ", ".join(str(ratio(report.rows, name, ours, stage)) for stage in STAGES)
        reference = "transformers-fp32" if row.mode == CONSTRAINED else None
        match = "-"
        if reference and reference in report.rows and name != reference:
            match = _num(token_match(samples[0], report.rows[reference][0], "batched"), ".3f")
        kld = " / ".join(_num(_first(samples, s, "kld_mean"), ".2g") for s in STAGES)
        correct = _first(samples, "batched", "accuracy")
        n = int(_first(samples, "batched", "num_questions") or 0)
        low, high = wilson(round(correct * n), n) if n and not math.isnan(correct) else (math.nan, math.nan)
        accuracy = f"{correct:.3f} [{low:.2f}-{high:.2f}]" if not math.isnan(low) else _num(correct, ".3f")
        peak = max((s.stage(st, "peak_rss_mb") for s in samples for st in STAGES), default=math.nan)
        lines.append([
            name, row.mode, _fmt_times(times(samples, "single")), _fmt_times(times(samples, "batched")), versus, kld,
            _num(min(_first(samples, s, "top1_agreement") for s in STAGES), ".3f"), accuracy,
            _num(_first(samples, "batched", "accuracy_null"), ".3f"),
            _num(_first(samples, "batched", "forced_share"), ".2f"),
            match, _num(peak, ".0f"), _num(_median([s.results.get("ready_s", math.nan) for s in samples]), ".2f"),
        ])  # fmt: skip
    return table(headers, lines)


def accuracy_table(report: Report) -> str:
    headers = ["strategy", "set", "accuracy [95% CI]", "null model", "forced share", "answer rate", "batched s"]
    lines = []
    for strategy in STRATEGIES:
        for set_name, (correct, n, null_correct, null_n) in report.accuracy.get(strategy.name, {}).items():
            extra = report.accuracy_extra.get(strategy.name, {}).get(set_name, {})
            low, high = wilson(correct, n)
            nlow, nhigh = wilson(null_correct, null_n)
            lines.append([
                f"{strategy.name} ({strategy.what})", set_name, f"{correct / n:.3f} [{low:.3f}-{high:.3f}]",
                f"{null_correct / null_n:.3f} [{nlow:.3f}-{nhigh:.3f}]" if null_n else "-",
                _num(extra.get("forced_share", math.nan), ".3f"), _num(extra.get("answer_rate", math.nan), ".3f"),
                _num(extra.get("seconds", math.nan), ".2f"),
            ])  # fmt: skip
    return table(headers, lines)


def roofline_section(report: Report) -> list[str]:
    samples = report.rows.get("default")
    if not samples:
        return []
    m = report.machine
    tags = samples[0].results.get("tags", {})
    lines = [
        "## Against the physical limit",
        "",
        f"Roofline of a stage = for every layer pass of r rows the engine made (its step counts, in results.json), "
        f"the longer of reading the layers' weights ({float(tags.get('layer_bytes', 'nan')) / 1e6:.0f} MB in "
        f"{tags.get('weight_format', samples[0].results.get('weight_format'))}) at the measured read bandwidth "
        f"({m['bandwidth_gb_s']:.1f} GB/s) and doing 2 r x {float(tags.get('layer_params', 'nan')) / 1e6:.0f}M FLOPs "
        "at "
        f"the measured GEMM rate of the chosen dtype ({tags.get('gemm', 'fp32')}: fp32 {m['gemm_fp32_gflop_s']:.0f}, "
        f"bf16 {m['gemm_bf16_gflop_s']:.0f} GFLOP/s){tiles_clause(tags, m)}, plus the same for each full lm_head "
        f"product ({float(tags.get('head_bytes', 'nan')) / 1e6:.0f} MB). Attention and norms are left out.",
        "",
    ]
    for stage in STAGES:
        shares = [roofline_shares(s, m, stage) for s in samples]
        steps = samples[0].results.get("stages", {}).get(stage, {}).get("steps", {})
        passes = sum(v for k, v in steps.items() if not k.startswith("head:"))
        heads = sum(v for k, v in steps.items() if k.startswith("head:"))
        lines.append(
            f"- {stage}: {passes} layer passes, {heads} lm_head products; at {_num(_median(shares), '.0%')} of the "
            f"roofline (median of {len(shares)} rounds)"
        )
    return lines + [""]


def tracking_cost(ready: dict[str, list[float]]) -> list[str]:
    """What MLflow costs a warm run: one-question runs without it and with it, into a new store and the same again."""
    if not any(ready.get(kind) for kind in ("untracked", "tracked_new", "tracked")):
        return []
    what = {"untracked": "without MLflow (`tracking.enabled=false`)",
            "tracked_new": "with MLflow into a new SQLite store (its tables made)",
            "tracked": "with MLflow into that store again"}  # fmt: skip
    lines = ["What MLflow costs a warm one-question run, interleaved: ready / first stage / whole process (the "
             "MLflow run closed), in seconds:", ""]  # fmt: skip
    for kind, text in what.items():
        lines.append(f"- {text}: {_list(ready.get(kind))} / {_list(ready.get(kind + '_first_stage'))} / "
                     f"{_list(ready.get(kind + '_process'))}")  # fmt: skip
    return [*lines, ""]


def render(report: Report) -> str:
    m = report.machine
    busy = m.get("busy_before", math.nan), m.get("busy_after", math.nan)
    head = [
        "# Benchmarks",
        "",
        f"Made by `{report.command}` on {report.date} at commit {report.commit}. **CPU kind: {m['kind']}** "
        f"({m['cpu']}), {m['threads']} threads, torch {m['torch']}. Cores in use before and after: "
        f"{_num(busy[0], '.0%')} / {_num(busy[1], '.0%')}"
        f"{' (a busy machine: these times mean little)' if max(busy) > 0.25 else ''}.",
        "",
        f"{report.questions} shipped questions per row, both stages, {report.reps} interleaved rounds "
        "(round r runs every row once, each in its own process); times are medians [min-max]; a ratio is paired "
        "round by round, with its 95% interval. Fidelity (KL divergence and top-1 agreement against the fp32 "
        "transformers model of the same weights, teacher-forced along the row's own tokens), the null model "
        "(random weights, same config) and the forced share (outputs the constraint fully determined) come from "
        "the first round. Constrained rows are compared with constrained rows, free with free. Token match: share "
        "of questions with the same generated token ids as transformers fp32 in the same mode.",
        "",
        f"Default's choices here: {m.get('choices', '-')}.",
        "",
        "## Speed, fidelity and accuracy per row",
        "",
        speed_table(report),
        "",
    ]
    if report.missing:
        head += ["Rows that did not run:", ""] + [f"- {name}: {why}" for name, why in report.missing.items()] + [""]
    head += [
        "## Accuracy the model earns (first 256 questions of each set, batched stage)",
        "",
        accuracy_table(report),
        "",
    ]
    head += roofline_section(report)
    ready = report.ready
    head += [
        "## Ready time",
        "",
        "From the process's start (interpreter, imports, config) to a loaded engine with its prefix and warm-up done: "
        f"warm (caches filled) {_list(ready.get('warm'))} s; the first process after install (a fresh model cache "
        f"prepared by `python -m pipeline.prepare`, as `make venv` runs it) {_list(ready.get('installed'))} s; cold "
        f"(an empty model cache, the kernel built: the first run packs, calibrates and extracts the tokenizer) "
        f"{_list(ready.get('cold'))} s. The warm processes reached their first stage (the answers' solver and the "
        f"constraint's grammar loaded too: what a timer around the whole run counts) at "
        f"{_list(ready.get('warm_first_stage'))} s.",
        "",
        *tracking_cost(ready),
        "## Targets",
        "",
        table(
            ["issue", "target", "measured [95% interval]", "verdict", "note"],
            [[str(t.issue), t.what, t.measured, f"**{t.verdict}**", t.note] for t in report.targets],
        ),  # fmt: skip
        "",
    ]
    return "\n".join(head)
