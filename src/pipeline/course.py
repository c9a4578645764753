"""A drop-in for the course's `BaseLLM`, on any backend of this project, scored by the course's own grader.

    from pipeline.course import BaseLLM

    class MyLLM(BaseLLM):  # as a homework would
        ...

    llm = MyLLM()  # conf/ defaults plus $PIPELINE_OVERRIDES, e.g. "backend=transformers precision=fp32"
    llm.generate("How many grams are in 6 kg?")  # '6 kg -> grams <answer>6000</answer>'

The constructor loads the model and warms it up, since the course counts both in a case's time.
`generate` and `batched_generate` take questions and return the text this project scores (the prompt
strategy's output with its `<answer>` tag); `.model` and `.tokenizer` are what the course computes its
loss with (`pipeline.grader`): the backend's own torch model, or the fp32 transformers model of the same
weights for a backend without one (llama.cpp).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import time

import torch

from pipeline.backends import load_backend
from pipeline.config import CONF_DIR_ENV, Config, conf_dir, load_config
from pipeline.data import load_items, select
from pipeline.errors import PipelineError
from pipeline.models import resolve_device
from pipeline.prompts import build_prompt
from pipeline.runner import _set_runtime, make_constraint_for, make_postprocess, prepare_backend
from pipeline.scoring import parse_answer

OVERRIDES_ENV = "PIPELINE_OVERRIDES"  # Hydra overrides, space separated, as on run.py's command line
__all__ = ["CONF_DIR_ENV", "OVERRIDES_ENV", "BaseLLM", "compose_config", "conf_dir"]
log = logging.getLogger(__name__)


def compose_config(overrides: list[str] | None = None) -> Config:
    """The config run.py would build from conf/: `overrides`, then those in $PIPELINE_OVERRIDES (which win)."""
    all_overrides = [*(overrides or []), *shlex.split(os.environ.get(OVERRIDES_ENV, ""))]
    try:
        return load_config(all_overrides, conf_dir())
    except PipelineError as err:
        raise PipelineError(f"{err}; fix {OVERRIDES_ENV} or the overrides passed to BaseLLM") from None


class BaseLLM:
    """The course's model object: `generate`, `batched_generate`, `answer`, `.model`, `.tokenizer`.

    Subclass it as a homework would (override `format_prompt` or `parse_answer`, or pass overrides to
    `super().__init__`); `$PIPELINE_OVERRIDES` is applied after the overrides given here.
    """

    def __init__(self, overrides: list[str] | None = None):
        start = time.perf_counter()
        self.cfg = compose_config(overrides)
        _set_runtime(self.cfg, resolve_device(self.cfg.runtime.device))
        self.backend, self.warnings = load_backend(self.cfg, log.info)
        for message in self.warnings:
            log.warning(message)
        self.tokenizer = self.backend.tokenizer
        self._postprocess = make_postprocess(self.cfg.prompt)
        # constrained decoding of the tool form, as in run.py's stages (None: the prompt decodes freely)
        self._constraint_for = make_constraint_for(self.cfg.prompt, self.tokenizer)
        # the warm-up runs on the data set's questions (outputs thrown away), as run.py's does
        items, _ = select(load_items(self.cfg.dataset.path), self.cfg.dataset.num_questions)
        with self._grad_context():
            prompts = [self.format_prompt(item.question) for item in items]
            self.prefix_time_s, self.warmup_time_s = prepare_backend(self.backend, prompts, self.cfg, log.info)
            if self._constraint_for is not None and items:
                self._constraint_for(items[0].question)  # loads the unit lexicon now, not in the first call
        self.load_time_s = self.backend.info().load_time_s
        self.construction_time_s = time.perf_counter() - start

    def _grad_context(self):
        return torch.inference_mode() if self.cfg.runtime.inference_mode else contextlib.nullcontext()

    @property
    def model(self):
        """The torch model the course computes its loss with (for llama.cpp loaded on first use, in fp32)."""
        return self.backend.loss_model()[0]

    @property
    def device(self) -> torch.device:
        """Where `.model` lives."""
        return next(self.model.parameters()).device

    def format_prompt(self, question: str) -> str:
        """The prompt for `question`, by the configured prompt strategy (`prompt=`)."""
        return build_prompt(question, self.cfg.prompt, self.tokenizer)

    def parse_answer(self, text: str) -> float:
        """The number inside the first <answer>...</answer> of `text`; NaN when there is none."""
        return parse_answer(text)

    def _constraint(self, question: str):
        return self._constraint_for(question) if self._constraint_for is not None else None

    def generate(self, question: str) -> str:
        """The scored text for one question: the model's output, post-processed, with its <answer> tag."""
        with self._grad_context():
            output = self.backend.generate(self.format_prompt(question), constraint=self._constraint(question))
        return self._postprocess(output.text, question)[0]

    def batched_generate(self, questions: list[str]) -> list[str]:
        """`generate` for many questions, in micro-batches of `stages.micro_batch_size`."""
        size = self.cfg.stages.micro_batch_size
        texts: list[str] = []
        with self._grad_context():
            for begin in range(0, len(questions), size):
                chunk = questions[begin : begin + size]
                prompts = [self.format_prompt(q) for q in chunk]
                outputs = self.backend.batched_generate(prompts, constraints=[self._constraint(q) for q in chunk])
                texts += [self._postprocess(o.text, q)[0] for o, q in zip(outputs, chunk)]
        return texts

    def answer(self, *questions: str) -> list[float]:
        """The parsed numeric answer to each question (NaN where the output holds none)."""
        return [self.parse_answer(text) for text in self.batched_generate(list(questions))]
