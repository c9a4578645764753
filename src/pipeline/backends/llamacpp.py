"""The llama.cpp reference backend: the same prompts, token budget, stopping, constraint and scoring, run by
llama-cpp-python's low-level API on the GGUF file with llama.cpp's own quantized kernels.

One `llama_context` with one KV memory shared by up to `stages.micro_batch_size` sequences (`kv_unified`: the
prompt prefix every sequence shares sits in the cache once). The shared prefix (system prompt, examples) is
decoded once into sequence 0; each prompt starts from a copy of it (`llama_memory_seq_cp`, which only tags the
prefix's cells with the new sequence id), decodes its own suffix and then one token per step. Every
`llama_decode` call carries one `llama_batch` with the tokens of all running sequences (continuous batching:
a finished sequence's cells are dropped with `llama_memory_seq_rm` and a waiting prompt takes its place),
asking logits only for each sequence's last token. The next token is the argmax of llama.cpp's logits, among
the ids the sequence's constraint allows where it has one (the engine's `Constraint` protocol; llama.cpp
reads the same GGUF vocabulary, so the ids are the tokenizer's). A single call is the same loop with one
sequence. An optional extra: `pip install llama-cpp-python==0.3.36` (a few minutes of C++ build).
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.backends import BackendInfo, ignored_settings
from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.results import Generation

INSTALL_HINT = "pip install llama-cpp-python==0.3.36 (builds for minutes)"
PREFIX_SEQ = 0  # the sequence id that holds the shared prefix; prompts run as 1..slots
CONTEXT_TOKENS = 8192  # KV cells shared by all sequences (about 23 kB each for SmolLM2-135M in f16)
BATCH_TOKENS = 2048  # tokens one llama_decode call may carry (llama.cpp splits them into its ubatches)

# what llama.cpp does instead of each setting it does not apply
IGNORED = [
    ("precision.name", "auto", "it computes with the GGUF file's own quantized weights"),
    ("precision.activations", "auto", "it quantizes activations to 8 bits by itself"),
    ("precision.prefix_attention", "auto", "it runs its own attention"),
    ("attention.implementation", "sdpa", "it uses its own attention kernel"),
    ("runtime.compile", "off", "its kernels are compiled C++ already"),
    ("generation.cache_implementation", "dynamic", "it keeps its own KV cache"),
]


def available() -> bool:
    """True when llama-cpp-python is installed."""
    return importlib.util.find_spec("llama_cpp") is not None


def model_gguf(cfg: Config) -> Path:
    """The GGUF file llama.cpp reads: the embedded model's, or model.path when it names one."""
    from pipeline.models import embedded_gguf

    if cfg.model.source == "embedded" and not getattr(cfg.model, "random_weights", False):
        return embedded_gguf()
    if cfg.model.source == "local" and str(cfg.model.path).endswith(".gguf") and Path(cfg.model.path).is_file():
        return Path(cfg.model.path)
    raise PipelineError("backend=llamacpp needs a GGUF model: model=smollm2-135m or model=local model.path=FILE.gguf")


EXTRA_BUFTS_ENV = "PIPELINE_LLAMACPP_EXTRA_BUFTS"
AMX_NOTE = (
    "llama.cpp: its extra weight buffers (AMX, CPU repack) are off on this AMX CPU, where with them it segfaulted "
    f"right after loading (the class of llama.cpp issue 20824, in its AMX matrix product); {EXTRA_BUFTS_ENV}=1 "
    "turns them back on"
)


def amx_buffers_off(model_params) -> bool:
    """Turns llama.cpp's extra buffer types off on a CPU with AMX (unless $PIPELINE_LLAMACPP_EXTRA_BUFTS=1): a
    llama-cpp-python 0.3.36 built there puts the weights in its AMX buffer, and it crashed (SIGSEGV) right after
    loading on the AMX Xeon measured here (both times tried), and ran with them off: the class of llama.cpp issue 20824
    and of Ollama's Sapphire and Granite Rapids reports. What the CPU is decides, not a forced kind: the package
    was compiled for this CPU."""
    from pipeline import cpu

    if cpu.current().detected != "amx" or os.environ.get(EXTRA_BUFTS_ENV, "") not in ("", "0"):
        return False
    model_params.use_extra_bufts = False
    return True


