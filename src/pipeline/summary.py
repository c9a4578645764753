"""The plain-text table printed at the end of every run."""

from __future__ import annotations

from pipeline.results import RunResult


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
        "accuracy",
        "answered",
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
            f"{s.accuracy:.3f}",
            f"{s.answer_rate:.3f}",
        ]
        for s in result.stages
    ]
    head = (
        f"{result.num_questions} questions, {result.dtype}, attention={result.attention}, device={result.device} "
        f"({result.environment['device_name']})\n"
        f"model load {result.load_time_s:.2f} s, warm-up {result.warmup_time_s:.2f} s "
        "(with_load counts both, as the original grader did)"
    )
    return head + "\n" + format_table(headers, rows)
