"""The bench: rows as data, targets judged with intervals, the roofline's arithmetic, the report, and one real run."""

from __future__ import annotations

import math
import subprocess
import sys
import time

import pytest

from pipeline.bench.judge import all_targets, best_peer, peers_behind, ratio, roofline_shares
from pipeline.bench.machine import cpu_busy_share, gemm_gflop_s, read_bandwidth_gb_s, roofline_s
from pipeline.bench.main import main, plan
from pipeline.bench.report import Report, render
from pipeline.bench.rows import CONSTRAINED, FREE, OURS, PINNED, ROWS, STRATEGIES
from pipeline.bench.run import RowFailed, Sample, run_row, token_match
from pipeline.errors import PipelineError

MACHINE = {"cpu": "test cpu", "kind": "avx2", "threads": 2, "torch": "2.13", "busy_before": 0.01, "busy_after": 0.02,
           "bandwidth_gb_s": 20.0, "gemm_fp32_gflop_s": 100.0, "gemm_bf16_gflop_s": 50.0}  # fmt: skip
WORK = {"layer_bytes": "80000000", "head_bytes": "30000000", "layer_params": "100000000", "head_params": "28000000",
        "gemm": "fp32", "weight_format": "q4"}  # fmt: skip


def _sample(single_s: float, batched_s: float, steps=None, ready_s=1.5, tokens=((1, 2, 3),)) -> Sample:
    stage = {"accuracy": 1.0, "num_questions": 1, "accuracy_null": 0.0, "forced_share": 0.0, "kld_mean": 1e-4,
             "top1_agreement": 1.0, "peak_rss_mb": 900.0, "steps": steps or {}}  # fmt: skip
    results = {
        "tags": WORK,
        "ready_s": ready_s,
        "stages": {"single": {**stage, "wall_time_s": single_s}, "batched": {**stage, "wall_time_s": batched_s}},
    }
    predictions = {(stage, i): {"token_ids": list(t), "correct": True, "forced": False}
                   for stage in ("single", "batched") for i, t in enumerate(tokens)}  # fmt: skip
    return Sample(results, predictions)


def test_every_mode_has_our_row_and_peers_only_meet_their_own_mode():
    assert {OURS[m] for m in (CONSTRAINED, PINNED, FREE)} <= set(ROWS)
    assert all(ROWS[OURS[row.mode]].mode == row.mode for row in ROWS.values())
    assert {row.mode for row in ROWS.values() if not row.ours} == {CONSTRAINED, PINNED, FREE}
    assert [s.name for s in STRATEGIES][0] == "default"


def test_a_peer_is_behind_only_when_the_whole_interval_says_so():
    rows = {
        "default": [_sample(2.0, 1.0), _sample(2.1, 1.1), _sample(1.9, 0.9)],
        "llamacpp": [_sample(4.0, 1.05), _sample(4.3, 1.0), _sample(3.9, 1.0)],  # single: 2x; batched: a tie
    }
    found = {t.what: t for t in peers_behind(rows, "default", CONSTRAINED, {"transformers-fp32": "not installed"})}
    single = next(t for w, t in found.items() if "llamacpp /" in w and "single" in w and "seq" not in w)
    batched = next(t for w, t in found.items() if "llamacpp /" in w and "batched" in w and "seq" not in w)
    assert single.verdict == "met" and batched.verdict == "inconclusive"
    missing = next(t for w, t in found.items() if "transformers-fp32" in w)
    assert missing.verdict == "not measured" and missing.note == "not installed"
    slower = {"default": rows["default"], "llamacpp": [_sample(1.0, 0.5), _sample(1.0, 0.5), _sample(1.1, 0.5)]}
    assert all(
        t.verdict == "missed" for t in peers_behind(slower, "default", CONSTRAINED, {}) if "llamacpp /" in t.what
    )
    assert ratio(rows, "llamacpp", "default", "single").value == pytest.approx(2.03, abs=0.02)


def test_one_round_is_never_a_verdict():
    rows = {"default": [_sample(2.0, 1.0)], "llamacpp": [_sample(4.0, 2.0)]}
    (single, _) = [t for t in peers_behind(rows, "default", CONSTRAINED, {}) if "llamacpp /" in t.what][:2]
    assert single.verdict == "inconclusive" and "one round" in single.note


