"""Fidelity against the fp32 reference: it must see a broken knob where the answers agree, and nothing where
nothing changed."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.fidelity import Reference, compare, is_reference, kl_and_top1, summarize, teacher_forced
from pipeline.models import load_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny():
    cfg = ModelConfig(name="tiny", source="tiny", tiny_layers=2, tiny_heads=4, tiny_kv_heads=2, tiny_hidden_size=64)
    return load_model(cfg, CPU, torch.float32, "sdpa")


def _sequences(tokenizer, n: int = 5):
    """Prompts sharing a prefix, each with a continuation of its own length."""
    prefix = tokenizer("Rewrite the question as NUMBER SOURCE -> TARGET.", add_special_tokens=False)["input_ids"]
    prompts, continuations = [], []
    for i in range(n):
        own = tokenizer(f" How many grams are in {i + 2} kg?", add_special_tokens=False)["input_ids"]
        prompts.append(prefix + own)
        continuations.append(tokenizer(f" {i + 2} kg -> grams" + " more" * i, add_special_tokens=False)["input_ids"])
    return prompts, continuations


def test_teacher_forcing_equals_the_full_forward_pass(tiny):
    """Shared prefix, right padding, chunks: row t is the distribution after prompt + continuation[:t]."""
    prompts, continuations = _sequences(tiny.tokenizer)
    got = list(teacher_forced(tiny.model, prompts, continuations, chunk=2))
    for prompt, continuation, logprobs in zip(prompts, continuations, got):
        ids = torch.tensor([prompt + continuation])
        with torch.inference_mode():
            full = torch.log_softmax(tiny.model(ids).logits[0].float(), dim=-1)
        expected = full[len(prompt) - 1 : len(prompt) + len(continuation) - 1]
        torch.testing.assert_close(logprobs, expected, rtol=1e-4, atol=1e-4)


def test_fp32_against_itself_is_zero_and_a_perturbed_weight_is_seen(tiny):
    """The measurement's own check: no cost where nothing changed, a cost where one weight matrix was broken,
    even though most greedy tokens may still agree."""
    prompts, continuations = _sequences(tiny.tokenizer)
    reference = Reference(tiny.model)
    itself = compare(reference.logprobs(prompts, continuations), teacher_forced(tiny.model, prompts, continuations))
    assert itself.kld_mean < 1e-9 and itself.kld_max < 1e-8 and itself.top1_agreement == 1.0
    assert itself.tokens == sum(len(c) for c in continuations)
    broken = copy.deepcopy(tiny.model)
    with torch.no_grad():  # a broken kernel's kind of damage: one matrix of the last layer off by its own size
        weight = broken.model.layers[-1].mlp.down_proj.weight
        weight += torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)) * weight.std() * 30
    perturbed = compare(reference.logprobs(prompts, continuations), teacher_forced(broken, prompts, continuations))
    assert perturbed.kld_mean > 1e3 * max(itself.kld_mean, 1e-12) and perturbed.kld_mean > 1e-6
    assert perturbed.top1_agreement < 1.0
    assert perturbed.kld_p99 >= perturbed.kld_mean and perturbed.kld_max >= perturbed.kld_p999 >= perturbed.kld_p99
    assert math.isfinite(perturbed.kld_stderr) and perturbed.kld_stderr > 0


def test_engine_fidelity_sees_q4_rounding_of_fp32_weights(tiny):
    """The engine in fp32 is the reference up to summation order; q4 of random fp32 weights is lossy and shows."""
    from pipeline import kernels
    from pipeline.engine import Engine

    prompts, continuations = _sequences(tiny.tokenizer)
    reference = Reference(tiny.model)
    results = {}
    for fmt in ("fp32", "q4"):
        engine = Engine(tiny.model, fmt, max_kernel_rows=8 if kernels.available() else 0)
        with torch.inference_mode():
            candidate = engine.teacher_forced(prompts, continuations, slots=3)
        results[fmt] = compare(reference.logprobs(prompts, continuations), candidate)
    assert results["fp32"].kld_mean < 1e-7 and results["fp32"].top1_agreement == 1.0
    assert results["q4"].kld_mean > 100 * results["fp32"].kld_mean


def test_the_engines_teacher_forcing_reproduces_its_greedy_tokens(tiny):
    """Forced along its own greedy output, the engine's distributions put those very tokens first."""
    from pipeline.engine import Engine, StopTokens

    prompts, _ = _sequences(tiny.tokenizer)
    engine = Engine(tiny.model, "fp32")
    with torch.inference_mode():
        generated = [s.generated for s in engine.generate(prompts, 6, StopTokens(None, None, []), slots=2)]
        logprobs = engine.teacher_forced(prompts, generated, slots=2)
    assert [lp.argmax(dim=-1).tolist() for lp in logprobs] == generated


def test_kl_divergence_is_the_textbook_one():
    p = torch.log(torch.tensor([[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]]))
    q = torch.log(torch.tensor([[0.25, 0.5, 0.25], [1 / 3, 1 / 3, 1 / 3]]))
    kld, same = kl_and_top1(p, q)
    assert kld[0] == pytest.approx(0.5 * math.log(2) + 0.25 * math.log(0.5)) and kld[1] == pytest.approx(0, abs=1e-7)
    assert same.tolist() == [False, True]
    summary = summarize(np.array([0.0, 1.0, 2.0, 3.0]), np.array([True, True, False, True]))
    assert summary.kld_mean == 1.5 and summary.top1_agreement == 0.75 and summary.kld_max == 3.0
    assert summary.kld_stderr == pytest.approx(np.std([0, 1, 2, 3], ddof=1) / 2)


def test_only_an_fp32_sdpa_model_without_quantized_layers_is_the_reference(tiny):
    from pipeline.quantize import quantize_int8

    assert is_reference(tiny.model)
    assert not is_reference(copy.deepcopy(tiny.model).to(torch.bfloat16))
    quantized = copy.deepcopy(tiny.model)
    quantize_int8(quantized, torch.float32)
    assert not is_reference(quantized)


def test_the_reference_computes_a_sequence_once(tiny, monkeypatch):
    import pipeline.fidelity as fidelity

    prompts, continuations = _sequences(tiny.tokenizer, 3)
    calls = []
    real = fidelity.teacher_forced
    monkeypatch.setattr(fidelity, "teacher_forced", lambda m, p, c: calls.append(len(p)) or real(m, p, c))
    reference = Reference(tiny.model)
    first = list(reference.logprobs(prompts, continuations))
    again = list(reference.logprobs(prompts + prompts[:1], continuations + continuations[:1]))
    assert calls == [3, 0] and all(torch.equal(a, b) for a, b in zip(first + first[:1], again))
