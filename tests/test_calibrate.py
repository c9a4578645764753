"""precision=auto's calibration: its choices from measured times, its cache, its noise rule, and a measurement that
runs."""

from __future__ import annotations

import json
import math
import os
import time

import pytest

from pipeline.calibrate import (
    BUSY_SHARE,
    FOLLOWED_ROWS,
    GEMM_GAIN,
    MIX,
    ROWS,
    TILE_ROWS,
    Calibration,
    _interleaved,
    calibrate,
    candidates,
    cpu_seconds,
    measure,
    other_load,
)


def _calibration(**step_ms) -> Calibration:
    return Calibration({name.replace("__", ":"): times for name, times in step_ms.items()}, "test cpu", 0.1)


def _times(one: float, thirty_two: float) -> dict[str, float]:
    """Step times growing linearly from one row to 32 rows."""
    return {str(r): one + (thirty_two - one) * (r - 1) / 31 for r in ROWS}


def test_the_format_is_chosen_by_the_stages_mix_of_one_row_and_batched_steps():
    # q8's one-row step is a little faster, q4's batched step much faster: the mix decides for q4
    cal = _calibration(
        engine__fp32=_times(80, 120), engine__q8=_times(9.0, 200), engine__q4=_times(9.5, 60),
        engine__gemm=_times(100, 90),
    )  # fmt: skip
    assert MIX[1] * 9.0 + MIX[32] * 90 > MIX[1] * 9.5 + MIX[32] * 60
    assert cal.engine_format() == "q4"
    assert cal.engine_format(allowed=("fp32", "q8")) == "q8"  # q4 not exact for the source: never picked
    assert cal.engine_format(allowed=("fp32",)) == "fp32"
    slow_kernels = _calibration(engine__fp32=_times(10, 100), engine__q4=_times(30, 400), engine__gemm=_times(40, 110))
    assert slow_kernels.engine_format() == "fp32"


def test_the_kernel_runs_up_to_the_rows_where_gemm_is_faster():
    cal = _calibration(engine__q4=_times(9, 400), engine__gemm=_times(100, 120), engine__fp32=_times(80, 120))
    # q4 crosses GEMM between 8 rows (9 + 391 * 7/31 = 97) and 32
    assert cal.kernel_rows("q4") == 8
    assert _calibration(engine__q4=_times(200, 400), engine__gemm=_times(100, 120)).kernel_rows("q4") == 0


def test_the_lm_head_runs_our_kernel_for_a_full_batch_where_it_measured_no_slower_than_gemm():
    base = dict(engine__q4=_times(9, 400), engine__gemm=_times(100, 120), engine__fp32=_times(80, 120))
    assert _calibration(**base).kernel_rows("q4") == 8
    assert _calibration(**base, engine__head_q8={"32": 12.0}, engine__head_fp32={"32": 18.0}).head_rows("q4") == 32
    # the head's GEMM faster (or the head not measured, an older calibration): the layers' limit
    assert _calibration(**base, engine__head_q8={"32": 20.0}, engine__head_fp32={"32": 18.0}).head_rows("q4") == 8
    assert _calibration(**base).head_rows("q4") == 8
    # never a format of its own
    assert _calibration(**base, engine__head_q8={"32": 1.0}, engine__head_fp32={"32": 1.0}).engine_format() == "q4"
    # with bf16 GEMM for the layers, the head's kernel is weighed against the head's bf16 GEMM, which runs then
    heads = dict(engine__head_q8={"32": 12.0}, engine__head_fp32={"32": 18.0}, engine__head_bf16={"32": 4.0})
    assert _calibration(**base, **heads).head_rows("q4", "bf16") == 8
    assert _calibration(**base, **heads).head_rows("q4", "fp32") == 32
    # a calibration from before the bf16 head was timed: against fp32 GEMM, as then
    assert (
        _calibration(**base, engine__head_q8={"32": 12.0}, engine__head_fp32={"32": 18.0}).head_rows("q4", "bf16") == 32
    )


