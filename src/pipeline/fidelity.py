"""Fidelity: what a knob costs in the model's own next-token distributions, measured against fp32.

Accuracy cannot see a knob's cost where a constraint or an easy question decides the answer; the
distributions can. Along each stage's own sequences (the run's prompt and generated tokens), the run's
decoding path (its backend, weight format, activations, kernels, batching) and the reference (the fp32
transformers model of the same weights) are both teacher-forced, and compared per generated token as
llama.cpp's `perplexity --kl-divergence` does: KL(reference || run) with its mean and standard error, the
99% and 99.9% quantiles and the maximum, and top-1 agreement ("same top p": both put the same token first).
fp32 against itself gives a KLD of about 1e-9 and top-1 of 1; a broken kernel gives neither.

The reference computes the prefix every sequence shares once, then the rest in right-padded chunks (pads
after a sequence cannot change its causal logits), and applies the lm_head only where a distribution is
needed, so 32 questions cost seconds and memory stays bounded by the chunk.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

CHUNK = 8  # sequences per reference forward pass
REFERENCE = "transformers fp32 (sdpa), same weights"


@dataclass
class Fidelity:
    kld_mean: float
    kld_stderr: float
    kld_p99: float
    kld_p999: float
    kld_max: float
    top1_agreement: float
    tokens: int
    reference: str = REFERENCE

    def line(self) -> str:
        """One line for the log: mean KLD with its error, its tail, top-1 agreement."""
        return (
            f"KLD {self.kld_mean:.3g} ± {self.kld_stderr:.2g} (99% {self.kld_p99:.3g}, 99.9% {self.kld_p999:.3g}, "
            f"max {self.kld_max:.3g}), top-1 agreement {self.top1_agreement:.4f} over {self.tokens} tokens "
            f"against {self.reference}"
        )


def kl_and_top1(reference: torch.Tensor, candidate: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per position: KL(reference || candidate) of two [T, vocab] log-softmax tensors, and whether the argmax agree."""
    reference, candidate = reference.float(), candidate.float()
    kld = (reference.exp() * (reference - candidate)).sum(dim=-1).clamp(min=0)  # rounding can dip below 0
    same = reference.argmax(dim=-1) == candidate.argmax(dim=-1)
    return kld.numpy(), same.numpy()


