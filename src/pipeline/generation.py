"""Greedy (or sampled) generation with Hugging Face `generate`, single and batched, stopping at the answer tag."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from pipeline.config import GenerationConfig


@dataclass
class Generation:
    text: str
    num_tokens: int  # generated tokens, up to and including the stop token, no padding
    latency_s: float  # wall time of the call that produced it


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

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        length = input_ids.shape[1] - self.prompt_len
        last = input_ids[:, -1].cpu()
        done = torch.isin(last, self.eos)
        if self.candidates is not None:
            for row in torch.nonzero(self.candidates[last.clamp(max=len(self.candidates) - 1)]).flatten().tolist():
                tail = self.tokenizer.decode(input_ids[row, max(self.prompt_len, input_ids.shape[1] - 8) :])
                if self.stop in tail:
                    done[row] = True
        for row in torch.nonzero(done).flatten().tolist():
            self.finished_at.setdefault(row, length)
        return done.to(input_ids.device)


_CANDIDATE_CACHE: dict[tuple[int, str], torch.Tensor] = {}


def _tokens_containing(tokenizer, char: str) -> torch.Tensor:
    """Boolean mask over the vocabulary: tokens whose decoded text contains `char`."""
    key = (id(tokenizer), char)
    if key not in _CANDIDATE_CACHE:
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        _CANDIDATE_CACHE[key] = torch.tensor([char in text for text in texts])
    return _CANDIDATE_CACHE[key]


def _length_to_eos(tokens: torch.Tensor, eos_ids: list[int]) -> int:
    hits = torch.nonzero(torch.isin(tokens, torch.tensor(eos_ids))).flatten()
    return int(hits[0]) + 1 if len(hits) else len(tokens)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Generator:
    """Wraps a model and tokenizer with the course API: `generate(prompt)` and `batched_generate(prompts)`."""

    def __init__(self, model, tokenizer, cfg: GenerationConfig):
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.device = next(model.parameters()).device
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
        if cfg.do_sample:
            kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
        else:  # keep the model's sampling defaults from reaching greedy decoding
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs

    def batched_generate(self, prompts: list[str], max_new_tokens: int | None = None) -> list[Generation]:
        """Generate for all `prompts` in one left-padded batch with its attention mask."""
        inputs = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        prompt_len = inputs["input_ids"].shape[1]
        stop = StopAtText(self.tokenizer, self.cfg.stop_string or None, self.eos_ids, prompt_len)
        kwargs = self._generate_kwargs(max_new_tokens)
        if self.cfg.num_beams == 1:
            kwargs["stopping_criteria"] = StoppingCriteriaList([stop])
        elif self.cfg.stop_string:  # beam search reorders rows: let transformers track the stop text
            kwargs.update(stop_strings=[self.cfg.stop_string], tokenizer=self.tokenizer)
        _sync(self.device)
        start = time.perf_counter()
        output = self.model.generate(**inputs, **kwargs)
        _sync(self.device)
        latency_s = time.perf_counter() - start
        generated = output[:, prompt_len:].cpu()
        results = []
        for row, tokens in enumerate(generated):
            count = stop.finished_at.get(row) or _length_to_eos(tokens, self.eos_ids)
            text = self.tokenizer.decode(tokens[:count], skip_special_tokens=True)
            results.append(Generation(text, count, latency_s))
        return results

    def generate(self, prompt: str, max_new_tokens: int | None = None) -> Generation:
        """Generate for one prompt."""
        return self.batched_generate([prompt], max_new_tokens)[0]