@dataclass
class _Row:
    """One sequence in the decode loop."""

    index: int  # position in the caller's list
    pending: list[int]  # tokens to decode next (the prompt's suffix first, then one token per step)
    budget: int
    constraint: Any = None
    forced: list[int] | None = None  # teacher forcing: the continuation to feed instead of choosing
    seq_id: int = -1
    pos: int = 0  # position of the first pending token
    cells: int = 0  # KV cells this row may come to hold beyond the shared prefix
    generated: list[int] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)
    done: bool = False
    hit_budget: bool = False


class LlamaCppBackend:
    """`generate` and `batched_generate` over llama.cpp, batched in one llama_batch, constrained, greedy."""

    def __init__(self, cfg: Config, log: Callable[[str], None] = print):
        if not available():
            raise PipelineError(f"backend=llamacpp needs llama-cpp-python: {INSTALL_HINT}")
        gen = cfg.generation
        if gen.do_sample or gen.num_beams != 1:
            raise PipelineError(
                "backend=llamacpp runs greedy decoding only; set generation.do_sample=false num_beams=1"
            )
        import llama_cpp
        from llama_cpp import _internals, _logger

        _logger.set_verbose(False)  # llama.cpp's load and context logs, as Llama(verbose=False) silences them

        from pipeline.engine import StopTokens
        from pipeline.models import gguf_tokenizer, model_cache_dir

        self.lib = llama_cpp
        self.gguf, self.cfg, self.model_cfg = model_gguf(cfg), gen, cfg.model
        log(f"loading {self.gguf.name} with llama.cpp (llama-cpp-python {llama_cpp.__version__})")
        start = time.perf_counter()
        # the chat template, the constraint's token ids and the course's `.tokenizer`: the GGUF file's vocabulary
        self.tokenizer = gguf_tokenizer(self.gguf, model_cache_dir(cfg.model))
        threads = cfg.runtime.num_threads or os.cpu_count() or 1
        model_params = llama_cpp.llama_model_default_params()
        if amx_buffers_off(model_params):
            log(AMX_NOTE)
        self.model = _internals.LlamaModel(path_model=str(self.gguf), params=model_params, verbose=False)
        self.slots = max(1, min(cfg.stages.micro_batch_size, llama_cpp.llama_max_parallel_sequences() - 1))
        params = llama_cpp.llama_context_default_params()  # flash attention: llama.cpp's own default (auto)
        params.n_ctx, params.n_batch = CONTEXT_TOKENS, BATCH_TOKENS
        params.n_ubatch = min(params.n_ubatch, BATCH_TOKENS)
        params.n_seq_max = self.slots + 1
        params.kv_unified = True  # sequences share the prefix's cells: llama.cpp's advice for a large common prefix
        params.n_threads, params.n_threads_batch = threads, threads
        params.no_perf = True
        self.context = _internals.LlamaContext(model=self.model, params=params, verbose=False)
        self.ctx, self.memory = self.context.ctx, self.context.memory
        self.n_vocab = self.model.n_vocab()
        self.batch = llama_cpp.llama_batch_init(BATCH_TOKENS, 0, 1)
        self.eos = self.model.token_eos()
        self.stopper = StopTokens(self.tokenizer, gen.stop_string, sorted({self.eos, self.tokenizer.eos_token_id}))
        self.use_prefix = gen.prefix_cache
        self.prefix_ids: list[int] = []
        self.warnings = ignored_settings(cfg, IGNORED, "llamacpp")
        self.applies_constraints = True  # a logits mask at every step
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
            tags={"llama_cpp_python": llama_cpp.__version__, "llamacpp_slots": str(self.slots)},
        )

    def __del__(self):
        batch = getattr(self, "batch", None)
        if batch is not None:
            self.lib.llama_batch_free(batch)
            self.batch = None

    def info(self) -> BackendInfo:
        """The GGUF file's quantization as the weight format; its size as the bytes read per token."""
        return self._info

    def encode(self, prompt: str) -> list[int]:
        """The prompt's ids by llama.cpp's tokenizer (special tokens such as <|im_start|> parsed)."""
        return list(self.model.tokenize(prompt.encode(), add_bos=False, special=True))

    def prompt_lengths(self, prompts: list[str]) -> list[int]:
        """Token length of each prompt, by llama.cpp's tokenizer."""
        return [len(self.encode(p)) for p in prompts]

    def loss_model(self):
        """llama.cpp has no torch model: the transformers model of the same GGUF weights, in fp32."""
        if self._loss_model is None:
            import torch

            from pipeline.models import load_model

            self._loss_model = load_model(self.model_cfg, torch.device("cpu"), torch.float32, "sdpa").model
        return self._loss_model, self.tokenizer, "transformers fp32, same weights (llama.cpp has no torch model)"

    # ------------------------------------------------------------------ the KV memory and one decode call

    def set_shared_prefix(self, prompts: list[str]) -> float:
        """Decode the token prefix all `prompts` share into sequence 0, once; every prompt starts from a copy."""
        from pipeline.prefix import MIN_PREFIX_TOKENS, shared_prefix_length

        self.lib.llama_memory_clear(self.memory, True)
        self.prefix_ids = []
        if not self.use_prefix or not prompts:
            return 0.0
        encoded = [self.encode(p) for p in prompts]
        length = shared_prefix_length(encoded)
        if length < MIN_PREFIX_TOKENS:
            return 0.0
        start = time.perf_counter()
        prefix = encoded[0][:length]
        for begin in range(0, length, BATCH_TOKENS):
            chunk = prefix[begin : begin + BATCH_TOKENS]
            self._decode([(PREFIX_SEQ, begin + i, token, False) for i, token in enumerate(chunk)])
        self.prefix_ids = prefix
        return time.perf_counter() - start

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (seq_id, pos, token, wants_logits) entries in one llama_batch."""
        batch = self.batch
        for i, (seq_id, pos, token, logits) in enumerate(entries):
            batch.token[i], batch.pos[i] = token, pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq_id
            batch.logits[i] = logits
        batch.n_tokens = len(entries)
        status = self.lib.llama_decode(self.ctx, batch)
        if status != 0:
            raise PipelineError(
                f"llama_decode failed (status {status}: no room in its {CONTEXT_TOKENS}-token KV cache?); "
                "use a smaller stages.micro_batch_size or generation.max_new_tokens"
            )

    def _logits(self, i: int):
        """The logits of batch entry `i` of the last decode, as a numpy view (valid until the next decode)."""
        import numpy as np

        return np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))

    def _start(self, row: _Row, seq_id: int) -> None:
        """Give `row` a sequence: a copy of the prefix's cells where its prompt starts with the prefix."""
        row.seq_id = seq_id
        self.lib.llama_memory_seq_rm(self.memory, seq_id, -1, -1)
        prefix = self.prefix_ids
        if self._shares_prefix(row):
            self.lib.llama_memory_seq_cp(self.memory, PREFIX_SEQ, seq_id, -1, -1)
            row.pending, row.pos = row.pending[len(prefix) :], len(prefix)
        row.cells = len(row.pending) + row.budget

    def _shares_prefix(self, row: _Row) -> bool:
        prefix = self.prefix_ids
        return bool(prefix) and len(row.pending) > len(prefix) and row.pending[: len(prefix)] == prefix

    def _choose(self, row: _Row, logits) -> int | None:
        """The row's next token: the teacher-forced one, else the argmax among its allowed ids; None ends it."""
        import numpy as np

        if row.forced is not None:
            return row.forced[len(row.generated)]
        allowed = row.constraint.allowed(row.generated) if row.constraint is not None else None
        if allowed is None:
            return int(np.argmax(logits))
        if not allowed:  # nothing may follow: the constrained text is complete
            return None
        ids = np.asarray(allowed, dtype=np.int64)
        return int(ids[np.argmax(logits[ids])]) if len(ids) > 1 else int(ids[0])

    def _run(self, rows: list[_Row], on_first_token: Callable[[], None] | None = None) -> None:
        """Continuous batching: up to `slots` rows share each llama_decode; finished rows free their sequence."""
        import torch

        waiting, running = list(rows), []
        free_seqs = list(range(self.slots, 0, -1))
        while waiting or running:
            while waiting and free_seqs and self._fits(running, waiting[0]):
                row = waiting.pop(0)
                self._start(row, free_seqs.pop())
                running.append(row)
            if not running:
                raise PipelineError(
                    f"a prompt of {len(waiting[0].pending)} tokens does not fit llama.cpp's {CONTEXT_TOKENS}-token "
                    "KV cache; shorten the prompt"
                )
            entries, last = [], []
            for row in running:
                tokens = row.pending
                entries += [(row.seq_id, row.pos + i, t, i == len(tokens) - 1) for i, t in enumerate(tokens)]
                last.append(len(entries) - 1)
            self._decode(entries)
            if on_first_token is not None:
                on_first_token()
                on_first_token = None
            for row, i in zip(running, last):
                logits = self._logits(i)
                row.pos += len(row.pending)
                if row.forced is not None:
                    row.logprobs.append(torch.log_softmax(torch.from_numpy(logits.copy()), dim=-1))
                token = self._choose(row, logits)
                if token is None:
                    row.done = True
                    continue
                row.generated.append(token)
                row.pending = [token]
                if row.forced is not None:
                    row.done = len(row.generated) >= len(row.forced)
                elif self.stopper.stops(row.generated):
                    row.done = True
                elif len(row.generated) >= row.budget:
                    row.done, row.hit_budget = True, True
            for row in running:
                if row.done:
                    self.lib.llama_memory_seq_rm(self.memory, row.seq_id, -1, -1)
                    free_seqs.append(row.seq_id)
            running = [row for row in running if not row.done]

    def _fits(self, running: list[_Row], row: _Row) -> bool:
        """Whether `row` can join without the shared KV cache (or one decode call) running out of room."""
        own = len(row.pending) - (len(self.prefix_ids) if self._shares_prefix(row) else 0)
        cells = len(self.prefix_ids) + sum(r.cells for r in running) + own + row.budget
        tokens = sum(len(r.pending) for r in running) + own
        return cells <= CONTEXT_TOKENS and tokens <= BATCH_TOKENS

    # ------------------------------------------------------------------ the course API

    def batched_generate(
        self, prompts: list[str], max_new_tokens: int | None = None, constraints=None
    ) -> list[Generation]:
        """All `prompts` decoded together, one llama_batch per step; `constraints[i]` limits prompt i's tokens."""
        budget = max_new_tokens or self.cfg.max_new_tokens
        constraints = constraints or [None] * len(prompts)
        start = time.perf_counter()
        first_token_at: list[float] = []
        rows = [_Row(i, self.encode(p), budget, c) for i, (p, c) in enumerate(zip(prompts, constraints))]
        self._run(rows, lambda: first_token_at.append(time.perf_counter()))
        latency_s = time.perf_counter() - start
        first_token_s = first_token_at[0] - start if first_token_at else float("nan")
        return [
            Generation(
                self.tokenizer.decode(row.generated, skip_special_tokens=True),
                len(row.generated),
                latency_s,
                first_token_s,
                row.hit_budget,
                list(row.generated),
            )
            for row in rows
        ]

    def generate(self, prompt: str, max_new_tokens: int | None = None, constraint=None) -> Generation:
        """Greedy generation for one prompt (within `constraint`'s allowed tokens where given)."""
        return self.batched_generate([prompt], max_new_tokens, [constraint])[0]

    def next_token_logprobs(self, prompts: list[list[int]], continuations: list[list[int]], batched: bool) -> Iterator:
        """llama.cpp's log-softmax distributions along each prompt + continuation, by the same decode loop that
        generates (the prefix's copied cells, the suffix in one call, then one token per step), teacher-forced;
        `batched`: the sequences share each llama_decode as in the batched stage, else one at a time."""
        import torch

        group = self.slots if batched else 1
        for begin in range(0, len(prompts), group):
            pairs = zip(prompts[begin : begin + group], continuations[begin : begin + group])
            rows = [_Row(begin + i, list(p), len(c), forced=list(c)) for i, (p, c) in enumerate(pairs)]
            self._run([row for row in rows if row.forced])
            for row in rows:
                yield torch.stack(row.logprobs) if row.logprobs else torch.empty(0, self.n_vocab)

    def token_text(self, token: int) -> str:
        """llama.cpp's text of one token (used by the tests that compare vocabularies)."""
        return self.model.detokenize([token], special=True).decode(errors="replace")
