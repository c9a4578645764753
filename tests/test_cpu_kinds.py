"""Every CPU kind's decisions, on whatever machine runs the tests.

The default run once crashed on AVX512-BF16 machines in a branch no AVX2 CI ever took. Here each kind is
forced (PIPELINE_CPU_KIND, simulated above what this CPU runs: its Python-side decisions are made as on
such a CPU, with the best kernel build this CPU executes), each with an empty calibration cache so that
the first-run path runs, and the default config, the calibration, each engine format and the course
adapter run on the tiny model. Kernel-level tests of builds this CPU cannot execute skip in
tests/test_kernels.py, saying which CPU they need.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from pipeline import cpu, kernels
from pipeline.config import load_config
from pipeline.errors import PipelineError

NO_KERNEL = "none"


@pytest.fixture(scope="session")
def tokenizer_cache(tmp_path_factory) -> Path:
    """A model cache holding only the embedded tokenizer: what the tiny model needs, without a calibration."""
    from pipeline.models import _cache_folder, default_cache_dir, embedded_gguf, gguf_tokenizer

    gguf = embedded_gguf()
    gguf_tokenizer(gguf, default_cache_dir())  # extracted once into the shared cache
    source = _cache_folder(gguf, default_cache_dir()) / "tokenizer"
    template = tmp_path_factory.mktemp("cache-template")
    shutil.copytree(source, _cache_folder(gguf, template) / "tokenizer")
    return template


@pytest.fixture(params=cpu.KINDS)
def kind(request, monkeypatch, tmp_path, tokenizer_cache):
    """The CPU kind forced for one test, with a fresh cache (no calibration yet) at tmp_path / 'cache'."""
    monkeypatch.setenv(cpu.KIND_ENV, request.param)
    monkeypatch.setenv(cpu.SIMULATE_ENV, "1")
    shutil.copytree(tokenizer_cache, tmp_path / "cache")
    return request.param


def _overrides(tmp_path: Path, *extra: str) -> list[str]:
    return ["model=tiny", f"model.cache_dir={tmp_path / 'cache'}", "tracking.enabled=false",
            "stages.null_model=false", *extra]  # fmt: skip


def _run(tmp_path: Path, name: str, *extra: str, questions: int = 4):
    from pipeline.runner import run_pipeline

    cfg = load_config(_overrides(tmp_path, f"dataset.num_questions={questions}", *extra))
    lines: list[str] = []
    result = run_pipeline(cfg, tmp_path / name, log=lines.append)
    return result, "\n".join(lines)


def test_detected_kind_follows_the_flags():
    avx2 = {"avx2", "fma", "f16c", "sse4_2"}
    avx512 = avx2 | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"}
    assert cpu.detected_kind(frozenset({"sse4_2"})) == "none"
    assert cpu.detected_kind(frozenset({"avx2"})) == "none"  # AVX2 without FMA: our kernels need both
    assert cpu.detected_kind(frozenset(avx2)) == "avx2"
    assert cpu.detected_kind(frozenset(avx2 | {"avx512f"})) == "avx2"  # AVX512 F alone is not our avx512
    assert cpu.detected_kind(frozenset(avx512)) == "avx512"
    assert cpu.detected_kind(frozenset(avx512 | {"avx512_bf16"})) == "avx512_bf16"
    assert cpu.detected_kind(frozenset(avx512 | {"avx512_bf16", "amx_bf16", "amx_tile", "amx_int8"})) == "amx"
    assert cpu.detected_kind(frozenset(avx2 | {"amx_bf16", "amx_tile", "amx_int8"})) == "avx2"  # a kind needs all below


def test_a_kind_above_the_cpu_is_refused_outside_tests_with_one_line(monkeypatch):
    monkeypatch.setattr(cpu, "detected_kind", lambda flags=None: "avx2")
    cpu._resolve.cache_clear()
    try:
        monkeypatch.delenv(cpu.SIMULATE_ENV, raising=False)
        monkeypatch.setenv(cpu.KIND_ENV, "avx512_bf16")
        with pytest.raises(PipelineError) as refused:
            cpu.current()
        message = str(refused.value)
        assert "\n" not in message and "avx512_bf16" in message and "avx2" in message and cpu.KIND_ENV in message
        monkeypatch.setenv(cpu.KIND_ENV, "avx")
        with pytest.raises(PipelineError, match="choose one of: none, avx2"):
            cpu.current()
        monkeypatch.setenv(cpu.KIND_ENV, "none")  # below the CPU: runs as such a CPU would
        assert cpu.current().kernel_isa is None and not cpu.current().simulated
        monkeypatch.setenv(cpu.SIMULATE_ENV, "1")
        monkeypatch.setenv(cpu.KIND_ENV, "amx")
        simulated = cpu.current()
        assert simulated.simulated and simulated.fast_bf16 and simulated.kernel_isa == "avx2"
    finally:
        cpu._resolve.cache_clear()


def test_run_py_refuses_a_kind_the_cpu_cannot_run(tmp_path, monkeypatch):
    """The one-line refusal as a user meets it (no simulation outside tests)."""
    from tests.conftest import run_app

    above = [k for k in cpu.KINDS if cpu.rank(k) > cpu.rank(cpu.detected_kind())]
    if not above:
        pytest.skip(f"this CPU ({cpu.detected_kind()}) runs every kind")
    monkeypatch.setenv(cpu.KIND_ENV, above[-1])
    monkeypatch.delenv(cpu.SIMULATE_ENV, raising=False)
    done = run_app(["model=tiny", "tracking.enabled=false", "dataset.num_questions=1"], tmp_path, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and cpu.KIND_ENV in errors[0], done.stdout + done.stderr


def test_the_default_config_runs_under_every_kind(kind, tmp_path):
    """The default config (backend=auto, precision=auto, the tool prompt, both stages, the course loss, fidelity),
    its first run: calibration included."""
    result, log = _run(tmp_path, "default")
    assert result.status == "finished" and [s.name for s in result.stages] == ["single", "batched"]
    assert result.environment["cpu_kind"] == kind
    assert result.environment["cpu_kind_forced"] in ("forced", "simulated")
    assert "calibrating" in log  # the first-run path ran, not a cached result
    assert result.tags["kernel"].startswith("none") == (kind == NO_KERNEL)
    # the calibration says whether it was trusted beyond this run, and how busy other processes kept the CPUs
    assert result.tags["calibration_cached"] in ("true", "false")
    other = float(result.tags["calibration_other_load"])  # NaN: a calibration under a second, too short to tell
    assert other >= 0.0 or math.isnan(other)
    for stage in result.stages:
        assert stage.fidelity_tokens > 0 and stage.kld_mean < 1e-3 and stage.top1_agreement == 1.0
        assert not math.isnan(stage.grader_loss) and stage.peak_rss_mb > 0
    assert result.peak_rss_load_mb > 0


def test_the_calibration_measures_what_each_kind_runs(kind, tmp_path):
    from pipeline.calibrate import _int8_activations_bf16, calibrate
    from pipeline.config import ModelConfig
    from pipeline.models import load_model

    tiny = load_model(ModelConfig(name="tiny", source="tiny", cache_dir=str(tmp_path / "cache")),
                      torch.device("cpu"), torch.float32, "sdpa")  # fmt: skip
    result = calibrate(tiny.model.config, tmp_path / "cache", log=lambda line: None)
    engine = {name for name in result.step_ms if name.startswith("engine:")}
    assert ("engine:q4" in engine) == (kind != NO_KERNEL) and "engine:fp32" in engine
    # the int8 tiles where the kind's kernel build is an AVX512 one (a forced avx2 kind on this CPU: not measured)
    assert ("engine:tiles" in engine) == (str(cpu.current().kernel_isa).startswith("avx512"))
    # bf16 activations for torch's int8 kernel exactly where the kind computes bf16 natively: the crashing branch
    assert _int8_activations_bf16() == (kind in ("avx512_bf16", "amx"))
    for name, times in result.step_ms.items():
        assert all(0 < ms < math.inf for ms in times.values()), name
    assert result.engine_format(True, ("fp32",)) == "fp32"  # formats outside the allowed ones are never picked


@pytest.mark.parametrize(
    "overrides",
    [
        ("backend=engine", "precision=q4"),
        ("backend=engine", "precision=int8", "precision.activations=int8"),
        ("backend=engine", "precision=q4", "precision.gemm=int8x2"),
        ("backend=engine", "precision=int8", "precision.gemm=int8"),
        ("backend=engine", "precision=q4", "precision.gemm=bf16"),
        ("backend=transformers", "precision=int8"),
        ("backend=transformers", "precision=bf16"),
    ],
    ids=[
        "engine-q4",
        "engine-q8-x8",
        "engine-q4-tiles",
        "engine-q8-tiles",
        "engine-q4-bf16-gemm",
        "transformers-int8",
        "transformers-bf16",
    ],
)
def test_every_format_runs_under_every_kind(kind, tmp_path, overrides):
    """Explicit formats, including their fallbacks: without a kernel, q4/q8 run dequantized once (never per call)
    and say so; torch's int8 kernel gets activations and scales in one dtype on every kind; the int8 tiles run
    where the kind's kernel build is an AVX512 one and the weights q4, and elsewhere say what runs instead."""
    result, log = _run(tmp_path, "explicit", *overrides, "stages.grader_loss=false", questions=2)
    assert result.status == "finished"
    for stage in result.stages:
        assert stage.fidelity_tokens > 0 and math.isfinite(stage.kld_mean)
    if kind == NO_KERNEL and overrides[0] == "backend=engine":
        assert any("dequantized once" in w and "no kernel" in w for w in result.warnings), result.warnings
        assert result.tags["engine_kernel_rows"] == "0"
    if kind != NO_KERNEL and overrides[0] == "backend=engine":
        assert result.tags["kernel"].startswith(str(cpu.current().kernel_isa))
    asked = next((o.split("=", 1)[1] for o in overrides if o.startswith("precision.gemm=")), "")
    if asked == "bf16":
        # an explicit bf16 GEMM never reads as a measured gain where the kind has no native bf16 (on AVX2 the
        # batched stage ran 133 s against 3.2 s): the warning says what the calibration measured
        rounding = [w for w in result.warnings if "round activations and weights to bf16" in w]
        assert len(rounding) == (kind != NO_KERNEL), result.warnings
        if kind != NO_KERNEL and not cpu.current().fast_bf16:
            assert "fp32 GEMM measured faster here" in rounding[0], rounding
            assert any("emulated here and slow" in w for w in result.warnings), result.warnings
    elif asked:
        tiles = "precision=q4" in overrides and str(cpu.current().kernel_isa).startswith("avx512")
        assert result.tags["tiles"] == (asked if tiles else "none")
        assert tiles or any(f"precision.gemm={asked} needs" in w for w in result.warnings), result.warnings