def test_bf16_gemm_is_taken_only_for_a_clear_gain():
    base = dict(engine__q4=_times(9, 400), engine__gemm=_times(100, 100))
    assert _calibration(**base, engine__gemm_bf16=_times(60, 60)).gemm_dtype() == "bf16"
    assert _calibration(**base, engine__gemm_bf16=_times(95, 95)).gemm_dtype() == "fp32"  # 5%: not worth rounding
    assert _calibration(**base).gemm_dtype() == "fp32"  # not native here: not measured


def test_int8_tiles_take_the_rows_past_the_kernel_up_to_where_gemm_is_faster():
    """The tiles (q4 only) run from the kernel's limit up to where they stop measuring within GEMM_GAIN of bf16
    GEMM (interpolated between the row counts timed); the kernel's limit, the format's cost and jump-forward weigh
    what then runs past the kernel."""
    gemms = dict(engine__gemm=_times(100, 100), engine__gemm_bf16=_times(30, 40))
    gemms["engine:gemm_bf16"] = gemms.pop("engine__gemm_bf16") | {"128": 90.0}
    tiles = {"4": 5.0, "8": 8.0, "32": 25.0, "128": 110.0}
    base = dict(engine__fp32=_times(80, 120), engine__q4=_times(4, 70), engine__q8=_times(4, 70))
    cal = _calibration(**base, **gemms, engine__tiles=tiles)
    assert cal.gemm_dtype() == "bf16"
    # 0.63x bf16's time at 32 rows, 1.22x at 128: the limit is where the ratio crosses 1.1, in log rows
    assert cal.tile_rows("q4") == 96
    assert cal.tile_rows("q8") == 0  # tiles hold q4 weights only
    # q4's kernel (4 + 66 * 3/31 = 10.4 ms at 4 rows) is slower than the tiles: it keeps one row; q8's is weighed
    # against bf16 (18.9 ms against 32.3 at 8 rows, 70 against 40 at 32)
    assert cal.kernel_rows("q4") == 1 and cal.kernel_rows("q8") == 8
    assert cal.kernel_rows("q4", tiles=False) == 8  # precision.gemm=bf16 asked for: the kernel against bf16 alone
    assert cal.many_ms(32, "q4") == 25.0 and cal.many_ms(128, "q4") == 90.0 and cal.many_ms(32, "q8") == 40.0
    assert cal.engine_format() == "q4"  # q4 and q8 alike but for the tiles' 32-row step
    assert cal.jump_forward_pays("q4")  # 8 rows in the tiles (8 ms) against 8 one-row steps (32 ms)
    assert cal.choices() != _calibration(**base, **gemms).choices()
    slow = _calibration(**base, **gemms, engine__tiles={"4": 50.0, "8": 8.0, "32": 25.0, "128": 80.0})
    assert slow.tile_rows("q4") == 0  # slower at 4 rows: not used at all, whatever larger counts measured
    assert _calibration(**base, **gemms).tile_rows("q4") == 0  # not measured (an AVX2 CPU): never


