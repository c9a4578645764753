"""The plain-text table printed at the end of every run."""

from __future__ import annotations

import math

from pipeline.results import RunResult, StageResult


def _ok(flag: bool) -> str:
    return "pass" if flag else "FAIL"


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """A fixed-width table with a header rule, right-aligned but for the first column."""
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows)]

    def line(cells):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def format_summary(result: RunResult) -> str:
    """Load and warm-up times, then one row per stage: time, budget checks, speed and accuracy."""
    headers = [
        "stage",
        "time_s",
        "budget_s",
        "in_budget",
        "with_load",
        "tokens",
        "tokens/s",
        "p50_s",
        "p90_s",
        "accuracy [95% CI]",
        "null",
        "forced",
        "answered",
        "KLD",
        "top1",
        "peak_MiB",
    ]
    rows = [
        [
            s.name,
            f"{s.wall_time_s:.2f}",
            f"{s.budget_s:.0f}",
            _ok(s.within_budget),
            _ok(s.within_budget_with_load),
            str(s.generated_tokens),
            f"{s.tokens_per_s:.1f}",
            f"{s.latency_p50_s:.3f}",
            f"{s.latency_p90_s:.3f}",
            _accuracy(s),
            _num(s.accuracy_null, ".3f"),
            _num(s.forced_share, ".2f"),
            f"{s.answer_rate:.3f}",
            _num(s.kld_mean, ".2g"),
            _num(s.top1_agreement, ".3f"),
            _num(s.peak_rss_mb, ".0f"),
        ]
        for s in result.stages
    ]
    graded = [s for s in result.stages if not math.isnan(s.grader_max_points)]
    if graded:
        side = graded[0].grader_padding_side
        other = "left" if side == "right" else "right"
        headers += [f"loss_{side}", f"loss_{other}", "points", "case_s", "in_limit"]
        for row, s in zip(rows, result.stages):
            row += _grader_cells(s)
    head = (
        f"{result.num_questions} questions, {result.dtype}, attention={result.attention}, device={result.device} "
        f"({result.environment['device_name']})\n"
        f"model load {result.load_time_s:.2f} s, warm-up {result.warmup_time_s:.2f} s "
        f"(with_load counts both, as the original grader did); peak memory {result.peak_rss_load_mb:.0f} MiB loading"
    )
    table = head + "\n" + format_table(headers, rows)
    if graded:
        table += (
            f"\ncourse grader: loss of question + output padded on the tokenizer's side ({side}) and on the other, "
            "points from the first; case_s counts load, warm-up and the loss pass; loss model: "
            f"{graded[0].grader_loss_model}"
        )
        table += "".join(f"\n{s.name} diagnosis: {s.grader_diagnosis}" for s in graded if s.grader_diagnosis)
    notes = []
    if any(s.accuracy_null == s.accuracy_null for s in result.stages):
        notes.append(
            f"null: the accuracy of random weights with the same config ({result.null_questions} questions, "
            f"backend={result.null_backend})"
        )
    if any(s.forced_share == s.forced_share for s in result.stages):
        notes.append("forced: share of outputs the constraint fully determined (one allowed token at every step)")
    fidelity = [s for s in result.stages if s.fidelity_tokens]
    if fidelity:
        notes.append(
            "KLD, top1: mean KL divergence and top-1 agreement per generated token against "
            f"{fidelity[0].fidelity_reference} ({', '.join(f'{s.name} {s.fidelity_tokens} tokens' for s in fidelity)})"
        )
    table += "".join(f"\n{note}" for note in notes)
    for s in result.stages:  # why answers fail, at a glance (the rows are in failures.csv)
        if s.failures:
            counts = ", ".join(f"{kind} {n}" for kind, n in sorted(s.failures.items(), key=lambda kv: -kv[1]))
            table += f"\n{s.name} failures: {counts}"
    return table


def _num(value: float, spec: str) -> str:
    return "-" if value != value else format(value, spec)


def _accuracy(s: StageResult) -> str:
    if s.accuracy_low != s.accuracy_low:
        return f"{s.accuracy:.3f}"
    return f"{s.accuracy:.3f} [{s.accuracy_low:.2f}-{s.accuracy_high:.2f}]"


def _grader_cells(s: StageResult) -> list[str]:
    if math.isnan(s.grader_max_points):
        return ["-"] * 5
    return [
        f"{s.grader_loss:.3f}",
        f"{s.grader_loss_other_side:.3f}",
        f"{s.grader_points:.2f}/{s.grader_max_points:.0f}",
        f"{s.grader_case_time_s:.2f}",
        _ok(s.grader_within_limit),
    ]