def test_prefix_attention_runs_on_amx_tiles_only_under_the_amx_kind_of_an_amx_cpu(kind, tmp_path, monkeypatch):
    """precision.prefix_attention: auto takes the AMX tiles where the kind is amx on a CPU that has them and the
    many-row products are bf16; bf16 asks for them and says where they cannot run; fp32 never takes them. The
    model has 64-dimension heads (the tiles' shape). A forced lower kind on an AMX CPU, or a simulated amx on
    another CPU, keeps fp32: no AMX instruction runs there."""
    from pipeline.backends import load_backend
    from pipeline.calibrate import Calibration

    # a canned calibration (the choice follows the kind and the knob, not timings): no minutes of measuring
    step_ms = {"engine:fp32": {"1": 9.0, "32": 90.0}, "engine:q4": {"1": 1.0, "32": 40.0},
               "engine:gemm": {"1": 9.0, "32": 20.0}, "engine:gemm_bf16": {"1": 9.0, "32": 10.0}}  # fmt: skip
    monkeypatch.setattr("pipeline.calibrate.calibrate", lambda *a, **k: Calibration(step_ms, "test cpu", 0.0))
    shape = ["model.tiny_hidden_size=384", "model.tiny_heads=6", "model.tiny_kv_heads=2", "model.tiny_layers=1"]
    here = kind == "amx" and not cpu.current().simulated and kernels.available()
    assert here == kernels.amx_attention()
    for asked in ("auto", "bf16", "fp32"):
        cfg = load_config(_overrides(tmp_path, "backend=engine", "precision=q4", "precision.gemm=bf16",
                                     f"precision.prefix_attention={asked}", *shape))  # fmt: skip
        lines: list[str] = []
        backend, warnings = load_backend(cfg, lines.append)
        tags = backend.info().tags
        on = here and asked != "fp32"
        assert tags["prefix_attention"] == ("amx_bf16" if on else "fp32"), (kind, asked, tags["prefix_attention"])
        assert backend.engine.bf16_attention == on
        assert any("on AMX bf16 tiles" in line for line in lines) == on
        refused = [w for w in warnings if "precision.prefix_attention=bf16 needs" in w]
        assert len(refused) == (asked == "bf16" and not here), (asked, warnings)


