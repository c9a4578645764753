"""The llama.cpp reference backend: the same prompts, token budget, stopping and scoring, run by llama-cpp-python.

An optional extra (`pip install llama-cpp-python`, a few minutes of C++ build) so the outside reference is
measured by the same stages. It reads the GGUF file directly, with its own quantized kernels.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

from pipeline.config import GenerationConfig
from pipeline.errors import PipelineError
from pipeline.generation import Generation


def available() -> bool:
    """True when llama-cpp-python is installed."""
    return importlib.util.find_spec("llama_cpp") is not None


class LlamaCppGenerator:
    """`generate` and `batched_generate` over a llama.cpp model; a batch runs its prompts one after another."""

    def __init__(self, gguf: Path, cfg: GenerationConfig, num_threads: int | None, context_tokens: int = 2048):
        if not available():
            raise PipelineError(
                "backend=llamacpp needs llama-cpp-python: pip install llama-cpp-python (builds for minutes)"
            )
        from llama_cpp import Llama

        if cfg.do_sample or cfg.num_beams != 1:
            raise PipelineError(
                "backend=llamacpp runs greedy decoding only; set generation.do_sample=false num_beams=1"
            )
        threads = num_threads or os.cpu_count() or 1
        self.cfg = cfg
        self.llm = Llama(
            model_path=str(gguf), n_ctx=context_tokens, n_threads=threads, n_threads_batch=threads, verbose=False
        )
        self.eos = self.llm.token_eos()
        self.prefix_ids: list[int] = []  # llama.cpp reuses the KV cache of a matching prefix (reset=True)

    def set_shared_prefix(self, prompts: list[str]) -> float:
        """llama.cpp keeps the previous prompt's KV cache and reuses its matching prefix; nothing to do."""
        return 0.0

    def generate(self, prompt: str, max_new_tokens: int | None = None) -> Generation:
        """Greedy generation for one prompt, stopping at EOS or the configured stop text."""
        budget = max_new_tokens or self.cfg.max_new_tokens
        stop = self.cfg.stop_string or None
        start = time.perf_counter()
        tokens = self.llm.tokenize(prompt.encode(), add_bos=False, special=True)
        generated: list[int] = []
        first_token_s = float("nan")
        for token in self.llm.generate(tokens, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            if not generated:
                first_token_s = time.perf_counter() - start
            generated.append(token)
            if token == self.eos or len(generated) >= budget:
                break
            if stop and stop in self.llm.detokenize(generated[-8:]).decode(errors="ignore"):
                break
        text = self.llm.detokenize([t for t in generated if t != self.eos]).decode(errors="ignore")
        return Generation(text, len(generated), time.perf_counter() - start, first_token_s)

    def batched_generate(self, prompts: list[str], max_new_tokens: int | None = None) -> list[Generation]:
        """llama-cpp-python's high-level API has no batched decoding: the prompts run one after another."""
        start = time.perf_counter()
        results = [self.generate(p, max_new_tokens) for p in prompts]
        latency_s = time.perf_counter() - start
        first = results[0].first_token_s if results else float("nan")
        return [Generation(r.text, r.num_tokens, latency_s, first) for r in results]
