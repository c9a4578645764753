"""Greedy (or sampled) generation with Hugging Face `generate`, single and batched, stopping at the answer tag."""

from __future__ import annotations

import copy
import time

import torch
from transformers import (
    CompileConfig,
    DynamicCache,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation import utils as _generation_utils

from pipeline.config import GenerationConfig
from pipeline.prefix import MIN_PREFIX_TOKENS, shared_prefix_length
from pipeline.results import Generation

# transformers 5.x renames generate's `past_key_values` to `cache`; use what the installed version takes
CACHE_KWARG = "cache" if "cache" in getattr(_generation_utils, "ALL_CACHE_NAMES", ()) else "past_key_values"


class StopAtText(StoppingCriteria):
    """Marks a row done once its generated text contains `stop` or it emits EOS, and remembers when.

    Decoding every row at every step would cost more than the model on a small CPU,
    so only rows whose last token holds the stop text's final character are decoded.
    """

    def __init__(self, tokenizer, stop: str | None, eos_ids: list[int], prompt_len: int):
        self.tokenizer, self.stop, self.prompt_len = tokenizer, stop, prompt_len
        self.eos = torch.tensor(eos_ids, dtype=torch.long)
        self.candidates = _tokens_containing(tokenizer, stop[-1]) if stop else None
        self.finished_at: dict[int, int] = {}  # row -> generated length when it finished
        self.first_token_at: float | None = None  # perf_counter() when the first token was out

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        length = input_ids.shape[1] - self.prompt_len
        last = input_ids[:, -1].cpu()  # waits for the step to finish, so the clock below is honest
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        done = torch.isin(last, self.eos)
        if self.candidates is not None:
            for row in torch.nonzero(self.candidates[last.clamp(max=len(self.candidates) - 1)]).flatten().tolist():
                tail = self.tokenizer.decode(input_ids[row, max(self.prompt_len, input_ids.shape[1] - 8) :])
                if self.stop in tail:
                    done[row] = True
        for row in torch.nonzero(done).flatten().tolist():
            self.finished_at.setdefault(row, length)
        return done.to(input_ids.device)


class AllowedTokens(LogitsProcessor):
    """Constrained decoding in `generate`: each row may only pick a token its constraint allows.

    The same `Constraint` objects as the engine's (`allowed(generated) -> ids | None`); a row whose
    constraint allows nothing more (a finished form, or a padded row) is given EOS.
    """

    def __init__(self, constraints: list, prompt_len: int, eos_id: int):
        self.constraints, self.prompt_len, self.eos_id = constraints, prompt_len, eos_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_len :].tolist()
        for row, constraint in enumerate(self.constraints):
            allowed = constraint.allowed(generated[row]) if constraint is not None else None
            if allowed is None:
                continue
            ids = torch.as_tensor(list(allowed) or [self.eos_id], device=scores.device)
            kept = scores[row, ids].clone()
            scores[row] = float("-inf")
            scores[row, ids] = kept
        return scores


_CANDIDATE_CACHE: dict[tuple[int, str], torch.Tensor] = {}


def _tokens_containing(tokenizer, char: str) -> torch.Tensor:
    """Boolean mask over the vocabulary: tokens whose decoded text contains `char`."""
    key = (id(tokenizer), char)
    if key not in _CANDIDATE_CACHE:
        from pipeline.tokens import token_texts

        texts = token_texts(tokenizer)
        _CANDIDATE_CACHE[key] = torch.tensor([char in text for text in texts])
    return _CANDIDATE_CACHE[key]


