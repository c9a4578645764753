"""The llama.cpp reference backend: the same prompts, token budget, stopping and scoring, run by llama-cpp-python.

An optional extra (`pip install llama-cpp-python`, a few minutes of C++ build) so the outside reference is
measured by the same stages. It reads the GGUF file directly, with its own quantized kernels.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.backends import BackendInfo, ignored_settings
from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.results import Generation

# what llama.cpp does instead of each setting it does not apply
IGNORED = [
    ("precision.name", "auto", "it computes with the GGUF file's own quantized weights"),
    ("precision.activations", "auto", "it quantizes activations to 8 bits by itself"),
    ("attention.implementation", "sdpa", "it uses its own attention kernel"),
    ("runtime.compile", "off", "its kernels are compiled C++ already"),
    ("generation.cache_implementation", "dynamic", "it keeps its own KV cache"),
    ("generation.prefix_cache", True, "it reuses the matching prefix of the previous prompt by itself"),
    ("prompt.constrained", False, "it decodes the tool form freely; the form is grounded and checked afterwards"),
]


def available() -> bool:
    """True when llama-cpp-python is installed."""
    return importlib.util.find_spec("llama_cpp") is not None


def model_gguf(cfg: Config) -> Path:
    """The GGUF file llama.cpp reads: the embedded model's, or model.path when it names one."""
    from pipeline.models import embedded_gguf

    if cfg.model.source == "embedded":
        return embedded_gguf()
    if cfg.model.source == "local" and str(cfg.model.path).endswith(".gguf") and Path(cfg.model.path).is_file():
        return Path(cfg.model.path)
    raise PipelineError("backend=llamacpp needs a GGUF model: model=smollm2-135m or model=local model.path=FILE.gguf")


class LlamaCppBackend:
    """`generate` and `batched_generate` over a llama.cpp model; a batch runs its prompts one after another."""

    def __init__(self, cfg: Config, log: Callable[[str], None] = print, context_tokens: int = 2048):
        if not available():
            raise PipelineError(
                "backend=llamacpp needs llama-cpp-python: pip install llama-cpp-python (builds for minutes)"
            )
        gen = cfg.generation
        if gen.do_sample or gen.num_beams != 1:
            raise PipelineError(
                "backend=llamacpp runs greedy decoding only; set generation.do_sample=false num_beams=1"
            )
        from llama_cpp import Llama

        from pipeline.models import gguf_tokenizer, model_cache_dir

        self.gguf, self.cfg, self.model_cfg = model_gguf(cfg), gen, cfg.model
        log(f"loading {self.gguf.name} with llama.cpp")
        start = time.perf_counter()
        # the chat template, and the course's `.tokenizer`
        self.tokenizer = gguf_tokenizer(self.gguf, model_cache_dir(cfg.model))
        threads = cfg.runtime.num_threads or os.cpu_count() or 1
        self.llm = Llama(
            model_path=str(self.gguf), n_ctx=context_tokens, n_threads=threads, n_threads_batch=threads, verbose=False
        )
        self.eos = self.llm.token_eos()
        self.prefix_ids: list[int] = []  # llama.cpp reuses the KV cache of a matching prefix (reset=True)
        self.warnings = ignored_settings(cfg, IGNORED, "llamacpp")
        self._loss_model = None
        self._info = BackendInfo(
            name="llamacpp",
            dtype="gguf",
            weight_format=self.gguf.name.rsplit(".", 2)[-2],
            weight_bytes=self.gguf.stat().st_size,
            device="cpu",
            attention="llama.cpp",
            source=str(self.gguf),
            load_time_s=time.perf_counter() - start,
        )

    def info(self) -> BackendInfo:
        """The GGUF file's quantization as the weight format; its size as the bytes read per token."""
        return self._info

    def set_shared_prefix(self, prompts: list[str]) -> float:
        """llama.cpp keeps the previous prompt's KV cache and reuses its matching prefix; nothing to do."""
        return 0.0

    def _tokenize(self, prompt: str) -> list[int]:
        return self.llm.tokenize(prompt.encode(), add_bos=False, special=True)

    def prompt_lengths(self, prompts: list[str]) -> list[int]:
        """Token length of each prompt, by llama.cpp's tokenizer."""
        return [len(self._tokenize(p)) for p in prompts]

    def loss_model(self):
        """llama.cpp has no torch model: the transformers model of the same GGUF weights, in fp32."""
        if self._loss_model is None:
            import torch

            from pipeline.models import load_model

            loaded = load_model(self.model_cfg, torch.device("cpu"), torch.float32, "sdpa")
            self._loss_model = loaded.model
        return self._loss_model, self.tokenizer, "transformers fp32, same weights (llama.cpp has no torch model)"

    def generate(self, prompt: str, max_new_tokens: int | None = None, constraint=None) -> Generation:
        """Greedy generation for one prompt, stopping at EOS or the configured stop text (`constraint` is not
        applied: a warning at load says so)."""
        budget = max_new_tokens or self.cfg.max_new_tokens
        stop = self.cfg.stop_string or None
        start = time.perf_counter()
        tokens = self._tokenize(prompt)
        generated: list[int] = []
        first_token_s = float("nan")
        stopped = False
        for token in self.llm.generate(tokens, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            if not generated:
                first_token_s = time.perf_counter() - start
            generated.append(token)
            if token == self.eos:
                stopped = True
                break
            if stop and stop in self.llm.detokenize(generated[-8:]).decode(errors="ignore"):
                stopped = True
                break
            if len(generated) >= budget:
                break
        text = self.llm.detokenize([t for t in generated if t != self.eos]).decode(errors="ignore")
        return Generation(text, len(generated), time.perf_counter() - start, first_token_s, hit_budget=not stopped)

    def batched_generate(
        self, prompts: list[str], max_new_tokens: int | None = None, constraints=None
    ) -> list[Generation]:
        """llama-cpp-python's high-level API has no batched decoding: the prompts run one after another
        (`constraints` are not applied: a warning at load says so)."""
        start = time.perf_counter()
        results = [self.generate(p, max_new_tokens) for p in prompts]
        latency_s = time.perf_counter() - start
        first = results[0].first_token_s if results else float("nan")
        return [Generation(r.text, r.num_tokens, latency_s, first, r.hit_budget) for r in results]
