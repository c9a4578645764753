"""The benchmark's statistics, token matching and target verdicts, on made-up samples."""

from __future__ import annotations

import math

import pytest

from pipeline.bench import Sample, _targets, measure_read_bandwidth_gb_s, summarize, token_match_rate


def _sample(single_s, batched_s, decode_tps, weight_bytes=270e6, tokens=640):
    stage = {
        "wall_time_s": 0.0,
        "tokens_per_s": 0.0,
        "accuracy": 0.5,
        "generated_tokens": tokens,
        "first_token_mean_s": 0.02,
        "decode_tokens_per_s": decode_tps,
    }
    stages = {
        "single": {**stage, "wall_time_s": single_s, "tokens_per_s": tokens / single_s},
        "batched": {**stage, "wall_time_s": batched_s, "tokens_per_s": tokens / batched_s},
    }
    results = {"dtype": "bf16", "weight_format": "bf16", "weight_bytes": weight_bytes, "stages": stages}
    return Sample({**results, "load_time_s": 2.0, "warmup_time_s": 1.0})


def test_summarize_takes_median_min_and_sample_stddev():
    row = summarize("x", [_sample(4.0, 1.0, 100), _sample(6.0, 1.2, 100), _sample(5.0, 1.1, 100)], bandwidth_gb_s=54.0)
    assert row["single_time"] == pytest.approx((5.0, 4.0, 1.0))
    assert row["batched_time"][0] == pytest.approx(1.1)
    assert row["weight_gb_s"] == pytest.approx(27.0)  # 0.27 GB per token x 100 tokens/s
    assert row["roofline_share"] == pytest.approx(0.5)


def test_targets_report_met_and_missed_with_the_margin():
    rows = []
    for name, single, decode in [("seed_before", 15.0, 40), ("best", 2.0, 200), ("llamacpp", 6.0, 107)]:
        row = summarize(name, [_sample(single, 0.5, decode)], bandwidth_gb_s=54.0)
        rows.append(row)
    verdicts = {target: verdict for target, _, verdict in _targets(rows, [("fp32", 0.90), ("int8", 0.85)])}
    assert verdicts["batched >= 1000 generated tok/s"] == "met"  # 640 tokens in 0.5 s
    assert verdicts["single >= 1.5x llama.cpp tok/s"] == "met"  # 320 vs 107 tok/s
    assert verdicts["single >= 60% of bandwidth roofline"] == "met"  # 0.27 GB x 200 = 54 GB/s
    assert verdicts["accuracy within 2 points of fp32 (256 q)"].startswith("MISSED by 3.0")


def test_token_match_rate_compares_positions(tiny_fp32):
    tokenizer = tiny_fp32.tokenizer
    reference = {("single", 0): "6000 grams", ("single", 1): "abc"}
    assert token_match_rate(tokenizer, reference, reference) == 1.0
    changed = {("single", 0): "6000 grams", ("single", 1): "xyz"}
    assert 0 < token_match_rate(tokenizer, changed, reference) < 1
    assert math.isnan(token_match_rate(tokenizer, {}, reference))


def test_bandwidth_measurement_is_plausible():
    assert 0.5 < measure_read_bandwidth_gb_s(threads=1, size_mb=64, repeats=2) < 2000
