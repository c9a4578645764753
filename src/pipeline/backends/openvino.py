"""OpenVINO GenAI as a peer backend: the model exported once to a stateful int8 OpenVINO IR, run by GenAI's
continuous-batching pipeline with prefix caching, greedy, the tool form constrained by its structured output.

Set up as OpenVINO GenAI's docs recommend for an LLM on a CPU (openvino.genai docs: guides/model-preparation,
guides/structured-output, concepts/optimization-techniques/prefix-caching): an int8 weight-compressed stateful
IR (`optimum-cli export openvino --weight-format int8` makes the same: NNCF's INT8_ASYM weight compression, KV
cache as model state with a `beam_idx` input), the tokenizer converted by openvino-tokenizers, and a
`ContinuousBatchingPipeline` on "CPU" with `enable_prefix_caching=True`, the plugin's defaults otherwise (bf16
inference where the CPU has it, u8 KV cache). optimum-intel itself pins transformers below 5.6 and would
downgrade this project's, so the export here builds the same IR without it: a plain torch Llama forward over
the cached safetensors (explicit KV inputs and outputs, torch's SDPA), `openvino.convert_model`, then the
stateful transformation and `nncf.compress_weights`, as optimum-intel's exporter does.

Per-prompt constraints go to GenAI's structured output as an EBNF grammar of the texts the constraint allows
(every path, decoded): the question's own forms (`prompt.pin_source=true`, a few texts) compile in milliseconds.
The default lexicon grammar (any spelling of a 1700-atom unit lexicon) compiled in 189 s for one question here
(xgrammar builds token masks per grammar, and every question's grammar differs by its number), so with it the
form is decoded freely and a warning says so. GenAI's grammar constrains text, not token ids: it may write an
allowed text through other tokens than the tokenizer's own ("min" as " " + "min"), which our constraint never does.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from pipeline.backends import BackendInfo, ignored_settings
from pipeline.backends.ctranslate2 import cut_at_stop, fp32_loss_model, require, source_folder, stop_ids
from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.results import Generation

INSTALL_HINT = (
    'pip install -e ".[peers]" (or pip install openvino==2026.4.1 openvino-genai==2026.4.1.0 '
    "openvino-tokenizers==2026.4.1.0 nncf==3.4.0)"
)
EXPORT_VERSION = 1  # bump when the exported graph changes: a new cache folder
LOGPROB_ROWS = 4  # sequences per IR call in next_token_logprobs(batched=True): logits are [rows, length, vocab]
MAX_PATHS = 256  # a constraint with more texts than this is applied as free decoding (a warning says so)

IGNORED = [
    ("precision.name", "auto", "it computes with int8-compressed weights and the CPU plugin's inference precision"),
    ("precision.activations", "auto", "the CPU plugin picks its activation precision"),
    ("precision.prefix_attention", "auto", "it runs its own attention"),
    ("attention.implementation", "sdpa", "it uses its own paged attention"),
    ("runtime.compile", "off", "the CPU plugin compiles the IR itself"),
    ("generation.cache_implementation", "dynamic", "it keeps its own paged KV cache"),
]


MODULES = ("openvino", "openvino_genai", "openvino_tokenizers", "nncf")


def available() -> bool:
    """True when OpenVINO GenAI and what the export needs are installed."""
    import importlib.util

    return all(importlib.util.find_spec(module) is not None for module in MODULES)


# ---------------------------------------------------------------------------------------------- export


def _decoder(model):
    """A torch module computing `model` (a Llama) with explicit KV inputs and outputs, as optimum exports it."""
    import torch

    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise PipelineError(f"backend=openvino exports plain RoPE only; this model has {rope.get('rope_type')}")
    theta = rope.get("rope_theta") or getattr(config, "rope_theta", 10000.0)
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    inner, eps = model.model, config.rms_norm_eps

    def norm(x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def rotate(x, cos, sin):
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    def repeat_kv(x):  # transformers' repeat_kv: the pattern OpenVINO's paged-attention pass recognises
        batch, _, length, dim = x.shape
        n_rep = heads // kv_heads
        return x[:, :, None, :, :].expand(batch, kv_heads, n_rep, length, dim).reshape(batch, heads, length, dim)

    class Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model  # a submodule, so tracing sees its weights as parameters

        def forward(self, input_ids, attention_mask, position_ids, *past):
            batch, length = input_ids.shape
            x = inner.embed_tokens(input_ids)
            freqs = position_ids[:, :, None].float() * inv_freq
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos()[:, None], emb.sin()[:, None]
            # causal and padding mask over past + current keys; a fully masked row stays finite (no NaN)
            key_index = torch.cumsum(torch.ones_like(attention_mask), -1) - 1
            query_index = key_index[:, -length:]
            allowed = (key_index[:, None, None, :] <= query_index[:, None, :, None]) & (
                attention_mask[:, None, None, :] > 0
            )
            bias = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)
            present = []
            for i, layer in enumerate(inner.layers):
                attn, mlp = layer.self_attn, layer.mlp
                h = norm(x, layer.input_layernorm.weight)
                q = attn.q_proj(h).view(batch, length, heads, head_dim).transpose(1, 2)
                k = attn.k_proj(h).view(batch, length, kv_heads, head_dim).transpose(1, 2)
                v = attn.v_proj(h).view(batch, length, kv_heads, head_dim).transpose(1, 2)
                q, k = rotate(q, cos, sin), rotate(k, cos, sin)
                k = torch.cat((past[2 * i], k), dim=2)
                v = torch.cat((past[2 * i + 1], v), dim=2)
                present += [k, v]
                out = torch.nn.functional.scaled_dot_product_attention(q, repeat_kv(k), repeat_kv(v), attn_mask=bias)
                x = x + attn.o_proj(out.transpose(1, 2).reshape(batch, length, heads * head_dim))
                h = norm(x, layer.post_attention_layernorm.weight)
                x = x + mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(h)) * mlp.up_proj(h))
            logits = model.lm_head(norm(x, inner.norm.weight))
            return (logits, *present)

    model.requires_grad_(False)
    return Decoder().eval(), kv_heads, head_dim


def _make_stateful(ov_model, layers: int) -> None:
    """KV inputs and outputs become model state, reordered by a `beam_idx` input, as optimum-intel does."""
    import numpy as np
    import openvino as ov
    from openvino import opset13
    from openvino._offline_transformations import apply_make_stateful_transformation

    names = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    batch = ov_model.input("input_ids").get_partial_shape()[0]
    beam_idx = opset13.parameter(name="beam_idx", dtype=ov.Type.i32, shape=ov.PartialShape([batch]))
    beam_idx.output(0).get_tensor().add_names({"beam_idx"})
    ov_model.add_parameters([beam_idx])
    for name in names:
        port = ov_model.input(name)
        consumers = port.get_target_inputs()
        gather = opset13.gather(port, beam_idx, opset13.constant(0))
        for consumer in consumers:
            consumer.replace_source_output(gather.output(0))
    ov_model.validate_nodes_and_infer_types()
    apply_make_stateful_transformation(ov_model, {name: name.replace("past_key_values", "present") for name in names})
    # each state starts as zeros of [batch, kv_heads, 0, head_dim], the batch taken from input_ids
    input_ids = ov_model.input("input_ids")
    rows = opset13.gather(opset13.shape_of(input_ids, output_type="i64"), opset13.constant([0]), opset13.constant(0))
    for op in ov_model.get_ops():
        if op.get_type_name() == "ReadValue":
            dims = [dim.min_length for dim in list(op.get_output_partial_shape(0))]
            parts = [rows] + [opset13.constant(np.array([d], dtype=np.int64)) for d in dims[1:]]
            zeros = opset13.broadcast(
                opset13.constant(0.0, dtype=op.get_output_element_type(0)), opset13.concat(parts, 0)
            )
            op.set_arguments([zeros])
    ov_model.validate_nodes_and_infer_types()


def export(folder: Path, tokenizer_folder: Path, target: Path, log: Callable[[str], None]) -> None:
    """Write the int8 stateful IR, the OpenVINO tokenizer and detokenizer, and the model's configs into `target`."""
    import nncf
    import openvino as ov
    import torch
    from openvino_tokenizers import convert_tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    if model.config.model_type != "llama":
        raise PipelineError(
            f"backend=openvino exports Llama-architecture models; this one is {model.config.model_type}"
        )
    decoder, kv_heads, head_dim = _decoder(model)
    layers = model.config.num_hidden_layers
    past = [torch.zeros(1, kv_heads, 3, head_dim) for _ in range(2 * layers)]
    example = (torch.ones(1, 2, dtype=torch.int64), torch.ones(1, 5, dtype=torch.int64), torch.tensor([[3, 4]]), *past)
    log("exporting the OpenVINO IR (once): trace, stateful KV cache, int8 weights")
    with torch.no_grad():
        ov_model = ov.convert_model(decoder, example_input=example)
    names = ["input_ids", "attention_mask", "position_ids"]
    names += [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    for port, name in zip(ov_model.inputs, names):
        port.get_tensor().set_names({name})
    outputs = ["logits"] + [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    for port, name in zip(ov_model.outputs, outputs):
        port.get_tensor().set_names({name})
    for port in ov_model.inputs:  # any batch, any length
        rank = port.get_partial_shape().rank.get_length()
        shape = [-1, -1] if rank == 2 else [-1, kv_heads, -1, head_dim]
        port.get_node().set_partial_shape(ov.PartialShape(shape))
    ov_model.validate_nodes_and_infer_types()
    _make_stateful(ov_model, layers)
    ov_model = nncf.compress_weights(ov_model)  # INT8_ASYM, optimum-cli's --weight-format int8
    ov.save_model(ov_model, target / "openvino_model.xml")
    hf_tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder))
    tokenizer, detokenizer = convert_tokenizer(hf_tokenizer, with_detokenizer=True)
    ov.save_model(tokenizer, target / "openvino_tokenizer.xml")
    ov.save_model(detokenizer, target / "openvino_detokenizer.xml")
    hf_tokenizer.save_pretrained(str(target))
    for name in ("config.json", "generation_config.json"):
        if (folder / name).is_file():
            shutil.copy(folder / name, target / name)


