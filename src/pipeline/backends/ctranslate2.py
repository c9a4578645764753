"""CTranslate2 as a peer backend: the model converted once to CTranslate2's int8 format, greedy, the shared
prompt prefix as a cached `static_prompt`.

Set up as CTranslate2's docs recommend for a decoder on a CPU (docs/guides/transformers.md, docs/performance.md):
`TransformersConverter(...).convert(quantization="int8")` from the cached safetensors folder, `compute_type="int8"`,
one generator with `intra_threads` = the cores, `static_prompt` for the system prompt and examples every prompt
starts with (its KV state is computed once and reused), `include_prompt_in_result=False` so the prompt is
forwarded at once rather than step by step. On AMD CPUs its dispatcher stays on AVX2 code unless told:
`CT2_FORCE_CPU_ISA` is set to the best ISA this CPU (or `PIPELINE_CPU_KIND`) runs, unless already set.

Its Python API (4.8.5) has no logits processor or grammar: the tool prompt's constraint is not applied,
and a warning at load says so.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from pipeline.backends import BackendInfo, ignored_settings
from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.results import Generation

INSTALL_HINT = 'pip install -e ".[peers]" (or pip install ctranslate2==4.8.5)'
COMPUTE_TYPE = "int8"  # CTranslate2's recommended CPU type: int8 weights, int8 GEMM (oneDNN / MKL)
# forward_batch returns [rows, length, vocab] float32: sequences per call in next_token_logprobs(batched=True)
LOGPROB_ROWS = 4

IGNORED = [
    ("precision.name", "auto", f"it computes with its own {COMPUTE_TYPE} weights"),
    ("precision.activations", "auto", "it quantizes activations to int8 itself"),
    ("precision.prefix_attention", "auto", "it runs its own attention"),
    ("attention.implementation", "sdpa", "it uses its own attention kernel"),
    ("runtime.compile", "off", "its kernels are compiled C++ already"),
    ("generation.cache_implementation", "dynamic", "it keeps its own KV cache"),
    (
        "prompt.constrained",
        False,
        "CTranslate2's Python API has no logits processor or grammar: the tool form is decoded freely, then "
        "grounded and checked",
    ),
]


def available() -> bool:
    """True when ctranslate2 is installed."""
    return importlib.util.find_spec("ctranslate2") is not None


def require(backend: str, module: str, hint: str) -> None:
    """PipelineError naming the install when `module` is missing."""
    if importlib.util.find_spec(module) is None:
        raise PipelineError(f"backend={backend} needs {module}: {hint}")


def source_folder(cfg: Config, backend: str) -> tuple[Path, Path]:
    """(safetensors folder of the model, the tokenizer folder or the same) a peer converts from."""
    from pipeline.models import embedded_gguf, gguf_model_folder, gguf_tokenizer, local_model_path, model_cache_dir

    if getattr(cfg.model, "random_weights", False):
        raise PipelineError(f"backend={backend} converts trained weights; the null model runs on backend=engine")
    cache_dir = model_cache_dir(cfg.model)
    gguf = None
    if cfg.model.source == "embedded":
        gguf = embedded_gguf()
    elif cfg.model.source == "local":
        location = local_model_path(cfg.model.path)
        if location.is_file():
            gguf = location
        else:
            return location, location
    if gguf is None:
        raise PipelineError(
            f"backend={backend} converts a local model: model=smollm2-135m (embedded), or model=local "
            "model.path=FOLDER_OR_FILE.gguf"
        )
    gguf_tokenizer(gguf, cache_dir)  # fills the tokenizer cache beside the model
    folder = gguf_model_folder(gguf, cache_dir)
    tokenizer = folder.parent / "tokenizer"
    if not (tokenizer / "tokenizer_config.json").is_file():  # the disk refused it (warned above)
        from pipeline.cache import FIX

        raise PipelineError(f"backend={backend} converts the model from files in {folder.parent}: {FIX}")
    return folder, tokenizer


def stop_ids(tokenizer, stop: str | None, eos: int) -> list[int]:
    """Ids whose token alone ends a generation: EOS and every token whose text holds the stop text."""
    from pipeline.engine import StopTokens

    return sorted(StopTokens(tokenizer, stop, [eos]).direct | {eos})


def cut_at_stop(generated: list[int], stopper) -> tuple[list[int], bool]:
    """`generated` up to and including the token that stops it (EOS or the stop text); whether it stopped."""
    for end in range(1, len(generated) + 1):
        if stopper.stops(generated[:end]):
            return generated[:end], True
    return generated, False


def fp32_loss_model(owner, name: str):
    """The transformers fp32 model of the same weights (peers have no torch model), loaded once."""
    if getattr(owner, "_loss_model", None) is None:
        import torch

        from pipeline.models import load_model

        owner._loss_model = load_model(owner.model_cfg, torch.device("cpu"), torch.float32, "sdpa").model
    return owner._loss_model, owner.tokenizer, f"transformers fp32, same weights ({name} has no torch model)"


class CTranslate2Backend:
    """`generate` and `batched_generate` on a CTranslate2 `Generator` (one batch per call, greedy)."""

    def __init__(self, cfg: Config, log: Callable[[str], None] = print):
        require("ctranslate2", "ctranslate2", INSTALL_HINT)
        gen = cfg.generation
        if gen.do_sample or gen.num_beams != 1:
            raise PipelineError(
                "backend=ctranslate2 runs greedy decoding here; set generation.do_sample=false num_beams=1"
            )
        from transformers import AutoTokenizer

        from pipeline import cpu
        from pipeline.engine import StopTokens
        from pipeline.models import _atomic_save

        isa = {"avx512": "AVX512", "avx2": "AVX2"}.get(cpu.current().kernel_isa or "", "")
        if isa:
            os.environ.setdefault("CT2_FORCE_CPU_ISA", isa)  # read when the library loads, just below
        import ctranslate2

        start = time.perf_counter()
        folder, tokenizer_folder = source_folder(cfg, "ctranslate2")
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder))
        target = folder.parent / f"ctranslate2-{ctranslate2.__version__}-{COMPUTE_TYPE}"
        if not (target / "model.bin").is_file():
            log(f"converting {folder} to CTranslate2 {COMPUTE_TYPE} (once; cached in {target})")

            class _Converter(ctranslate2.converters.TransformersConverter):
                def load_tokenizer(self, tokenizer_class, model_name_or_path, **kwargs):
                    return tokenizer_class.from_pretrained(str(tokenizer_folder), **kwargs)

            _atomic_save(
                target, lambda tmp: _Converter(str(folder)).convert(str(tmp), quantization=COMPUTE_TYPE, force=True)
            )
        threads = cfg.runtime.num_threads or os.cpu_count() or 1
        log(f"loading {target.name} with CTranslate2 {ctranslate2.__version__} ({COMPUTE_TYPE}, {threads} threads)")
        self.generator = ctranslate2.Generator(
            str(target), device="cpu", compute_type=COMPUTE_TYPE, inter_threads=1, intra_threads=threads
        )
        self.cfg, self.model_cfg = gen, cfg.model
        self.eos = self.tokenizer.convert_tokens_to_ids(ctranslate2_eos(target)) or self.tokenizer.eos_token_id
        self.end_ids = stop_ids(self.tokenizer, gen.stop_string, self.eos)
        self.stopper = StopTokens(self.tokenizer, gen.stop_string, [self.eos])
        self.use_prefix = gen.prefix_cache
        self.prefix_ids: list[int] = []
        self.warnings = ignored_settings(cfg, IGNORED, "ctranslate2")
        self.applies_constraints = False  # for the runner: its stages decode freely whatever the prompt asks
        self._loss_model = None
        self._info = BackendInfo(
            name="ctranslate2",
            dtype=self.generator.compute_type,
            weight_format=COMPUTE_TYPE,
            weight_bytes=(target / "model.bin").stat().st_size,
            device="cpu",
            attention="ctranslate2",
            source=str(target),
            load_time_s=time.perf_counter() - start,
            tags={"ctranslate2": ctranslate2.__version__, "ct2_cpu_isa": os.environ.get("CT2_FORCE_CPU_ISA", "auto")},
        )

    def info(self) -> BackendInfo:
        """int8 compute; the converted model file's size as the bytes read per token."""
        return self._info

    def encode(self, prompt: str) -> list[int]:
        """The prompt's ids by the model's tokenizer (CTranslate2 takes its tokens as they are)."""
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def prompt_lengths(self, prompts: list[str]) -> list[int]:
        """Token length of each prompt."""
        return [len(self.encode(p)) for p in prompts]

    def set_shared_prefix(self, prompts: list[str]) -> float:
        """The shared prefix becomes CTranslate2's `static_prompt`: its state is computed on first use and cached."""
        from pipeline.prefix import MIN_PREFIX_TOKENS, shared_prefix_length

        self.prefix_ids = []
        if not self.use_prefix or not prompts:
            return 0.0
        encoded = [self.encode(p) for p in prompts]
        length = shared_prefix_length(encoded)
        if length < MIN_PREFIX_TOKENS:
            return 0.0
        start = time.perf_counter()
        self.prefix_ids = encoded[0][:length]
        # one generation of one token fills CTranslate2's static-prompt cache now, not in the first stage call
        self._run([encoded[0]], 1)
        return time.perf_counter() - start

    def _run(self, encoded: list[list[int]], budget: int) -> list[list[int]]:
        prefix = self.prefix_ids
        static = bool(prefix) and all(ids[: len(prefix)] == prefix and len(ids) > len(prefix) for ids in encoded)
        tokens = [self.tokenizer.convert_ids_to_tokens(ids[len(prefix) :] if static else ids) for ids in encoded]
        results = self.generator.generate_batch(
            tokens,
            static_prompt=self.tokenizer.convert_ids_to_tokens(prefix) if static else None,
            include_prompt_in_result=False,
            max_length=budget,
            end_token=self.end_ids,
            return_end_token=True,
            beam_size=1,
            sampling_topk=1,
        )
        return [list(result.sequences_ids[0]) for result in results]

    def batched_generate(
        self, prompts: list[str], max_new_tokens: int | None = None, constraints=None
    ) -> list[Generation]:
        """All `prompts` in one `generate_batch` call (`constraints` are not applied: a warning at load says so)."""
        budget = max_new_tokens or self.cfg.max_new_tokens
        start = time.perf_counter()
        outputs = self._run([self.encode(p) for p in prompts], budget)
        latency_s = time.perf_counter() - start
        generations = []
        for generated in outputs:
            generated, stopped = cut_at_stop(generated, self.stopper)
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            # CTranslate2 returns whole sequences: no separate first-token time
            generations.append(Generation(text, len(generated), latency_s, float("nan"), not stopped, generated))
        return generations

    def generate(self, prompt: str, max_new_tokens: int | None = None, constraint=None) -> Generation:
        """Greedy generation for one prompt."""
        return self.batched_generate([prompt], max_new_tokens)[0]

    def next_token_logprobs(self, prompts: list[list[int]], continuations: list[list[int]], batched: bool) -> Iterator:
        """Log-softmax of `Generator.forward_batch` (the same int8 model and kernels, all positions at once) along
        each prompt + continuation; `batched`: up to LOGPROB_ROWS sequences per call, padded by CTranslate2."""
        import numpy as np
        import torch

        rows = LOGPROB_ROWS if batched else 1
        for begin in range(0, len(prompts), rows):
            group = list(zip(prompts[begin : begin + rows], continuations[begin : begin + rows]))
            sequences = [list(p) + list(c) for p, c in group]
            log_probs = np.asarray(self.generator.forward_batch(sequences, return_log_probs=True))
            for row, (prompt, continuation) in enumerate(group):
                span = log_probs[row, len(prompt) - 1 : len(prompt) - 1 + len(continuation)]
                yield torch.from_numpy(np.array(span, dtype=np.float32))

    def loss_model(self):
        """CTranslate2 has no torch model: the transformers fp32 model of the same weights."""
        return fp32_loss_model(self, "CTranslate2")


def ctranslate2_eos(model_dir: Path) -> str:
    """The end token the converted model's config names."""
    import json

    return json.loads((model_dir / "config.json").read_text()).get("eos_token", "")