def test_the_roofline_is_the_longer_of_reading_weights_and_doing_flops():
    # one-row step: 80 MB at 20 GB/s = 4 ms (FLOPs: 2e8 at 100 GFLOP/s = 2 ms); 256-row prefill: FLOPs win, 512 ms
    assert roofline_s({"1": 1}, 80e6, 30e6, 1e8, 2.8e7, 20.0, 100.0) == pytest.approx(0.004)
    assert roofline_s({"256": 1}, 80e6, 30e6, 1e8, 2.8e7, 20.0, 100.0) == pytest.approx(0.512)
    assert roofline_s({"head:1": 2}, 80e6, 30e6, 1e8, 2.8e7, 20.0, 100.0) == pytest.approx(0.003)
    sample = _sample(1.0, 0.5, steps={"1": 100})  # 100 steps of 4 ms in a 1 s stage: 40% of the limit
    assert roofline_shares(sample, MACHINE, "single") == pytest.approx(0.4)
    assert math.isnan(roofline_shares(_sample(1.0, 0.5), MACHINE, "single"))  # no step counts: not judged
    # passes through the int8 tiles count at the int8 product's rate, halved for two digits; GEMM above their limit
    # (32 rows: 6.4 GFLOP at 400 GOP/s = 16 ms; 64 rows past the limit at fp32's 100 GFLOP/s = 128 ms)
    assert roofline_s({"32": 1, "64": 1}, 80e6, 30e6, 1e8, 2.8e7, 20.0, 100.0, 32, 400.0) == pytest.approx(0.144)
    tiled = _sample(1.0, 0.5, steps={"32": 10})
    tiled.results["tags"] = {**WORK, "tiles": "int8x2", "tile_rows": "32"}
    machine = {**MACHINE, "int8_gop_s": 800.0}
    assert roofline_shares(tiled, machine, "single") == pytest.approx(0.16)  # 10 x 16 ms in 1 s
    tiled.results["tags"]["tiles"] = "int8"  # one digit: the full int8 rate, 8 ms a pass
    assert roofline_shares(tiled, machine, "single") == pytest.approx(0.08)


def test_all_targets_judge_accuracy_ready_times_and_the_best_free_peer():
    steps = {"1": 300}
    rows = {
        "default": [_sample(2.0, 0.8, steps), _sample(2.1, 0.9, steps), _sample(2.0, 0.85, steps)],
        "default-free": [_sample(2.0, 0.8), _sample(2.1, 0.85), _sample(2.0, 0.8)],
        "llamacpp-free": [_sample(4.0, 2.0), _sample(4.2, 2.1), _sample(4.1, 2.0)],
        "ctranslate2-free": [_sample(9.0, 6.0), _sample(9.5, 6.2), _sample(9.1, 6.1)],
    }
    accuracy = {"default": {"shipped": (250, 256, 5, 256), "holdout": (230, 256, 40, 256)}}
    ready = {"warm": [0.9, 0.95], "installed": [12.0, 12.5, 13.0], "cold": [20.0]}
    found = all_targets(rows, accuracy, ready, MACHINE, {})
    by = {t.what: t for t in found}
    assert by["null model at most 0.10 on the shipped set (default config)"].verdict == "met"
    assert by["null model at most 0.10 on the holdout set (default config)"].verdict == "missed"  # 40/256 = 0.156
    assert by["real model 0.95 or more on the shipped set (goal)"].verdict == "inconclusive"  # 0.977 [0.95-0.99]
    assert by["real model 0.95 or more on the holdout set (goal)"].verdict == "missed"  # 0.898 [0.855-0.930]
    assert best_peer(rows, FREE, "single") == "llamacpp-free"
    free = [t for t in found if t.what.startswith("default-free 1.5x")]
    assert len(free) == 2 and all(t.verdict == "met" for t in free)
    assert by["cold first process after install ready in 10 s or less"].verdict == "missed"
    warm = by["warm process ready (start to warmed engine) in 1.0 s or less"]
    assert warm.verdict in ("met", "inconclusive") and "interpreter" in warm.note
    assert by["default batched stage at 0.5x the single stage or less"].verdict == "met"
    roof = by["default single stage at 60% or more of its roofline"]  # 300 x 4 ms / 2 s = 60%
    assert roof.measured.startswith("59%") or roof.measured.startswith("60%") or roof.measured.startswith("58%")


def test_token_match_pairs_the_same_question_and_stage():
    a, b = _sample(1, 1, tokens=((1, 2), (3, 4))), _sample(1, 1, tokens=((1, 2), (3, 5)))
    assert token_match(a, b, "batched") == 0.5 and token_match(a, a, "single") == 1.0


def test_plan_refuses_an_unknown_row_naming_the_valid_ones():
    assert plan(["default-free", "default"]) == ["default", "default-free"]
    with pytest.raises(PipelineError, match="unknown bench row 'fastest'.*default"):
        plan(["fastest"])
    with pytest.raises(SystemExit):
        main(["--only", "fastest"])


def test_a_failing_row_is_its_error_line(tmp_path):
    with pytest.raises(RowFailed, match=r"exit 2: error: precision=fp64 is not an option"):
        run_row(["precision=fp64"], tmp_path / "row")