def _length_to_eos(tokens: torch.Tensor, eos_ids: list[int]) -> int | None:
    """Length up to and including the first EOS; None when the row never emitted one."""
    hits = torch.nonzero(torch.isin(tokens, torch.tensor(eos_ids))).flatten()
    return int(hits[0]) + 1 if len(hits) else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Generator:
    """Wraps a model and tokenizer with the course API: `generate(prompt)` and `batched_generate(prompts)`."""

    def __init__(self, model, tokenizer, cfg: GenerationConfig, compile_mode: str = "off"):
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg.resolved()  # unset settings: the defaults
        self.compile_config = None
        if compile_mode != "off":
            # transformers compiles the decode step itself when the cache is static; on CPU it must be told to
            self.compile_config = CompileConfig(mode=compile_mode, fullgraph=False)
            self.compile_config._compile_all_devices = True
        self.device = next(model.parameters()).device
        self.prefix_ids: list[int] = []
        self.prefix_cache: DynamicCache | None = None
        eos = model.generation_config.eos_token_id
        self.eos_ids = sorted(
            {*(eos if isinstance(eos, list) else [eos] if eos is not None else []), tokenizer.eos_token_id}
        )

    def _generate_kwargs(self, max_new_tokens: int | None) -> dict:
        cfg = self.cfg
        kwargs = dict(
            max_new_tokens=max_new_tokens or cfg.max_new_tokens,
            do_sample=cfg.do_sample,
            num_beams=cfg.num_beams,
            use_cache=cfg.use_cache,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.eos_ids,
        )
        if self.compile_config is not None:
            kwargs.update(cache_implementation="static", compile_config=self.compile_config)
        elif cfg.cache_implementation == "static":
            kwargs.update(cache_implementation="static")
        if cfg.do_sample:
            kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
        else:  # keep the model's sampling defaults from reaching greedy decoding
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs

    def set_shared_prefix(self, prompts: list[str]) -> float:
        """Compute once the KV cache of the token prefix all `prompts` share (system prompt, few-shot examples).

        Later calls start from a copy of it instead of recomputing it for every prompt. Only with a
        dynamic cache and greedy or sampled decoding; returns the seconds it took (0 when not used).
        """
        self.prefix_ids, self.prefix_cache = [], None
        if not self.cfg.prefix_cache or self.compile_config is not None or self.cfg.cache_implementation != "dynamic":
            return 0.0
        if self.cfg.num_beams != 1 or not self.cfg.use_cache:
            return 0.0
        encoded = [self.encode(p) for p in prompts]
        length = shared_prefix_length(encoded)
        if length < MIN_PREFIX_TOKENS:
            return 0.0
        start = time.perf_counter()
        self.prefix_ids = encoded[0][:length]
        self.prefix_cache = DynamicCache(config=self.model.config)
        self.model(input_ids=torch.tensor([self.prefix_ids], device=self.device), past_key_values=self.prefix_cache)
        _sync(self.device)
        return time.perf_counter() - start

    def prompt_lengths(self, prompts: list[str]) -> list[int]:
        """Token length of each prompt."""
        return [len(self.encode(p)) for p in prompts]

    def next_token_logprobs(self, prompts: list[list[int]], continuations: list[list[int]], batched: bool):
        """The model's own distributions (its dtype, attention, quantized layers) along the sequences, teacher-forced
        in chunks (pipeline.fidelity); a compiled decode step is not used here, its eager graph is."""
        from pipeline.fidelity import teacher_forced

        yield from teacher_forced(self.model, prompts, continuations)

    def encode(self, prompt: str) -> list[int]:
        """The prompt's token ids, as generation feeds them (no special tokens added)."""
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def _inputs(self, prompts: list[str]) -> dict:
        """Left-padded input ids and mask; with a shared prefix, the padding sits between prefix and suffix."""
        encoded = [self.encode(p) for p in prompts]
        prefix = self.prefix_ids
        use_prefix = bool(prefix) and all(ids[: len(prefix)] == prefix for ids in encoded)
        if use_prefix:
            encoded = [ids[len(prefix) :] for ids in encoded]
        width = max(len(ids) for ids in encoded)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded])
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded])
        inputs = {}
        if use_prefix:
            rows = len(prompts)
            input_ids = torch.cat([torch.tensor([prefix]).expand(rows, -1), input_ids], dim=1)
            mask = torch.cat([torch.ones(rows, len(prefix), dtype=mask.dtype), mask], dim=1)
            cache = copy.deepcopy(self.prefix_cache)
            if rows > 1:
                cache.batch_repeat_interleave(rows)
            inputs[CACHE_KWARG] = cache
        inputs.update(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device))
        return inputs

    def batched_generate(
        self, prompts: list[str], max_new_tokens: int | None = None, constraints: list | None = None
    ) -> list[Generation]:
        """Generate for all `prompts` in one left-padded batch with its attention mask.

        `constraints[i]`, where given, limits row i's tokens (greedy or sampled within them; not with beams).
        """
        _sync(self.device)
        start = time.perf_counter()
        inputs = self._inputs(prompts)
        prompt_len = inputs["input_ids"].shape[1]
        stop = StopAtText(self.tokenizer, self.cfg.stop_string or None, self.eos_ids, prompt_len)
        kwargs = self._generate_kwargs(max_new_tokens)
        if self.cfg.num_beams == 1:
            kwargs["stopping_criteria"] = StoppingCriteriaList([stop])
            if constraints and any(c is not None for c in constraints):
                allowed = AllowedTokens(constraints, prompt_len, self.eos_ids[0])
                kwargs["logits_processor"] = LogitsProcessorList([allowed])
        elif self.cfg.stop_string:  # beam search reorders rows: let transformers track the stop text
            kwargs.update(stop_strings=[self.cfg.stop_string], tokenizer=self.tokenizer)
        output = self.model.generate(**inputs, **kwargs)
        _sync(self.device)
        latency_s = time.perf_counter() - start
        first_token_s = stop.first_token_at - start if stop.first_token_at else float("nan")
        generated = output[:, prompt_len:].cpu()
        results = []
        for row, tokens in enumerate(generated):
            count = stop.finished_at.get(row) or _length_to_eos(tokens, self.eos_ids)
            hit_budget = count is None  # neither the stop text nor EOS: cut by the token budget
            count = count or len(tokens)
            text = self.tokenizer.decode(tokens[:count], skip_special_tokens=True)
            ids = tokens[:count].tolist()
            results.append(Generation(text, count, latency_s, first_token_s, hit_budget, token_ids=ids))
        return results

    def generate(self, prompt: str, max_new_tokens: int | None = None, constraint=None) -> Generation:
        """Generate for one prompt (within `constraint`'s allowed tokens where given)."""
        return self.batched_generate([prompt], max_new_tokens, [constraint] if constraint is not None else None)[0]