def test_the_tiles_take_one_row_too_only_where_they_measured_a_clear_gain_over_our_kernel():
    """Where our q4 kernel is compute-bound at one row (an AMX Xeon: 6.3 ms against the tiles' 4.6 in the engine)
    the tiles decode; the head (q8: no tiles) keeps our kernel; jump-forward and the format weigh the step that
    runs. Within GEMM_GAIN, or without tiles, our kernel (fp32 activations: more exact) keeps the row."""
    gemms = dict(engine__gemm=_times(100, 100), engine__gemm_bf16=_times(30, 40))
    base = dict(engine__fp32=_times(80, 120), engine__q4=_times(8, 70), engine__q8=_times(9, 70))

    def cal(tiles_one: float, **extra) -> Calibration:
        tiles = {"1": tiles_one, "4": 5.0, "8": 8.0, "32": 25.0, "128": 110.0}
        return _calibration(**base, **gemms, engine__tiles=tiles, **extra)

    fast = cal(5.5)
    assert fast.tiles_one_row("q4") and fast.kernel_rows("q4") == 0 and fast.one_row_ms("q4") == 5.5
    assert fast.kernel_rows("q4", tiles=False) > 0  # precision.gemm=bf16 asked for: no tiles, the kernel's rows
    assert fast.head_rows("q4") == 1  # the lm_head's q8 has no tiles: our kernel for one row
    assert not fast.tiles_one_row("q8") and fast.kernel_rows("q8") > 0  # tiles hold q4 only
    assert fast.choices() != cal(7.9).choices()
    edge = 8.0 / GEMM_GAIN
    assert not cal(edge * 1.01).tiles_one_row("q4") and cal(edge * 0.99).tiles_one_row("q4")
    assert cal(7.9).kernel_rows("q4") == 1 and cal(7.9).one_row_ms("q4") == 8.0
    # against the kernel's int8 activations where those were taken (they are the one-row step then)
    with_x8 = cal(5.5, engine__q4x8={"1": 5.2})
    assert with_x8.int8_activations("q4") and not with_x8.tiles_one_row("q4") and with_x8.one_row_ms("q4") == 5.2
    # where the layers alone were timed, they decide (the head, on our kernel either way, thins the ratio): the
    # whole steps' 7.9 against 8.0 ms, the layers' 4.6 against 6.3
    layers = dict(engine__layers_tiles={"1": 4.6}, engine__layers_q4={"1": 6.3})
    assert cal(7.9, **layers).tiles_one_row("q4") and cal(7.9, **layers).kernel_rows("q4") == 0
    assert not cal(5.5, engine__layers_tiles={"1": 6.0}, engine__layers_q4={"1": 6.3}).tiles_one_row("q4")
    # tiles not used past the kernel at all (slower at 4 rows than bf16 GEMM): not for one row either
    slow = _calibration(**base, **gemms, engine__tiles={"1": 1.0, "4": 50.0, "8": 80.0, "32": 250.0, "128": 900.0})
    assert slow.tile_rows("q4") == 0 and not slow.tiles_one_row("q4") and slow.kernel_rows("q4") == 8
    # jump-forward against eight one-row steps of what runs them: 8 rows in the tiles (8 ms) against 8 x 0.9 ms
    assert cal(7.9).jump_forward_pays("q4") and not cal(0.9).jump_forward_pays("q4")
    # the format's cost counts the tiles' one-row step where int8 activations are allowed
    q8_cheaper = dict(engine__fp32=_times(80, 120), engine__q4=_times(8, 70), engine__q8=_times(6.5, 60))
    both = _calibration(**q8_cheaper, **gemms, engine__tiles={"1": 4.0, "4": 5.0, "8": 8.0, "32": 60.0, "128": 300.0})
    assert both.engine_format(int8_activations=False) == "q8" and both.engine_format(int8_activations=True) == "q4"


def test_a_step_of_few_rows_is_timed_right_after_one_on_the_same_weights():
    """A stage's steps follow each other on the same weights; timed after another candidate instead, a step read
    its weights from memory where the stage finds them in cache (our kernel vs the tiles at one row: 7.7 / 6.3 ms
    there, 6.3 / 4.6 ms in the engine, AMX Xeon). Steps of more rows run once per round."""
    calls: list[str] = []
    tasks = [(f"c{rows}", rows, lambda rows=rows: calls.append(f"c{rows}")) for rows in (1, FOLLOWED_ROWS, 32, 128)]
    median, spread = _interleaved(tasks, reps=2)
    warm = ["c1", "c8", "c32", "c128"]
    one_round = ["c1", "c1", "c8", "c8", "c32", "c128"]
    assert FOLLOWED_ROWS == 8 and calls == warm + one_round + one_round
    assert median == {f"c{r}": {str(r): median[f"c{r}"][str(r)]} for r in (1, 8, 32, 128)}
    assert set(spread) == set(median)


def test_int8_activations_are_picked_only_for_a_clear_gain_and_follow_the_allowed_activations():
    cal = _calibration(
        engine__fp32=_times(80, 120),
        engine__q4=_times(12, 60),
        engine__q4x8={"1": 6},  # x8: 2x faster
        engine__q8=_times(20, 60),
        engine__q8x8={"1": 19.5},  # 2.5% faster: noise, not worth inexactness
        engine__gemm=_times(100, 100),
    )
    assert cal.int8_activations("q4") and not cal.int8_activations("q8")
    swapped = _calibration(
        engine__fp32=_times(80, 120),
        engine__q4=_times(12, 60),
        engine__q4x8={"1": 6},
        engine__q8=_times(10, 60),
        engine__q8x8={"1": 8},
        engine__gemm=_times(100, 100),
    )
    assert swapped.engine_format() == "q8" and swapped.engine_format(int8_activations=True) == "q4"
    assert not _calibration(engine__q4=_times(12, 400)).int8_activations("q4")  # not measured: never
    # 10% faster: within what one calibration's noise gave here, not worth the inexactness
    assert not _calibration(engine__q4=_times(12, 60), engine__q4x8={"1": 10.9}).int8_activations("q4")


