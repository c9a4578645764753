"""Backends behind one small interface: the runner, the stages and the course adapter see only `Backend`.

Each backend module pairs a class with the settings it understands; `load_backend` picks one by
`backend.name`. A setting the chosen backend does not apply is named in one warning line, never
dropped silently.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from pipeline.config import BACKENDS, Config
from pipeline.errors import PipelineError
from pipeline.results import Generation


@dataclass
class BackendInfo:
    name: str  # transformers, llamacpp, engine
    dtype: str  # compute dtype of the activations
    weight_format: str  # how the weights are stored: fp32, bf16, int8, q4, Q4_1 (a GGUF type), ...
    weight_bytes: int  # weight bytes read per decoded token
    device: str
    attention: str
    source: str  # where the weights came from
    load_time_s: float


class Backend(Protocol):
    """What the stages need: the course API plus the shared prefix, prompt lengths and a description."""

    tokenizer: Any
    prefix_ids: list[int]

    def info(self) -> BackendInfo: ...

    def set_shared_prefix(self, prompts: list[str]) -> float:
        """Compute once what every prompt shares (KV cache of the common prefix); returns the seconds it took."""
        ...

    def generate(self, prompt: str, max_new_tokens: int | None = None) -> Generation: ...

    def batched_generate(self, prompts: list[str], max_new_tokens: int | None = None) -> list[Generation]: ...

    def prompt_lengths(self, prompts: list[str]) -> list[int]:
        """Token length of each prompt as this backend tokenizes it."""
        ...

    def loss_model(self) -> tuple[Any, Any, str]:
        """(torch model, tokenizer, description) that the course grader's loss pass runs on."""
        ...


# settings a backend may not apply: (dotted key, default value, what the backend does instead)
IgnoredSetting = tuple[str, Any, str]


def ignored_settings(cfg: Config, ignored: list[IgnoredSetting], backend: str) -> list[str]:
    """One warning per setting that differs from its default and that `backend` does not apply."""
    warnings = []
    for key, default, instead in ignored:
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if value != default:
            warnings.append(f"backend={backend} ignores {key}={value} ({instead})")
    return warnings


def load_backend(cfg: Config, log: Callable[[str], None] = print) -> tuple[Backend, list[str]]:
    """Build the backend `cfg.backend.name` names; returns it and its warnings (settings it ignores, slow knobs)."""
    name = cfg.backend.name
    if name == "transformers":
        from pipeline.backends.hf import TransformersBackend as factory
    elif name == "llamacpp":
        from pipeline.backends.llamacpp import LlamaCppBackend as factory
    elif name == "engine":
        from pipeline.backends.engine import EngineBackend as factory
    else:  # config validation keeps this from happening
        raise PipelineError(f"backend={name} is not valid; choose one of: {', '.join(BACKENDS)}")
    backend = factory(cfg, log)
    return backend, list(getattr(backend, "warnings", []))