# ---------------------------------------------------------------------------------------------- constraint


def constraint_grammar(constraint, tokenizer, limit: int = MAX_PATHS) -> str | None:
    """An EBNF grammar (GenAI's structured output) whose language is exactly the texts `constraint` allows, or
    None when they are not a finite set of at most `limit` texts."""
    texts = _enumerate(constraint, tokenizer, limit)
    return None if texts is None else "root ::= " + " | ".join(json.dumps(t, ensure_ascii=False) for t in texts)


def _enumerate(constraint, tokenizer, limit: int) -> list[str] | None:
    """Every text the constraint allows (the decoded token paths to an empty `allowed`), or None when it is not a
    finite set of at most `limit` texts."""
    texts: list[str] = []
    stack: list[list[int]] = [[]]
    while stack:
        path = stack.pop()
        # constraints follow one growing sequence (FormConstraint keeps its last node): a shorter query starts
        # them over, so each path is asked from the empty start
        constraint.allowed([])
        allowed = constraint.allowed(path)
        if allowed is None:
            return None
        if not allowed:
            texts.append(tokenizer.decode(path))
            if len(texts) > limit:
                return None
            continue
        stack.extend(path + [int(token)] for token in allowed)
    constraint.allowed([])
    return sorted(set(texts))


# ---------------------------------------------------------------------------------------------- the backend