def test_slower_than_fp32_names_the_worst_case_and_stays_quiet_within_noise():
    cal = _calibration(
        transformers__fp32=_times(85, 100), transformers__bf16=_times(60, 500), transformers__int8=_times(90, 105)
    )
    warning = cal.slower_than_fp32("transformers:bf16")
    assert "bf16 measured 5.0x slower than fp32 for a step of 32 rows" in warning
    assert cal.slower_than_fp32("transformers:int8") == ""  # 6% slower: noise, not a finding
    assert cal.slower_than_fp32("engine:q4") == ""  # not measured here: the caller says what runs instead
    assert cal.transformers_dtype() == "fp32"  # faster for one row, far slower for a batch: not picked
    fast_bf16 = _calibration(transformers__fp32=_times(85, 100), transformers__bf16=_times(40, 60))
    assert fast_bf16.transformers_dtype() == "bf16"


def _tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)  # fmt: skip


def test_measure_times_the_real_step_of_every_candidate_and_the_cache_is_reused(tmp_path, monkeypatch):
    config = _tiny_config()
    step_ms, spread = measure(config, reps=2)
    assert set(step_ms) == set(candidates())
    for name, times in step_ms.items():
        expected = {"1"} if name.endswith("x8") else {str(r) for r in ROWS}
        if name.startswith(("engine:gemm", "engine:tiles")):
            expected = {str(r) for r in TILE_ROWS}  # one row is our kernel's or the tiles'; 128 rows: a prefill
        if name == "engine:tiles":
            expected |= {"1"}  # which may beat our kernel for one row
        if name.startswith("engine:layers"):
            expected = {"1"}  # that choice on the layers alone
        if name.startswith("engine:head"):
            expected = {str(max(ROWS))}  # the lm_head of a full batched step, our kernel against GEMM
        assert set(times) == expected and min(times.values()) > 0 and set(spread[name]) == expected, name
        assert all(value >= 1.0 for value in spread[name].values())

    # the tiny model's steps take a fraction of a millisecond, so on a shared machine their repetitions may spread
    # past the noise rule, which would then (rightly) not cache them; that rule has its own test below
    monkeypatch.setattr("pipeline.calibrate.NOISY", float("inf"))
    monkeypatch.setattr("pipeline.calibrate.BUSY_SHARE", float("inf"))  # likewise for other processes' load
    first = calibrate(config, tmp_path, log=lambda _: None)
    saved = next((tmp_path / "calibration").glob("*.json"))
    assert json.loads(saved.read_text())["step_ms"] == first.step_ms and first.cached

    def refuse(*args, **kwargs):
        raise AssertionError("measured again although a calibration is cached")

    monkeypatch.setattr("pipeline.calibrate.measure", refuse)
    assert calibrate(config, tmp_path, log=lambda _: None).step_ms == first.step_ms


def test_a_noisy_calibration_is_measured_again_and_never_cached(tmp_path, monkeypatch):
    """Repetitions that spread widely mean a busy machine: measure once more, and if still noisy, use it for this
    process only (the first result used to be cached for good)."""
    calls = []

    def noisy(config, reps=5, backend=None):
        calls.append(1)
        return {"engine:fp32": {"1": 10.0}}, {"engine:fp32": {"1": 3.0}}

    monkeypatch.setattr("pipeline.calibrate.measure", noisy)
    lines: list[str] = []
    result = calibrate(_tiny_config(), tmp_path, log=lines.append)
    assert len(calls) == 2 and not result.cached and not (tmp_path / "calibration").exists()
    assert any("used for this run only" in line for line in lines)


