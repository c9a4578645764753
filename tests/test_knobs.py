"""Performance knobs on the tiny model: each reaches the model and the stages stay correct."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from pipeline.config import GenerationConfig, ModelConfig, PromptConfig
from pipeline.data import load_items
from pipeline.generation import Generator
from pipeline.models import load_model, resolve_dtype
from pipeline.prompts import build_prompt
from pipeline.quantize import WeightOnlyInt8Linear, quantize_int8, weight_bytes
from pipeline.stages import run_batched

CPU = torch.device("cpu")
RAW = PromptConfig(style="raw")


def _tiny(dtype=torch.float32, int8=False):
    return load_model(ModelConfig(name="tiny", source="tiny"), CPU, dtype, "sdpa", int8=int8)


def _prompts(tokenizer, n=6):
    items = load_items()[:n]
    return items, [build_prompt(item.question, RAW, tokenizer) for item in items]


def test_int8_replaces_every_linear_and_quarters_the_weight_bytes():
    fp32 = _tiny()
    before = weight_bytes(fp32.model)
    replaced = quantize_int8(fp32.model, torch.float32)
    assert replaced == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer, and the lm_head
    assert not any(isinstance(m, torch.nn.Linear) for m in fp32.model.modules())
    assert weight_bytes(fp32.model) < 0.3 * before + 0.01 * before


def test_int8_linear_is_close_to_the_float_layer():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32).to(torch.bfloat16)
    quantized = WeightOnlyInt8Linear(linear, torch.bfloat16)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    expected, got = linear(x).float(), quantized(x).float()
    assert torch.allclose(got, expected, atol=0.05 * expected.abs().max().item())


def test_int8_with_fp32_activations_uses_our_grouped_kernel_not_the_scalar_path():
    from pipeline import kernels

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48, bias=False)
    quantized = WeightOnlyInt8Linear(linear, torch.float32)
    assert quantized.grouped == kernels.available()
    x = torch.randn(3, 5, 64)
    expected, got = linear(x), quantized(x)
    assert got.shape == expected.shape and torch.allclose(got, expected, atol=0.02 * expected.abs().max().item())


def test_int8_precision_runs_the_stages_on_the_tiny_model():
    loaded = _tiny(resolve_dtype("int8", CPU), int8=True)
    assert any(isinstance(m, WeightOnlyInt8Linear) for m in loaded.model.modules())
    generator = Generator(loaded.model, loaded.tokenizer, GenerationConfig(max_new_tokens=4))
    items, prompts = _prompts(loaded.tokenizer)
    with torch.inference_mode():
        stage = run_batched(generator, items, prompts, 0.05, 15.0, 4)
    assert stage.num_questions == 6 and 0 < stage.generated_tokens <= 24


def test_static_cache_gives_the_same_greedy_tokens(tiny_fp32):
    _, prompts = _prompts(tiny_fp32.tokenizer, 4)
    dynamic = Generator(tiny_fp32.model, tiny_fp32.tokenizer, GenerationConfig(max_new_tokens=6, stop_string=""))
    static = Generator(
        tiny_fp32.model,
        tiny_fp32.tokenizer,
        GenerationConfig(max_new_tokens=6, stop_string="", cache_implementation="static"),
    )
    assert "cache_implementation" not in dynamic._generate_kwargs(None)
    assert static._generate_kwargs(None)["cache_implementation"] == "static"
    with torch.inference_mode():
        assert [g.text for g in static.batched_generate(prompts)] == [g.text for g in dynamic.batched_generate(prompts)]


class _Recording:
    """A generator that notes the prompts of every batched call, so a test sees how micro-batches were formed."""

    def __init__(self, inner: Generator):
        self.inner, self.batches = inner, []

    def prompt_lengths(self, prompts):
        return self.inner.prompt_lengths(prompts)

    def batched_generate(self, prompts, max_new_tokens=None):
        self.batches.append(list(prompts))
        return self.inner.batched_generate(prompts, max_new_tokens)


def test_length_sorted_micro_batches_keep_the_data_set_order(tiny_fp32):
    items, prompts = _prompts(tiny_fp32.tokenizer, 7)
    generator = Generator(tiny_fp32.model, tiny_fp32.tokenizer, GenerationConfig(max_new_tokens=5, stop_string=""))
    lengths = dict(zip(prompts, generator.prompt_lengths(prompts)))
    by_length = sorted(prompts, key=lambda p: lengths[p])
    assert by_length != prompts  # the data set's order is not already sorted: sorting has something to do
    plain, ordered = _Recording(generator), _Recording(generator)
    with torch.inference_mode():
        plain_stage = run_batched(plain, items, prompts, 0.05, 15.0, 2)
        sorted_stage = run_batched(ordered, items, prompts, 0.05, 15.0, 2, sort_by_length=True)
        one_by_one = [generator.generate(p).text for p in prompts]
    # micro-batches of 2: in data-set order without sorting, in order of token length with it
    assert plain.batches == [prompts[i : i + 2] for i in range(0, 7, 2)]
    assert ordered.batches == [by_length[i : i + 2] for i in range(0, 7, 2)]
    # results come back in the data set's order, with the same answers whichever prompts shared a batch
    assert [p.question for p in sorted_stage.predictions] == [item.question for item in items]
    assert [p.output for p in sorted_stage.predictions] == one_by_one == [p.output for p in plain_stage.predictions]


@pytest.mark.slow
def test_compile_reaches_generate_and_keeps_greedy_tokens(tiny_fp32):
    """runtime.compile makes transformers compile the decode step (static cache) on CPU too."""
    _, prompts = _prompts(tiny_fp32.tokenizer, 2)
    cfg = GenerationConfig(max_new_tokens=4, stop_string="")
    eager = Generator(tiny_fp32.model, tiny_fp32.tokenizer, cfg)
    compiled = Generator(tiny_fp32.model, tiny_fp32.tokenizer, cfg, compile_mode="default")
    kwargs = compiled._generate_kwargs(None)
    assert kwargs["cache_implementation"] == "static" and kwargs["compile_config"]._compile_all_devices
    torch._dynamo.reset()
    with torch.inference_mode():
        expected = [eager.generate(p).text for p in prompts]
        assert [compiled.generate(p).text for p in prompts] == expected
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="optional extra llama-cpp-python absent")
def test_llamacpp_backend_answers_like_the_transformers_backend(compose_cfg):
    """Same GGUF weights, same tool prompt, greedy: the two backends write the same forms on most questions."""
    from omegaconf import OmegaConf

    from pipeline.backends import load_backend

    items = load_items()[:8]
    forms = {}
    for name in ("llamacpp", "transformers"):
        cfg = OmegaConf.to_object(compose_cfg([f"backend={name}", "precision=fp32", "runtime.num_threads=2"]))
        backend, _ = load_backend(cfg, log=lambda _: None)
        prompts = [build_prompt(item.question, cfg.prompt, backend.tokenizer) for item in items]
        with torch.inference_mode():
            outputs = backend.batched_generate(prompts)
        forms[name] = [g.text.strip() for g in outputs]
        assert all(0 < g.num_tokens <= cfg.generation.max_new_tokens for g in outputs)
        assert backend.prompt_lengths(prompts[:1])[0] > 20
    same = sum(a == b for a, b in zip(forms["llamacpp"], forms["transformers"]))
    assert same >= 6, forms  # Q4_1 kernels with 8-bit activations vs fp32: a rare greedy flip, not more


def test_llamacpp_warns_about_the_settings_it_ignores(compose_cfg):
    from omegaconf import OmegaConf

    from pipeline.backends import ignored_settings
    from pipeline.backends.llamacpp import IGNORED

    cfg = OmegaConf.to_object(compose_cfg(["backend=llamacpp", "precision=bf16", "runtime.compile=default"]))
    warnings = ignored_settings(cfg, IGNORED, "llamacpp")
    assert any("precision.name=bf16" in w for w in warnings) and any("runtime.compile=default" in w for w in warnings)
    # the default tool prompt decodes constrained, which llama.cpp does not: that is the one warning
    # the default tool prompt's constraint is applied now (a mask over llama.cpp's logits): nothing to warn about
    assert not ignored_settings(OmegaConf.to_object(compose_cfg(["backend=llamacpp"])), IGNORED, "llamacpp")
    free = compose_cfg(["backend=llamacpp", "prompt.constrained=false"])
    assert not ignored_settings(OmegaConf.to_object(free), IGNORED, "llamacpp")


def test_thread_count_and_sort_knobs_reach_the_run(tmp_path):
    import json

    from conftest import run_app

    args = ["model=tiny", "prompt=raw", "dataset.num_questions=3", "generation.max_new_tokens=3",
            "runtime.num_threads=1", "stages.sort_by_length=true", "stages.micro_batch_size=2",
            "tracking.enabled=false", f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    result = run_app(args, tmp_path)
    assert result.returncode == 0, result.stderr[-1500:]
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["environment"]["torch_threads"] == "1"
    assert saved["stages"]["batched"]["micro_batch_size"] == 2 and saved["stages"]["batched"]["num_questions"] == 3
