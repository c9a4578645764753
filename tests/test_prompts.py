"""Prompt styles: raw is the question, instruct and cot use the chat template."""

from __future__ import annotations

import pytest

from pipeline.config import PromptConfig
from pipeline.errors import PipelineError
from pipeline.prompts import build_messages, build_prompt


def test_raw_is_the_question(tiny_fp32):
    assert build_prompt("How many g in 6 kg?", PromptConfig(style="raw"), tiny_fp32.tokenizer) == "How many g in 6 kg?"


def test_cot_puts_examples_before_the_question(tiny_fp32):
    cfg = PromptConfig(style="cot", system="Be brief.", examples=[["1 kg in g?", "<answer>1000</answer>"]])
    messages = build_messages("6 kg in g?", cfg)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    text = build_prompt("6 kg in g?", cfg, tiny_fp32.tokenizer)
    assert text.index("1 kg in g?") < text.index("<answer>1000</answer>") < text.index("6 kg in g?")
    assert text.startswith("<|im_start|>system\nBe brief.") and text.endswith("<|im_start|>assistant\n")


def test_response_prefix_ends_the_prompt(tiny_fp32):
    cfg = PromptConfig(style="instruct", system="Answer in tags.", response_prefix="<answer>")
    assert build_prompt("6 kg in g?", cfg, tiny_fp32.tokenizer).endswith("<|im_start|>assistant\n<answer>")


def test_chat_styles_need_a_chat_template():
    class NoTemplate:
        chat_template = None

    with pytest.raises(PipelineError, match="prompt=raw"):
        build_prompt("q", PromptConfig(style="instruct"), NoTemplate())
