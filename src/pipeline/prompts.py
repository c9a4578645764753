"""Turning a question into the text the model sees, for each prompt style."""

from __future__ import annotations

from pipeline.config import PromptConfig
from pipeline.errors import PipelineError


def build_messages(question: str, cfg: PromptConfig) -> list[dict]:
    """Chat messages: optional system prompt, worked examples as earlier turns, then the question."""
    messages = [{"role": "system", "content": cfg.system}] if cfg.system else []
    for example_question, example_answer in cfg.examples:
        messages.append({"role": "user", "content": _user_text(str(example_question), cfg)})
        messages.append({"role": "assistant", "content": str(example_answer)})
    messages.append({"role": "user", "content": _user_text(question, cfg)})
    return messages


def _user_text(question: str, cfg: PromptConfig) -> str:
    return f"{cfg.instruction}\n{question}" if cfg.instruction else question


def build_prompt(question: str, cfg: PromptConfig, tokenizer) -> str:
    """The full prompt text for `question`: the question itself (raw) or a chat-templated conversation."""
    if cfg.style == "raw":
        return question + cfg.response_prefix
    if not getattr(tokenizer, "chat_template", None):
        raise PipelineError(
            f"prompt={cfg.style} needs a tokenizer with a chat template; this model has none: use prompt=raw"
        )
    messages = build_messages(question, cfg)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + cfg.response_prefix