def test_an_unknown_prefix_attention_is_one_error_naming_the_choices():
    with pytest.raises(PipelineError, match=r"prefix_attention='fp16' is not valid; choose one of: auto, fp32"):
        load_config(["precision.prefix_attention=fp16"])


def test_the_course_adapter_runs_to_its_loss_under_every_kind(kind, tmp_path, monkeypatch):
    """As the course's grader uses it: construct, 32 generate calls, one batched_generate of 32, then its loss with
    .model and .tokenizer."""
    from pipeline.course import OVERRIDES_ENV, BaseLLM
    from pipeline.data import load_items
    from pipeline.grader import grader_loss

    overrides = " ".join(_overrides(tmp_path, "dataset.num_questions=32"))
    monkeypatch.setenv(OVERRIDES_ENV, overrides)
    llm = BaseLLM()
    questions = [item.question for item in load_items()[:32]]
    single = [llm.generate(q) for q in questions]
    batched = llm.batched_generate(questions)
    assert len(single) == len(batched) == 32
    loss = grader_loss(llm.model, llm.tokenizer, [q + a for q, a in zip(questions, batched)])
    assert math.isfinite(loss) and loss > 0


def test_kernel_state_follows_the_kind_in_one_process(monkeypatch):
    """Switching kinds in one process (as these tests do) switches the build in use, and `none` turns it off."""
    monkeypatch.setenv(cpu.SIMULATE_ENV, "1")
    monkeypatch.setenv(cpu.KIND_ENV, "none")
    assert not kernels.available() and kernels.isa() is None
    monkeypatch.setenv(cpu.KIND_ENV, "avx2")
    if kernels.available():  # a machine with a compiler
        assert kernels.isa() == "avx2"
        assert kernels.ops() is torch.ops.pipeline_avx2


