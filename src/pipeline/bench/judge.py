"""The issues' targets, judged with intervals: met only when the whole interval clears the target, missed only when
all of it falls short, otherwise inconclusive.

Times come from interleaved repetitions (round r runs every row once), so a ratio of two rows is the paired ratio
of their times round by round, with its 95% t interval on the log scale (pipeline.stats). Accuracies get Wilson
intervals. A target whose rows did not run says so, with the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.bench.machine import roofline_s
from pipeline.bench.rows import CONSTRAINED, FREE, OURS, PINNED, ROWS
from pipeline.bench.run import Sample
from pipeline.stats import Ratio, paired_ratio, t95, verdict, wilson

STAGES = ("single", "batched")


@dataclass
class Target:
    issue: int
    what: str
    measured: str  # the estimate with its interval, as text
    verdict: str  # met, missed, inconclusive, not measured
    note: str = ""


def times(samples: list[Sample], stage: str) -> list[float]:
    return [s.stage(stage, "wall_time_s") for s in samples]


def ratio(rows: dict[str, list[Sample]], numerator: str, denominator: str, stage: str) -> Ratio:
    """numerator's time over denominator's, paired by round (a slower peer gives > 1 over our default)."""
    return paired_ratio(times(rows[numerator], stage), times(rows[denominator], stage))


def _ratio_target(issue: int, what: str, r: Ratio, target: float, higher_is_better: bool = True, note: str = ""):
    if r.n == 0:
        return Target(issue, what, "-", "not measured", note)
    judged = verdict(r.low, r.high, target, higher_is_better) if r.n > 1 else "inconclusive"
    return Target(issue, what, str(r), judged, note or ("" if r.n > 1 else "one round: no interval"))


def peers_behind(rows: dict[str, list[Sample]], ours: str, mode: str, missing: dict[str, str]) -> list[Target]:
    """Issue 17: our row ahead of every peer row of the same mode, on both stages (peer time / ours > 1)."""
    found = []
    peers = [name for name, row in ROWS.items() if row.mode == mode and not row.ours]
    for peer in peers:
        for stage in STAGES:
            what = f"{ours} ahead of {peer} ({mode} vs {mode}), {stage} stage: {peer} / {ours} > 1"
            if peer not in rows or ours not in rows:
                found.append(Target(17, what, "-", "not measured", missing.get(peer) or missing.get(ours, "")))
                continue
            found.append(_ratio_target(17, what, ratio(rows, peer, ours, stage), 1.0))
    return found


def best_peer(rows: dict[str, list[Sample]], mode: str, stage: str) -> str | None:
    """The peer row of `mode` with the least median time in `stage`."""
    peers = [n for n, row in ROWS.items() if row.mode == mode and not row.ours and n in rows]
    return min(peers, key=lambda n: sorted(times(rows[n], stage))[len(rows[n]) // 2], default=None)


def accuracy_target(issue: int, what: str, correct: int, total: int, target: float, at_most: bool = False) -> Target:
    if total == 0:
        return Target(issue, what, "-", "not measured")
    low, high = wilson(correct, total)
    measured = f"{correct / total:.3f} [{low:.3f}-{high:.3f}] ({correct}/{total})"
    return Target(issue, what, measured, verdict(low, high, target, higher_is_better=not at_most))


def mean_interval(values: list[float]) -> tuple[float, float, float]:
    """Geometric mean and 95% t interval of repeated positive measurements (times, shares), on the log scale as
    the ratios are: a machine's noise multiplies, and a linear interval around one slow repetition ran below
    zero seconds. No interval from one measurement."""
    clean = [v for v in values if not math.isnan(v) and v > 0]
    if not clean:
        return math.nan, math.nan, math.nan
    logs = [math.log(v) for v in clean]
    mean = sum(logs) / len(logs)
    if len(logs) < 2:
        return math.exp(mean), math.nan, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in logs) / (len(logs) - 1))
    half = t95(len(logs) - 1) * sd / math.sqrt(len(logs))
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def seconds_target(issue: int, what: str, values: list[float], target: float, note: str = "") -> Target:
    mean, low, high = mean_interval(values)
    if math.isnan(mean):
        return Target(issue, what, "-", "not measured", note)
    measured = f"{mean:.2f} s" + (f" [{low:.2f}-{high:.2f}]" if not math.isnan(low) else " (one sample)")
    judged = verdict(low, high, target, higher_is_better=False) if not math.isnan(low) else "inconclusive"
    return Target(issue, what, measured, judged, note)


def roofline_shares(sample: Sample, machine: dict, stage: str) -> float:
    """roofline time / measured time of one stage of one sample (1.0: at the physical limit)."""
    tags = sample.results.get("tags", {})
    steps = sample.results.get("stages", {}).get(stage, {}).get("steps") or {}
    if not steps or "layer_bytes" not in tags:
        return math.nan
    gemm = machine["gemm_bf16_gflop_s"] if tags.get("gemm") == "bf16" else machine["gemm_fp32_gflop_s"]
    tiles = tags.get("tiles", "none")
    tile_rows = int(tags.get("tile_rows", 0)) if tiles != "none" else 0
    tile_rate = machine.get("int8_gop_s", math.nan) / (2 if tiles == "int8x2" else 1)
    roof = roofline_s(
        steps, float(tags["layer_bytes"]), float(tags["head_bytes"]), float(tags["layer_params"]),
        float(tags["head_params"]), machine["bandwidth_gb_s"], gemm, tile_rows, tile_rate,
    )  # fmt: skip
    return roof / sample.stage(stage, "wall_time_s")


def all_targets(rows: dict[str, list[Sample]], accuracy: dict, ready: dict, machine: dict,
                missing: dict[str, str]) -> list[Target]:  # fmt: skip
    """Every target of issues 17, 18 and 19 this bench can judge, from its rows, accuracy runs and ready times."""
    found: list[Target] = []
    for mode in (CONSTRAINED, PINNED, FREE):
        found += peers_behind(rows, OURS[mode], mode, missing)
    # 18: the model earns the accuracy, and the strategy costs no more than 1.2x the previous one's time
    for name, (correct, total, null_correct, null_total) in accuracy.get("default", {}).items():
        found.append(accuracy_target(18, f"null model at most 0.10 on the {name} set (default config)",
                                     null_correct, null_total, 0.10, at_most=True))  # fmt: skip
        found.append(accuracy_target(18, f"real model 0.95 or more on the {name} set (goal)", correct, total, 0.95))
    for previous, how in (("default-pinned-stepwise", "as it ran before jump-forward"),
                          ("default-pinned", "with jump-forward, which forces its every token")):  # fmt: skip
        if "default" in rows and previous in rows:
            for stage in STAGES:
                r = ratio(rows, "default", previous, stage)
                what = f"{stage} stage within 1.2x of the previous default ({how})"
                found.append(_ratio_target(18, what, r, 1.2, False))
    # 19: rooflines, batched against single, the best free peer, ready times
    if "default" in rows:
        for stage in STAGES:
            shares = [roofline_shares(s, machine, stage) for s in rows["default"]]
            mean, low, high = mean_interval(shares)
            what = f"default {stage} stage at 60% or more of its roofline"
            if math.isnan(mean):
                found.append(Target(19, what, "-", "not measured", "no step counts (not the engine?)"))
            else:
                text = f"{mean:.0%}" + (f" [{low:.0%}-{high:.0%}]" if not math.isnan(low) else "")
                found.append(
                    Target(19, what, text, verdict(low, high, 0.60) if not math.isnan(low) else "inconclusive")
                )
        batched_over_single = paired_ratio(times(rows["default"], "batched"), times(rows["default"], "single"))
        found.append(_ratio_target(19, "default batched stage at 0.5x the single stage or less",
                                   batched_over_single, 0.5, higher_is_better=False))  # fmt: skip
    if "default-free" in rows:
        for stage in STAGES:
            peer = best_peer(rows, FREE, stage)
            what = f"default-free 1.5x or more the best free peer ({peer or 'none ran'}), {stage} stage"
            if peer is None:
                found.append(Target(19, what, "-", "not measured", "no free peer ran"))
            else:
                found.append(_ratio_target(19, what, ratio(rows, peer, "default-free", stage), 1.5))
    warm_note = "from the process's start: interpreter and imports included"
    cold_note = "a fresh model cache prepared as make venv prepares it (python -m pipeline.prepare)"
    found.append(seconds_target(19, "warm process ready (start to warmed engine) in 1.0 s or less",
                                ready.get("warm", []), 1.0, warm_note))  # fmt: skip
    found.append(seconds_target(19, "cold first process after install ready in 10 s or less",
                                ready.get("installed", []), 10.0, cold_note))  # fmt: skip
    return found