class OpenVINOBackend:
    """`generate` and `batched_generate` on OpenVINO GenAI's ContinuousBatchingPipeline, greedy, prefix-cached."""

    def __init__(self, cfg: Config, log: Callable[[str], None] = print):
        for module in MODULES:
            require("openvino", module, INSTALL_HINT)
        gen = cfg.generation
        if gen.do_sample or gen.num_beams != 1:
            raise PipelineError(
                "backend=openvino runs greedy decoding here; set generation.do_sample=false num_beams=1"
            )
        import openvino as ov
        import openvino_genai as genai
        from transformers import AutoTokenizer

        from pipeline.engine import StopTokens
        from pipeline.models import _atomic_save

        start = time.perf_counter()
        folder, tokenizer_folder = source_folder(cfg, "openvino")
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder))
        target = folder.parent / f"openvino-{ov.__version__.split('-')[0]}-int8-v{EXPORT_VERSION}"
        if not (target / "openvino_model.xml").is_file():
            _atomic_save(target, lambda tmp: export(folder, tokenizer_folder, Path(tmp), log))
        threads = cfg.runtime.num_threads or os.cpu_count() or 1
        self.slots = max(1, cfg.stages.micro_batch_size)
        scheduler = genai.SchedulerConfig()
        scheduler.enable_prefix_caching = True  # the docs' advice for prompts that share a prefix
        scheduler.cache_size = 1  # GB of KV blocks: SmolLM2-135M needs a few MB per prompt
        scheduler.max_num_seqs = self.slots
        properties = {"INFERENCE_NUM_THREADS": threads}
        log(f"loading {target.name} with OpenVINO GenAI {genai.__version__.split('-')[0]} (CPU, {threads} threads)")
        self.pipeline = genai.ContinuousBatchingPipeline(str(target), scheduler, "CPU", properties)
        self.genai, self.ov, self.target, self.properties = genai, ov, target, properties
        self.cfg, self.model_cfg = gen, cfg.model
        self.eos = self.tokenizer.eos_token_id
        self.end_ids = stop_ids(self.tokenizer, gen.stop_string, self.eos)
        self.stopper = StopTokens(self.tokenizer, gen.stop_string, [self.eos])
        self.use_prefix = gen.prefix_cache
        self.prefix_ids: list[int] = []
        self.warnings = ignored_settings(cfg, IGNORED, "openvino")
        if not gen.prefix_cache:
            self.warnings.append(
                "backend=openvino ignores generation.prefix_cache=False (its prefix caching stays on, as its docs "
                "advise)"
            )
        # the lexicon grammar is far too large for a per-request grammar (see the module's docstring)
        lexicon = cfg.prompt.style == "tool" and cfg.prompt.constrained and not cfg.prompt.pin_source
        self.applies_constraints = not lexicon  # for the runner too: whether its stages decode constrained
        if not self.applies_constraints:
            self.warnings.append(
                "backend=openvino ignores prompt.constrained=True with the lexicon grammar (GenAI compiles each "
                "question's grammar for minutes): the tool form is decoded freely, then grounded and checked; "
                "prompt.pin_source=true constrains it to the question's own forms"
            )
        self._request = None  # the IR compiled for next_token_logprobs, on first use
        self.free_constraints, self._log = 0, log  # constraints it could not express, decoded freely
        self._loss_model = None
        self._info = BackendInfo(
            name="openvino",
            dtype=self.ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name(),
            weight_format="int8",
            weight_bytes=(target / "openvino_model.bin").stat().st_size,
            device="cpu",
            attention="openvino paged attention",
            source=str(target),
            load_time_s=time.perf_counter() - start,
            tags={"openvino_genai": genai.__version__.split("-")[0], "openvino_prefix_caching": "on"},
        )

    def info(self) -> BackendInfo:
        """The CPU plugin's inference precision; int8 weights; the IR's weight file as the bytes read per token."""
        return self._info

    def encode(self, prompt: str) -> list[int]:
        """The prompt's ids by the model's tokenizer (GenAI takes them as they are)."""
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def prompt_lengths(self, prompts: list[str]) -> list[int]:
        """Token length of each prompt."""
        return [len(self.encode(p)) for p in prompts]

    def set_shared_prefix(self, prompts: list[str]) -> float:
        """One short generation puts the shared prefix's KV blocks in GenAI's prefix cache; later prompts reuse them."""
        from pipeline.prefix import MIN_PREFIX_TOKENS, shared_prefix_length

        self.prefix_ids = []
        if not prompts:
            return 0.0
        encoded = [self.encode(p) for p in prompts]
        length = shared_prefix_length(encoded)
        if length < MIN_PREFIX_TOKENS:
            return 0.0
        start = time.perf_counter()
        self._run([encoded[0]], 1, [None])
        self.prefix_ids = encoded[0][:length]
        return time.perf_counter() - start

    def _config(self, budget: int, constraint):
        config = self.genai.GenerationConfig()
        config.max_new_tokens = budget
        config.do_sample = False
        config.stop_token_ids = set(self.end_ids)
        config.eos_token_id = self.eos
        if constraint is not None and self.applies_constraints:
            grammar = constraint_grammar(constraint, self.tokenizer)
            if grammar is None:
                if not self.free_constraints:
                    self._log(f"warning: backend=openvino decodes a constraint of more than {MAX_PATHS} texts freely")
                self.free_constraints += 1
            else:
                config.structured_output_config = self.genai.StructuredOutputConfig(grammar=grammar)
        return config

    def _run(self, encoded: list[list[int]], budget: int, constraints: list) -> list[list[int]]:
        import numpy as np

        inputs = [self.ov.Tensor(np.asarray([ids], dtype=np.int64)) for ids in encoded]
        configs = [self._config(budget, c) for c in constraints]
        results = self.pipeline.generate(inputs, configs)
        return [list(result.m_generation_ids[0]) for result in results]

    def batched_generate(
        self, prompts: list[str], max_new_tokens: int | None = None, constraints=None
    ) -> list[Generation]:
        """All `prompts` as requests of one continuous-batching call; `constraints[i]` becomes request i's grammar."""
        budget = max_new_tokens or self.cfg.max_new_tokens
        start = time.perf_counter()
        outputs = self._run([self.encode(p) for p in prompts], budget, constraints or [None] * len(prompts))
        latency_s = time.perf_counter() - start
        generations = []
        for generated in outputs:
            generated, stopped = cut_at_stop(generated, self.stopper)  # GenAI includes the stop token it stopped at
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            generations.append(Generation(text, len(generated), latency_s, float("nan"), not stopped, generated))
        return generations

    def generate(self, prompt: str, max_new_tokens: int | None = None, constraint=None) -> Generation:
        """Greedy generation for one prompt (within `constraint`'s texts where given)."""
        return self.batched_generate([prompt], max_new_tokens, [constraint])[0]

    def next_token_logprobs(self, prompts: list[list[int]], continuations: list[list[int]], batched: bool) -> Iterator:
        """Log-softmax of the exported IR's logits (the same int8 weights, compiled by the CPU plugin with GenAI's
        properties; GenAI's own API returns no full distributions) along each prompt + continuation, all positions
        in one call; `batched`: up to LOGPROB_ROWS sequences per call, left-padded with a mask."""
        import numpy as np
        import torch

        if self._request is None:
            compiled = self.ov.Core().compile_model(str(self.target / "openvino_model.xml"), "CPU", self.properties)
            self._request = compiled.create_infer_request()
        rows = LOGPROB_ROWS if batched else 1
        for begin in range(0, len(prompts), rows):
            group = [
                list(p) + list(c) for p, c in zip(prompts[begin : begin + rows], continuations[begin : begin + rows])
            ]
            width = max(len(s) for s in group)
            ids = np.zeros((len(group), width), dtype=np.int64)
            mask = np.zeros_like(ids)
            for row, sequence in enumerate(group):
                ids[row, width - len(sequence) :], mask[row, width - len(sequence) :] = sequence, 1
            positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
            self._request.reset_state()
            self._request.infer(
                {
                    "input_ids": ids,
                    "attention_mask": mask,
                    "position_ids": positions,
                    "beam_idx": np.arange(len(group), dtype=np.int32),
                }
            )
            logits = torch.from_numpy(np.array(self._request.get_tensor("logits").data, dtype=np.float32))
            for row, (_prompt, continuation) in enumerate(
                zip(prompts[begin : begin + rows], continuations[begin : begin + rows])
            ):
                first = width - len(continuation) - 1
                yield torch.log_softmax(logits[row, first : first + len(continuation)], dim=-1)

    def loss_model(self):
        """OpenVINO has no torch model: the transformers fp32 model of the same weights."""
        return fp32_loss_model(self, "OpenVINO")
