"""Backends behind one small interface: the runner, the stages and the course adapter see only `Backend`.

Each backend module pairs a class with the settings it understands; `load_backend` picks one by
`backend.name`. A setting the chosen backend does not apply is named in one warning line, never
dropped silently.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from pipeline.config import BACKENDS, Config
from pipeline.errors import PipelineError
from pipeline.results import Generation

if TYPE_CHECKING:
    from pipeline.engine import Constraint


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
    tags: dict[str, str] = field(default_factory=dict)  # choices worth a tag (calibrated format, ...)


class Backend(Protocol):
    """What the stages need: the course API plus the shared prefix, prompt lengths and a description."""

    tokenizer: Any
    prefix_ids: list[int]

    def info(self) -> BackendInfo: ...

    def set_shared_prefix(self, prompts: list[str]) -> float:
        """Compute once what every prompt shares (KV cache of the common prefix); returns the seconds it took."""
        ...

    def generate(
        self, prompt: str, max_new_tokens: int | None = None, constraint: Constraint | None = None
    ) -> Generation: ...

    def batched_generate(
        self,
        prompts: list[str],
        max_new_tokens: int | None = None,
        constraints: list[Constraint | None] | None = None,
    ) -> list[Generation]:
        """Generate for every prompt; `constraints[i]`, where given, limits the tokens of prompt i (greedy within
        its allowed tokens). A backend that cannot apply constraints warns at load and decodes freely."""
        ...

    def prompt_lengths(self, prompts: list[str]) -> list[int]:
        """Token length of each prompt as this backend tokenizes it."""
        ...

    def loss_model(self) -> tuple[Any, Any, str]:
        """(torch model, tokenizer, description) that the course grader's loss pass runs on."""
        ...

    def encode(self, prompt: str) -> list[int]:
        """The prompt's token ids as this backend tokenizes it for generation."""
        ...

    def next_token_logprobs(
        self, prompts: list[list[int]], continuations: list[list[int]], batched: bool
    ) -> Iterator[Any]:
        """Teacher-forced fidelity input: for each i, in order, a float32 CPU tensor [len(continuations[i]), vocab]
        of log-softmax next-token distributions that this backend's own decoding path (its weights, format,
        activations, kernels) gives for continuations[i][t] after prompts[i] + continuations[i][:t].

        `batched`: the sequences run together, as the batched stage runs them (rows of one step share a matrix
        product); else one at a time, as the single stage runs them. Yielded one sequence at a time so the
        caller's memory stays bounded."""
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


def engine_refusal(cfg: Config) -> str:
    """Why backend=auto does not pick the engine for `cfg` ('' when it does).

    The engine is picked where it runs the config as asked: every setting that only transformers applies
    (a half-precision dtype, another attention kernel, compile, a static cache, sampling, beams, a GPU)
    sends auto to transformers, so an explicit knob is never silently dropped.
    """
    from pipeline.models import resolve_device

    reasons = {
        "precision": cfg.precision.name not in ("auto", "fp32", "int8", "q4"),
        "attention": cfg.attention.implementation != "sdpa",
        "runtime.compile": cfg.runtime.compile != "off",
        "generation.cache_implementation": cfg.generation.cache_implementation != "dynamic",
        "sampling or beam search": cfg.generation.do_sample or cfg.generation.num_beams != 1,
        "generation.use_cache": not cfg.generation.use_cache,
        "device": resolve_device(cfg.runtime.device).type != "cpu",
    }
    return ", ".join(key for key, applies in reasons.items() if applies)


def load_backend(cfg: Config, log: Callable[[str], None] = print) -> tuple[Backend, list[str]]:
    """Build the backend `cfg.backend.name` names; returns it and its warnings (settings it ignores, slow knobs)."""
    name = cfg.backend.name
    if name == "auto":
        refusal = engine_refusal(cfg)
        if not refusal:
            from pipeline.backends.engine import EngineBackend, EngineUnsupported

            try:
                backend = EngineBackend(cfg, log)
                return backend, list(backend.warnings)
            except EngineUnsupported as unsupported:
                refusal = str(unsupported)
        log(f"backend=auto: transformers ({refusal})")
        name = "transformers"
    if name == "transformers":
        from pipeline.backends.hf import TransformersBackend as factory
    elif name == "llamacpp":
        from pipeline.backends.llamacpp import LlamaCppBackend as factory
    elif name == "engine":
        from pipeline.backends.engine import EngineBackend as factory
    elif name == "openvino":
        from pipeline.backends.openvino import OpenVINOBackend as factory
    elif name == "ctranslate2":
        from pipeline.backends.ctranslate2 import CTranslate2Backend as factory
    else:  # config validation keeps this from happening
        raise PipelineError(f"backend={name} is not valid; choose one of: {', '.join(BACKENDS)}")
    backend = factory(cfg, log)
    return backend, list(getattr(backend, "warnings", []))