def summarize(klds: np.ndarray, same: np.ndarray, reference: str = REFERENCE) -> Fidelity:
    """The statistics of per-token KL divergences and top-1 agreements."""
    n = len(klds)
    if n == 0:
        nan = math.nan
        return Fidelity(nan, nan, nan, nan, nan, nan, 0, reference)
    stderr = float(np.std(klds, ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return Fidelity(
        kld_mean=float(np.mean(klds)),
        kld_stderr=stderr,
        kld_p99=float(np.percentile(klds, 99)),
        kld_p999=float(np.percentile(klds, 99.9)),
        kld_max=float(np.max(klds)),
        top1_agreement=float(np.mean(same)),
        tokens=n,
        reference=reference,
    )


def compare(reference: Iterable[torch.Tensor], candidate: Iterable[torch.Tensor], description: str = REFERENCE):
    """Fidelity of the candidate's distributions, sequence by sequence, against the reference's (same order)."""
    klds, agreements = [], []
    for ref, cand in zip(reference, candidate, strict=True):
        if len(ref) == 0:
            continue
        if ref.shape != cand.shape:
            raise ValueError(f"fidelity: reference {tuple(ref.shape)} and candidate {tuple(cand.shape)} differ")
        kld, same = kl_and_top1(ref, cand)
        klds.append(kld)
        agreements.append(same)
    if not klds:
        return summarize(np.array([]), np.array([]), description)
    return summarize(np.concatenate(klds), np.concatenate(agreements), description)


def _common_prefix(sequences: list[list[int]], limit: int) -> int:
    length = 0
    while length < limit and all(s[length] == sequences[0][length] for s in sequences):
        length += 1
    return length


def teacher_forced(
    model, prompts: list[list[int]], continuations: list[list[int]], chunk: int = CHUNK
) -> Iterator[torch.Tensor]:
    """A transformers model's log-softmax next-token distributions along each prompt + continuation.

    Yields, in order, [len(continuation), vocab] float32 tensors: row t is the distribution after
    prompt + continuation[:t]. The prefix all sequences share is computed once.
    """
    import inspect

    from transformers import DynamicCache

    device = next(model.parameters()).device
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    # transformers 5.x renames the forward's `past_key_values` to `cache`: pass what this version takes
    cache_kwarg = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
    sequences = [list(p) + list(c[:-1]) for p, c in zip(prompts, continuations)]
    nonempty = [s for s, c in zip(sequences, continuations) if c]
    width = _common_prefix(nonempty, min(len(p) for p, c in zip(prompts, continuations) if c) - 1) if nonempty else 0
    prefix_cache = None
    with torch.inference_mode():
        if width:
            prefix_cache = DynamicCache(config=model.config)
            decoder(input_ids=torch.tensor([nonempty[0][:width]], device=device), **{cache_kwarg: prefix_cache})
        for begin in range(0, len(sequences), chunk):
            rows = list(range(begin, min(begin + chunk, len(sequences))))
            live = [i for i in rows if continuations[i]]
            results: dict[int, torch.Tensor] = {}
            if live:
                suffixes = [sequences[i][width:] for i in live]
                longest = max(len(s) for s in suffixes)
                ids = torch.tensor([s + [0] * (longest - len(s)) for s in suffixes], device=device)
                cache = None
                if prefix_cache is not None:
                    cache = copy.deepcopy(prefix_cache)
                    if len(live) > 1:
                        cache.batch_repeat_interleave(len(live))
                hidden = decoder(input_ids=ids, use_cache=cache is not None, **{cache_kwarg: cache}).last_hidden_state
                for row, i in enumerate(live):
                    first = len(prompts[i]) - 1 - width
                    wanted = hidden[row, first : first + len(continuations[i])]
                    results[i] = torch.log_softmax(head(wanted).float(), dim=-1).cpu()
            for i in rows:
                yield results.get(i, torch.empty(0))


def is_reference(model) -> bool:
    """Whether a transformers model is the reference itself: fp32, sdpa attention, no quantized layers."""
    from pipeline.quantize import WeightOnlyInt8Linear

    if next(model.parameters()).dtype != torch.float32:
        return False
    if getattr(model.config, "_attn_implementation", "sdpa") != "sdpa":
        return False
    return not any(isinstance(m, WeightOnlyInt8Linear) for m in model.modules())


class Reference:
    """The fp32 reference model's distributions, computed once per sequence and kept for the run's other stage."""

    def __init__(self, model, description: str = REFERENCE, keep: int = 64):
        self.model, self.description, self.keep = model, description, keep
        self._cache: dict[tuple[tuple[int, ...], tuple[int, ...]], torch.Tensor] = {}

    def logprobs(self, prompts: list[list[int]], continuations: list[list[int]]) -> Iterator[torch.Tensor]:
        """`teacher_forced` on the reference, reusing sequences seen before (a stage's outputs usually equal the
        other stage's); at most `keep` sequences are kept."""
        keys = [(tuple(p), tuple(c)) for p, c in zip(prompts, continuations)]
        missing = list(dict.fromkeys(key for key in keys if key not in self._cache))
        fresh = zip(missing, teacher_forced(self.model, [list(p) for p, _ in missing], [list(c) for _, c in missing]))
        pending: dict[tuple, torch.Tensor] = {}
        for key in keys:
            while key not in self._cache and key not in pending:
                done, value = next(fresh)
                if len(self._cache) < self.keep:
                    self._cache[done] = value
                else:
                    pending[done] = value
            yield self._cache[key] if key in self._cache else pending[key]