def _steady(config, reps=5, backend=None, reverse=False):
    """A measurement whose repetitions agree, taking 0.6 s of this process's threads (as the real one does)."""
    import torch

    end = time.perf_counter() + 0.6
    a = torch.randn(256, 256)
    while time.perf_counter() < end:
        a = torch.tanh(a @ a)
    return {"engine:fp32": {"1": 10.0}}, {"engine:fp32": {"1": 1.0}}


def test_a_calibration_made_while_other_processes_keep_the_cpus_busy_is_used_once_and_not_cached(tmp_path, monkeypatch):
    """Other processes busy on every CPU: repetitions can agree and still rank the candidates as that busy machine
    does, so the result serves this run only and says why."""
    import subprocess
    import sys

    monkeypatch.setattr("pipeline.calibrate.measure", _steady)
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:
        time.sleep(0.3)  # started and spinning
        lines: list[str] = []
        result = calibrate(_tiny_config(), tmp_path, log=lines.append)
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    assert result.other_load > BUSY_SHARE and not result.cached
    assert not (tmp_path / "calibration").exists()
    assert any("other processes kept" in line and "used for this run only" in line for line in lines)


def test_a_calibration_counts_its_own_threads_as_its_own(tmp_path, monkeypatch):
    """The measurement's own (multi-threaded) work is no other process's load: on an idle machine it is cached."""
    monkeypatch.setattr("pipeline.calibrate.measure", _steady)
    result = calibrate(_tiny_config(), tmp_path, log=lambda _: None)
    assert 0.0 <= result.other_load < BUSY_SHARE and result.cached
    assert json.loads(next((tmp_path / "calibration").glob("*.json")).read_text())["other_load"] == result.other_load


def test_other_load_is_the_machine_s_busy_time_less_this_process_s():
    cpus = os.cpu_count() or 1
    assert other_load((100.0, 10.0), (100.0 + 2.0 * cpus, 10.0 + 1.0 * cpus), 2.0) == pytest.approx(0.5)
    assert other_load((100.0, 10.0), (101.0, 11.5), 1.0) == 0.0  # never below zero (tick rounding)
    assert math.isnan(other_load(None, (1.0, 1.0), 1.0))
    assert math.isnan(other_load((100.0, 10.0), (101.0, 10.0), 0.01))  # too short to tell
    before = cpu_seconds()
    assert before is not None and before[0] > 0 and before[1] > 0  # /proc/stat and this process's times


def test_the_transformers_backend_follows_the_calibration(compose_cfg, monkeypatch):
    """auto takes the dtype measured faster; an explicit one measured slower than fp32 says so and names fp32."""
    import torch
    from omegaconf import OmegaConf

    from pipeline.backends.hf import TransformersBackend

    def fake(bf16_first_row_ms):
        times = {"transformers:fp32": _times(80, 100), "transformers:bf16": _times(bf16_first_row_ms, 90)}
        return lambda *args, **kwargs: Calibration(times, "test cpu", 0.0)

    def backend(precision):
        cfg = OmegaConf.to_object(compose_cfg(["backend=transformers", "model=tiny", f"precision={precision}"]))
        return TransformersBackend(cfg, log=lambda _: None)

    monkeypatch.setattr("pipeline.calibrate.calibrate", fake(40))  # bf16 faster for 1 and 32 rows
    auto = backend("auto")
    assert auto.model.dtype == torch.bfloat16 and any("lossy" in w for w in auto.warnings)
    assert not backend("bf16").warnings
    monkeypatch.setattr("pipeline.calibrate.calibrate", fake(400))  # bf16 5x slower for one row
    assert backend("auto").model.dtype == torch.float32
    (warning,) = backend("bf16").warnings
    assert "bf16 measured 5.0x slower than fp32 for a decode step" in warning and "precision=fp32" in warning


