"""The stage arithmetic every figure rests on (first-token time, decode tokens/s, budgets), by hand."""

from __future__ import annotations

import json
import math

import pytest

from pipeline.data import Item
from pipeline.results import Generation, RunResult, finish_stage, save_results
from pipeline.stages import keep_output

ITEMS = [Item("6 kg in g?", 6000.0), Item("3 h in min?", 180.0), Item("7 m in m?", 7.0), Item("2 kB in B?", 2000.0)]


def _finish(name, generations, wall_time_s=2.0, budget_s=2.5, overhead_s=1.0):
    items = ITEMS[: len(generations)]
    processed = [keep_output(g.text, item.question) for g, item in zip(generations, items)]  # scored as written
    return finish_stage(name, items, generations, processed, wall_time_s, 0.05, budget_s, overhead_s, 2)


def test_single_stage_timing_accuracy_and_budgets():
    stage = _finish(
        "single",
        [
            Generation("<answer>6000</answer>", 5, latency_s=1.0, first_token_s=0.2),
            Generation("<answer>180</answer>", 3, latency_s=0.5, first_token_s=0.1),
            Generation("no tag", 1, latency_s=0.3, first_token_s=0.3, hit_budget=True),
        ],
    )
    assert stage.generated_tokens == 9 and stage.tokens_per_s == pytest.approx(9 / 2.0)
    assert stage.accuracy == pytest.approx(2 / 3) and stage.answer_rate == pytest.approx(2 / 3)
    assert stage.first_token_mean_s == pytest.approx((0.2 + 0.1 + 0.3) / 3)
    # tokens after the first of each call, over the time after each call's first token
    assert stage.decode_tokens_per_s == pytest.approx((4 + 2 + 0) / (0.8 + 0.4 + 0.0))
    assert (stage.latency_p50_s, stage.latency_max_s) == pytest.approx((0.5, 1.0))
    assert stage.latency_p90_s == pytest.approx(0.5 + 0.8 * (1.0 - 0.5))  # linear between the 2nd and 3rd
    assert stage.within_budget  # 2.0 s <= 2.5 s
    assert not stage.within_budget_with_load  # 2.0 s + 1.0 s of load and warm-up > 2.5 s
    assert stage.num_hit_budget == 1 and [p.correct for p in stage.predictions] == [True, True, False]
    assert math.isnan(stage.predictions[2].parsed)


def test_rows_of_one_batched_call_share_its_clock_once():
    call_a = dict(latency_s=2.0, first_token_s=0.5)  # rows 0 and 1
    call_b = dict(latency_s=1.0, first_token_s=0.4)  # rows 2 and 3
    stage = _finish(
        "batched",
        [
            Generation("<answer>6000</answer>", 5, **call_a),
            Generation("<answer>1</answer>", 3, **call_a),
            Generation("<answer>7</answer>", 4, **call_b),
            Generation("<answer>2000</answer>", 1, **call_b),
        ],
        wall_time_s=3.0,
    )
    assert stage.first_token_mean_s == pytest.approx((0.5 + 0.4) / 2)  # per call, not per row
    # 9 tokens after the first ones, in 1.5 s + 0.6 s of decoding: not divided again by the batch size
    assert stage.decode_tokens_per_s == pytest.approx((4 + 2 + 3 + 0) / (1.5 + 0.6))
    assert stage.tokens_per_s == pytest.approx(13 / 3.0) and stage.accuracy == pytest.approx(3 / 4)


def test_single_calls_with_equal_clocks_still_count_each():
    same = dict(latency_s=1.0, first_token_s=0.25)
    stage = _finish("single", [Generation("a", 3, **same), Generation("b", 3, **same)])
    assert stage.decode_tokens_per_s == pytest.approx(4 / 1.5)  # two calls of 0.75 s each


def test_budget_with_load_is_inclusive_at_the_limit():
    stage = _finish("single", [Generation("<answer>6000</answer>", 2, 1.0, 0.5)], wall_time_s=1.5, overhead_s=1.0)
    assert stage.within_budget and stage.within_budget_with_load  # 1.5 + 1.0 == 2.5
    late = _finish("single", [Generation("<answer>6000</answer>", 2, 1.0, 0.5)], wall_time_s=2.6, overhead_s=0.0)
    assert not late.within_budget and not late.within_budget_with_load


def test_metrics_are_numbers_keyed_by_stage_and_the_folder_holds_them(tmp_path):
    stage = _finish("single", [Generation("<answer>6000</answer>", 1, 1.0)])  # first-token time unknown
    metrics = stage.metrics()
    assert metrics["single/within_budget"] == 1.0 and metrics["single/generated_tokens"] == 1.0
    assert "single/first_token_mean_s" not in metrics and "single/decode_tokens_per_s" not in metrics  # NaN
    run = RunResult("fp32", "fp32", 100, "cpu", "sdpa", "tiny", 2.0, 1.0, 1, {"device_name": "x"}, stages=[stage])
    save_results(run, tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["metrics"]["load_time_s"] == 2.0 and saved["stages"]["single"]["accuracy"] == 1.0
    assert (tmp_path / "predictions.csv").read_text().count("\nsingle,") == 1