@pytest.mark.parametrize(
    ("kind", "detected", "off"),
    [("amx", "amx", True), ("avx2", "amx", True), ("avx512_bf16", "avx512_bf16", False), ("amx", "avx2", False)],
)
def test_llama_cpp_keeps_its_amx_buffers_off_on_a_cpu_with_amx_only(monkeypatch, kind, detected, off):
    """llama-cpp-python, compiled for the CPU it was installed on, segfaulted right after loading on an AMX Xeon
    with its extra (AMX) weight buffers: they go off where the CPU itself has AMX, whatever kind is forced (a
    simulated amx on another CPU keeps them), and the environment switch turns them back on."""
    from types import SimpleNamespace

    from pipeline.backends.llamacpp import EXTRA_BUFTS_ENV, amx_buffers_off

    monkeypatch.setattr(cpu, "current", lambda: cpu.CpuKind(kind, detected, kind != detected, False))
    monkeypatch.delenv(EXTRA_BUFTS_ENV, raising=False)
    params = SimpleNamespace(use_extra_bufts=True)
    assert amx_buffers_off(params) is off and params.use_extra_bufts is not off
    monkeypatch.setenv(EXTRA_BUFTS_ENV, "1")
    params = SimpleNamespace(use_extra_bufts=True)
    assert amx_buffers_off(params) is False and params.use_extra_bufts