def test_a_calibration_is_confirmed_by_a_second_measurement_and_a_third_where_they_disagree(tmp_path, monkeypatch):
    """Repetitions can agree and all be slow for one candidate (seen here: q4's one-row step at 7.9 ms three times
    against 4-5 ms, which cached int8 activations). A second measurement in the opposite order is taken, a third
    where the two lead to other choices, and each candidate keeps its median over them."""
    import pipeline.calibrate as calibrate_module

    def canned(q4_one: float, q4x8_one: float) -> tuple[dict, dict]:
        step_ms = {"engine:fp32": _times(80, 120), "engine:q4": _times(q4_one, 60), "engine:q4x8": {"1": q4x8_one}}
        return step_ms, {name: {rows: 1.1 for rows in times} for name, times in step_ms.items()}

    def run(passes: list[tuple[dict, dict]]) -> tuple[Calibration, list[bool]]:
        orders = []

        def fake(config, reps=3, backend=None, reverse=False):
            orders.append(reverse)
            return passes[len(orders) - 1]

        monkeypatch.setattr(calibrate_module, "measure", fake)
        monkeypatch.setattr(calibrate_module, "candidates", lambda backend=None: [f"{backend}:{len(passes)}"])
        folder = tmp_path / str(len(list(tmp_path.iterdir())))  # a cache of its own
        return calibrate(_tiny_config(), folder, log=lambda _: None), orders

    # the first measurement slow for q4's one-row step: int8 activations would win there; the second disagrees
    cal, orders = run([canned(7.9, 5.0), canned(4.5, 5.0), canned(4.6, 5.1)])
    assert orders == [False, True, False]  # the second in the opposite order, a third since the choices differed
    assert cal.time("engine:q4", 1) == 4.6 and not cal.int8_activations("q4") and cal.cached
    assert Calibration(*canned(7.9, 5.0)[:1], "x", 0.0).int8_activations("q4")  # what the first alone chose
    # two measurements that agree: no third, and their mean
    cal, orders = run([canned(4.5, 5.0), canned(4.7, 4.9)])
    assert orders == [False, True] and cal.time("engine:q4x8", 1) == pytest.approx(4.95)
    assert cal.time("engine:q4", 1) == pytest.approx(4.6)
    # two of three without int8 activations, one with them (its int8 step lucky): each candidate's least would
    # take them (3.7 * 1.15 < 4.4); the median of each does not (4.1 * 1.15 > 4.6)
    cal, orders = run([canned(4.4, 4.1), canned(5.2, 3.7), canned(4.6, 4.2)])
    assert orders == [False, True, False] and not cal.int8_activations("q4")
    assert Calibration({"engine:q4": {"1": 4.4}, "engine:q4x8": {"1": 3.7}}, "x", 0.0).int8_activations("q4")


def test_the_tile_limit_moves_little_with_a_ratio_near_its_bound_and_prefers_the_more_exact_product():
    """Two calibrations on one machine measured the tiles at 0.97x and 1.10x bf16 GEMM's time at 128 rows and
    cached limits of 128 and 32 rows: the kernel of every 33- to 128-row step depended on which one an install
    got. Near the bound the limit now moves within its octave, and the confirming measurement sees one choice."""
    base = dict(engine__fp32=_times(80, 120), engine__q4=_times(4, 70), engine__gemm=_times(100, 100))

    def cal(tiles_128: float, bf16: bool = True) -> Calibration:
        gemm = {"engine__gemm_bf16" if bf16 else "engine__gemm": {**_times(30, 40), "128": 100.0}}
        tiles = {"4": 5.0, "8": 8.0, "32": 30.0, "128": tiles_128}
        return _calibration(**{**base, **gemm}, engine__tiles=tiles)

    limits = {ratio: cal(100.0 * ratio).tile_rows("q4") for ratio in (0.90, 0.97, 1.05, 1.10, 1.12, 1.2, 1.5, 3.0)}
    assert limits[0.90] == limits[0.97] == limits[1.05] == limits[1.10] == 128  # within 10%: the tiles keep them
    assert 100 < limits[1.12] < 128 and 32 < limits[1.5] < limits[1.2] < limits[1.12]  # past it, gradually
    assert 32 <= limits[3.0] < 45  # far past it: near the last count inside (0.75x at 32 rows)
    assert cal(97.0).agrees(cal(110.0)) and cal(110.0).agrees(cal(112.0)) and cal(112.0).agrees(cal(150.0))
    assert not cal(97.0).agrees(cal(300.0))  # a limit under half the other's is another choice
    assert not cal(97.0).agrees(_calibration(**base, engine__gemm_bf16={**_times(30, 40), "128": 100.0}))  # none
    assert cal(97.0).agrees(cal(97.0)) and cal(97.0).choices() != cal(150.0).choices()
    # a step's time is that of what runs at its rows: the tiles within the limit, though 10% slower, GEMM past it
    assert cal(110.0).many_ms(128, "q4") == 110.0 and cal(112.0).many_ms(128, "q4") == 100.0
    # against fp32 GEMM, more exact than the tiles, they must be clearly faster: 0.95x is not enough at 128 rows
    assert cal(95.0, bf16=False).tile_rows("q4") < 128 and cal(85.0, bf16=False).tile_rows("q4") == 128