def test_the_report_states_the_kind_the_missing_rows_and_each_verdict():
    rows = {"default": [_sample(2.0, 1.0), _sample(2.2, 1.1)], "default-free": [_sample(2.0, 1.0)]}
    report = Report("python -m pipeline.bench", "2026-12-01 10:00", "abc123", {**MACHINE, "choices": "q4"}, rows,
                    {"llamacpp": "llama_cpp is not installed"}, {}, {},
                    {"warm": [1.2], "warm_first_stage": [1.74], "cold": []})  # fmt: skip
    report.targets = all_targets(rows, {}, report.ready, MACHINE, report.missing)
    text = render(report)
    assert "**CPU kind: avx2**" in text and "llamacpp: llama_cpp is not installed" in text
    assert "| default | constrained | 2.10 [2.00-2.20] |" in text
    assert "**not measured**" in text and "**inconclusive**" in text
    assert "reached their first stage" in text and "at 1.74 s" in text  # beside the ready time, not instead of it
    assert "What MLflow costs" not in text  # not measured: not shown

    report.ready.update(
        {
            "untracked": [1.2, 1.3],
            "untracked_first_stage": [1.5, 1.6],
            "untracked_process": [3.0, 3.1],
            "tracked_new": [1.4],
            "tracked_new_first_stage": [4.5],
            "tracked_new_process": [9.0],
        }
    )
    text = render(report)
    assert "- without MLflow (`tracking.enabled=false`): 1.20, 1.30 / 1.50, 1.60 / 3.00, 3.10" in text
    assert "- with MLflow into a new SQLite store (its tables made): 1.40 / 4.50 / 9.00" in text
    assert "- with MLflow into that store again: - / - / -" in text


def test_the_machine_measurements_are_plausible():
    assert 0.5 < read_bandwidth_gb_s(size_mb=128, repeats=2) < 2000
    assert 0.1 < gemm_gflop_s(__import__("torch").float32, rows=64, repeats=2) < 1e5
    share = cpu_busy_share(0.2)
    assert math.isnan(share) or 0 <= share <= 1


@pytest.mark.slow
def test_quick_bench_end_to_end_on_the_tiny_model(tmp_path):
    """Real processes: two rows, one round, the accuracy runs and a cold start; the report holds all of them."""
    out = tmp_path / "BENCH.md"
    main(["--quick", "--model", "tiny", "--only", "default", "default-free", "--work", str(tmp_path / "work"),
          "--out", str(out)])  # fmt: skip
    text = out.read_text()
    assert "| default | constrained |" in text and "| default-free | free |" in text
    assert "| default (the default strategy) | shipped |" in text and "the first process after install" in text
    assert "## Targets" in text and "warm process ready" in text


def test_time_intervals_are_on_the_log_scale_and_never_below_zero():
    """Ready times with one slow repetition (22.7 s among 3.6 and 3.8, seen in a bench): the interval stays
    positive and wide (inconclusive against 1 s rather than a negative bound), and steady times judge as before."""
    from pipeline.bench.judge import mean_interval, seconds_target

    mean, low, high = mean_interval([22.69, 3.58, 3.81])
    assert 0 < low < 3.58 < 22.69 < high and abs(mean - (22.69 * 3.58 * 3.81) ** (1 / 3)) < 1e-9
    assert seconds_target(19, "warm", [22.69, 3.58, 3.81], 1.0).verdict == "inconclusive"
    assert seconds_target(19, "warm", [3.6, 3.8, 3.7], 1.0).verdict == "missed"
    assert seconds_target(19, "warm", [0.5, 0.52, 0.51], 1.0).verdict == "met"
    one = mean_interval([2.0])
    assert one[0] == 2.0 and math.isnan(one[1]) and math.isnan(one[2])  # no interval from one


@pytest.mark.parametrize("delay_s", [0.0, 0.4])
def test_seconds_since_start_is_the_process_own_age_as_its_parent_times_it(delay_s):
    # the ready time is this figure: psutil's create_time (whole-second boot time) made every process seem up to a
    # second older (0.63 s for a process that had lived 0.05 s on the machine where it was found)
    code = (
        f"import time\ntime.sleep({delay_s})\nfrom pipeline.memory import seconds_since_start\n"
        "print(seconds_since_start())"
    )
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    lived = time.perf_counter() - start
    assert done.returncode == 0, done.stderr[-800:]
    said = float(done.stdout.strip())
    assert delay_s <= said <= lived + 0.02  # a clock tick (10 ms) of rounding, and a tick's slack


def test_a_bench_on_another_kind_writes_beside_the_report_it_would_overwrite(tmp_path):
    from pipeline.bench.main import default_out

    first = tmp_path / "BENCHMARKS.md"
    assert default_out("avx2", first) == first  # nothing there yet
    first.write_text("Made by `python -m pipeline.bench` ... **CPU kind: avx512_bf16** (AMD EPYC), 2 threads\n")
    assert default_out("avx512_bf16", first) == first  # the same kind: rewritten
    assert default_out("avx2", first) == tmp_path / "BENCHMARKS_avx2.md"
    forced = "avx512_bf16 (forced; the CPU is amx)"
    assert default_out(forced, first) == tmp_path / "BENCHMARKS_avx512_bf16_forced_the_CPU_is_amx.md"
