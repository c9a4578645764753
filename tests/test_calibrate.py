"""precision=auto's calibration: its choices from measured times, its cache, and a measurement that runs."""

from __future__ import annotations

import json

from pipeline.calibrate import ROWS, Calibration, Shapes, calibrate, measure


def _calibration(**step_ms) -> Calibration:
    return Calibration({name.replace("__", ":"): times for name, times in step_ms.items()}, "test cpu", 0.1)


def _times(one: float, thirty_two: float) -> dict[str, float]:
    """Step times growing linearly from one row to 32 rows."""
    return {str(r): one + (thirty_two - one) * (r - 1) / 31 for r in ROWS}


def test_auto_picks_the_fastest_engine_format_for_one_row_and_the_kernel_rows_where_it_wins():
    cal = _calibration(engine__fp32=_times(80, 120), engine__q8=_times(20, 200), engine__q4=_times(12, 400))
    assert cal.engine_format() == "q4"
    # q4 crosses fp32 at r ~ 7 (12 + 388 (r-1)/31 vs 80 + 40 (r-1)/31), q8 at r ~ 14
    assert cal.kernel_rows("q4") == 4 and cal.kernel_rows("q8") == 8
    slow_kernels = _calibration(engine__fp32=_times(10, 100), engine__q4=_times(30, 400))
    assert slow_kernels.engine_format() == "fp32" and slow_kernels.kernel_rows("q4") == 0


def test_int8_activations_are_picked_only_for_a_clear_gain_and_never_pick_the_format():
    cal = _calibration(
        engine__fp32=_times(80, 120),
        engine__q4=_times(12, 400),
        engine__q4x8=_times(6, 400),  # x8: 2x faster
        engine__q8=_times(20, 200),
        engine__q8x8=_times(19.5, 200),  # 2.5% faster: noise, not worth inexactness
    )
    assert cal.engine_format() == "q4"  # formats are compared with fp32 activations; q4x8 is not a format
    assert cal.int8_activations("q4") and not cal.int8_activations("q8")
    # q8 faster with fp32 activations, q4 with int8 ones: the choice follows the activations allowed
    swapped = _calibration(
        engine__fp32=_times(80, 120),
        engine__q4=_times(12, 400),
        engine__q4x8=_times(6, 400),
        engine__q8=_times(10, 200),
        engine__q8x8=_times(8, 200),
    )
    assert swapped.engine_format() == "q8" and swapped.engine_format(int8_activations=True) == "q4"
    assert not _calibration(engine__q4=_times(12, 400)).int8_activations("q4")  # not measured: never


def test_slower_than_fp32_names_the_worst_case_and_stays_quiet_within_noise():
    cal = _calibration(
        transformers__fp32=_times(85, 100), transformers__bf16=_times(60, 500), transformers__int8=_times(90, 105)
    )
    warning = cal.slower_than_fp32("transformers:bf16")
    assert "bf16 measured 5.0x slower than fp32 for a step of 32 rows" in warning
    assert cal.slower_than_fp32("transformers:int8") == ""  # 6% slower: noise, not a finding
    assert cal.transformers_dtype() == "fp32"  # faster for one row, far slower for a batch: not picked
    fast_bf16 = _calibration(transformers__fp32=_times(85, 100), transformers__bf16=_times(40, 60))
    assert fast_bf16.transformers_dtype() == "bf16"


def test_measure_times_every_candidate_at_every_row_count_and_the_cache_is_reused(tmp_path, monkeypatch):
    shapes = Shapes(hidden=64, intermediate=128, qkv_out=128, vocab=1000, layers=2)
    step_ms = measure(shapes, ["engine:fp32", "transformers:fp32"], reps=1)
    assert set(step_ms) == {"engine:fp32", "transformers:fp32"}
    assert all(set(times) == {str(r) for r in ROWS} and min(times.values()) > 0 for times in step_ms.values())
    # a step of fewer rows is never reported slower than one of more rows (noise is not a finding)
    assert all(times[str(a)] <= times[str(b)] for times in step_ms.values() for a, b in zip(ROWS, ROWS[1:]))

    first = calibrate(shapes, tmp_path, log=lambda _: None)
    saved = next((tmp_path / "calibration").glob("*.json"))
    assert json.loads(saved.read_text())["step_ms"] == first.step_ms

    def refuse(*args, **kwargs):
        raise AssertionError("measured again although a calibration is cached")

    monkeypatch.setattr("pipeline.calibrate.measure", refuse)
    assert calibrate(shapes, tmp_path, log=lambda _: None).step_ms == first.step_ms


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
    assert backend("auto").model.dtype == torch.bfloat16
    assert not backend("bf16").warnings
    monkeypatch.setattr("pipeline.calibrate.calibrate", fake(400))  # bf16 5x slower for one row
    assert backend("auto").model.dtype == torch.float32
    (warning,) = backend("bf16").warnings
    assert "bf16 measured 5.0x slower than fp32 for a decode step" in warning and "precision=fp32" in warning