@pytest.mark.parametrize("busy_measurements", [1, 3])
def test_prepare_measures_again_a_calibration_a_busy_machine_kept_from_the_cache(
    tmp_path, monkeypatch, capsys, busy_measurements
):
    """`make venv`'s prepare is there so that the first run measures nothing: where other processes kept the
    machine busy while it calibrated (not cached), it measures again, up to three times in all, and says so
    where the machine stayed busy; the rest of the preparation is done either way."""
    import pipeline.calibrate as calibrate_module
    from pipeline.prepare import main

    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path))
    seen: list[float] = []

    def load(before, after, wall_s):  # the first `busy_measurements` calibrations measured beside a busy machine
        seen.append(wall_s)
        return 0.9 if len(seen) <= busy_measurements else 0.0

    monkeypatch.setattr(calibrate_module, "other_load", load)
    # busy is what this test is about: the tiny model's times, tens of microseconds, spread 2-4x on some idle
    # machines (an AMX Xeon here), and a wide spread also keeps a calibration from the cache
    monkeypatch.setattr(calibrate_module, "NOISY", float("inf"))
    main(["model=tiny"])
    out = capsys.readouterr().out
    files = list(tmp_path.glob("**/calibration/*.json"))
    assert len(seen) == min(busy_measurements + 1, 3)
    assert (
        out.count("calibration: not cached (the machine was busy, or its times spread widely); measuring again")
        == len(seen) - 1
    )
    if busy_measurements < 3:
        assert len(files) == 1 and "still not cached" not in out
        main(["model=tiny"])  # a later process (the first run) finds it cached and measures nothing
        assert len(seen) == busy_measurements + 1 and "calibrating" not in capsys.readouterr().out
    else:
        assert not files and "still not cached" in out and "python -m pipeline.prepare" in out
        assert "prepared engine" in out  # the rest was prepared


def test_the_steps_timed_read_a_shared_prefix_as_the_default_stages_do(monkeypatch):
    """The default stages' rows read one shared copy of a 337-token prefix; steps timed over each slot's own cache
    spent 40-50 ms of a 32-row step in attention (AMX Xeon), hiding which product was faster. Every step and
    prefill chunk timed runs past a shared prefix in every slot."""
    import torch

    from pipeline.calibrate import PREFIX_TOKENS, engine_tasks
    from pipeline.engine import Engine

    config = _tiny_config()
    seen: list[tuple[int, bool, int]] = []
    fused, decode = Engine._fused_layers, Engine._decode_hidden

    def record(engine, positions):
        seen.append((len(engine.prefix), all(engine.prefix_ok[: engine.slots]), int(positions.min())))

    def fused_layers(self, tokens, slot_ids, positions):
        record(self, positions)
        return fused(self, tokens, slot_ids, positions)

    def decode_hidden(self, tokens, positions):
        record(self, positions)
        return decode(self, tokens, positions)

    monkeypatch.setattr(Engine, "_fused_layers", fused_layers)
    monkeypatch.setattr(Engine, "_decode_hidden", decode_hidden)
    with torch.inference_mode():
        tasks = engine_tasks(config, torch.Generator().manual_seed(0))
        for _, _, run in tasks:
            run()
    width = min(PREFIX_TOKENS, config.max_position_embeddings // 2)
    assert seen and width > 0
    assert all(prefix == width and every_slot and first > width for prefix, every_slot, first in seen), seen
