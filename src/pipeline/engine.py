"""A lean decode engine for Llama-architecture models, in the spirit of gpt-fast.

The hot path in plain sight:
- weights taken once from a transformers model: q/k/v and gate/up fused into one matrix each, stored
  transposed in fp32 for prefill (a GEMM, MKL is good at it) and in the decode format (fp32, or int8/int4
  groups of 32 read by our own kernels, `pipeline.kernels`) for decoding (a GEMV, bound by reading weights);
- a preallocated KV cache with one row ("slot") per sequence; the prompt prefix all prompts share is
  computed once and written into every slot;
- prefill of the new prompts' own tokens packed into one sequence (no padding), attention per prompt;
- `decode_one_token`: one step for all running rows; greedy choice (within a constraint's allowed tokens);
- stopping on token ids found once per stop text, with no text decoding per step;
- continuous batching: a row that stops frees its slot for the next waiting prompt, and running rows stay
  packed at the front of the cache so no step computes a finished row.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from pipeline.errors import PipelineError

# decode formats: how the weights read by each decoding step are stored
FORMATS = ("fp32", "q8", "q4")


class EngineUnsupported(PipelineError):
    """The model is one the engine cannot run (backend=auto then uses transformers)."""


@dataclass
class Sequence:
    """One prompt on its way through the engine."""

    index: int  # position in the caller's list
    suffix: list[int]  # prompt tokens not in the cache yet
    start: int  # cache position of the first of them (after the shared prefix, or 0 without it)
    budget: int  # max new tokens
    generated: list[int]
    position: int = 0  # next cache position to write
    done: bool = False
    hit_budget: bool = False
    constraint: Constraint | None = None
    pending: int = 1  # generated tokens not in the cache yet: the last one, or a forced run after it (jump-forward)


class Constraint(Protocol):
    """Limits which tokens a sequence may generate next (constrained decoding)."""

    def allowed(self, generated: list[int]) -> Seq[int] | None:
        """Token ids allowed after `generated` (an empty list ends the sequence; None lifts the limit)."""
        ...


class Linear:
    """y = x @ W.T for the engine: fp32 GEMM for many rows, the decode format's kernel for a few.

    `weight_t` is W.T in fp32 ([K, N]: x @ W_t reads rows in order), holding the decode format's own rounded
    values, so that q4 means q4 on every path; `packed` is the format's (pipeline.kernels). Without a kernel of
    ours the packed form is dropped and fp32 GEMM runs: the format's rounding without its speed, never a
    dequantization per call.
    """

    def __init__(
        self,
        weight_t: torch.Tensor,
        packed: tuple[torch.Tensor, ...],
        fmt: str,
        max_kernel_rows: int,
        gemm_dtype: torch.dtype = torch.float32,
        tiles: bool = False,
        gemm_plain: torch.Tensor | None = None,
    ):
        self.in_features, self.out_features = weight_t.shape
        self.fmt, self.max_kernel_rows = fmt, max_kernel_rows
        self.weight_t = weight_t
        self.packed = packed if packed and _fused_kernel_available() else ()
        # what the GEMM of many rows multiplies: the fp32 weights, or a bf16 copy where bf16 GEMM is native and
        # measured faster (precision.gemm); bf16 rounds them, and the run's fidelity says what that costs
        # (`gemm_plain`: the bf16 copy as a plain [N, K] matrix, cached by the backend: Engine.bf16_copies)
        self.gemm_t = weight_t if gemm_dtype == torch.float32 else bf16_gemm_weight(weight_t, gemm_plain)
        # q4 only: the weights as 16-row tiles for int8 products (kernels.q4_gemm_i8), which take the rows above
        # the kernel's limit up to `tile_rows` (set_tile_rows), activations in two int8 digits (`tile_split`,
        # 15 bits) or one (8 bits: lossy); empty where unused
        self.tiles = torch.empty(0, dtype=torch.uint8)
        self.tile_rows, self.tile_split = 0, True
        if tiles:
            from pipeline import kernels

            if fmt != "q4" or not self.packed or self.out_features % kernels.TILE_OUTPUTS:
                raise PipelineError(
                    f"int8 products of many rows multiply q4 weights in {kernels.TILE_OUTPUTS}-row tiles ({fmt} "
                    f"weights of {self.out_features} outputs here); choose precision.gemm=bf16 or fp32"
                )
            if not kernels.gemm_i8_available():
                raise PipelineError(
                    f"int8 products of many rows need an AVX512 build of our kernel ({kernels.describe()} runs "
                    "here); choose precision.gemm=bf16 or fp32"
                )
            self.tiles = kernels.q4_tiles(*self.packed)

    def __call__(self, x: torch.Tensor, int8_x: bool = False) -> torch.Tensor:
        if self.packed and x.shape[0] <= self.max_kernel_rows:
            from pipeline import kernels

            if self.fmt == "q4":
                return kernels.q4_linear(x, *self.packed, int8_x=int8_x)
            return kernels.q8_linear(x, *self.packed, int8_x=int8_x)
        if self.tiles.numel() and x.shape[0] <= self.tile_rows:
            from pipeline import kernels

            return kernels.q4_gemm_i8(x, self.tiles, self.tile_split)
        if self.gemm_t is not self.weight_t and x.shape[0] > 1:
            if self.gemm_t.is_mkldnn:
                return torch.ops.mkldnn._linear_pointwise(
                    x.to(torch.bfloat16), self.gemm_t, None, "none", [], ""
                ).float()
            return (x.to(self.gemm_t.dtype) @ self.gemm_t).float()
        return x @ self.weight_t

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """W[ids] ([len(ids), K] fp32): the rows of these outputs, with the same values as `weight_t[:, ids].T`.

        A constrained step scores only its allowed tokens. Gathering columns of `weight_t` touched one cache
        line per input per token; at most steps the matrix was cold. That cost 0.1-0.6 ms per choice and 12% of
        the single stage (avx512_bf16 EPYC). The packed rows lie in order, so they are gathered and unpacked
        by the same kernel that made `weight_t` (the same bits), which gathers them as it unpacks."""
        if self.packed:
            from pipeline import kernels

            unpack = kernels.unpack_q4 if self.fmt == "q4" else kernels.unpack_q8
            return unpack(*self.packed, rows=ids)
        return self.weight_t[:, ids].t()

    def decode_bytes(self) -> int:
        """Bytes of weights one decoding step reads."""
        if self.packed:
            return sum(t.numel() * t.element_size() for t in self.packed)
        return self.weight_t.numel() * self.weight_t.element_size()


def bf16_gemm_weight(weight_t: torch.Tensor, plain: torch.Tensor | None = None) -> torch.Tensor:
    """The bf16 GEMM's copy of W ([K, N] fp32 in): packed once in oneDNN's blocked layout ([N, K], as inductor
    packs frozen bf16 linears), else plain bf16 [K, N] where this torch has no oneDNN.

    at::mm on a plain bf16 matrix re-packs it inside every call: for the engine's steps of 8-32 rows that
    doubled the product's time (30 layers at 32 rows, 21 ms plain vs 13 ms packed, AVX512-BF16 EPYC).
    `plain`, where given, is `bf16_plain(weight_t)` from the cache: the rounding and the transpose, 0.27 s of
    SmolLM2's load, are then skipped, and only oneDNN's packing (0.1 s) is left.
    """
    if onednn_bf16():
        if plain is None or plain.shape != weight_t.shape[::-1] or plain.dtype != torch.bfloat16:
            plain = bf16_plain(weight_t)
        return torch.ops.mkldnn._reorder_linear_weight(plain, 32)
    return weight_t.to(torch.bfloat16)


def bf16_plain(weight_t: torch.Tensor) -> torch.Tensor:
    """W in bf16 as a plain [N, K] matrix: what oneDNN packs. Rounded before the transpose: half the bytes moved
    (0.29 -> 0.17 s at load for SmolLM2), the same bits."""
    return weight_t.to(torch.bfloat16).t().contiguous()


@functools.cache
def onednn_bf16() -> bool:
    """Whether oneDNN's packed bf16 linear runs on this CPU. PyTorch refuses it without AVX512 (BW, VL, DQ) or
    AVX-NE-CONVERT, which a forced CPU kind does not change: a simulated avx512_bf16 kind on an AVX2 machine
    takes the plain bf16 matrix (emulated, slow, correct). Checked by asking and by one tiny product."""
    mkldnn = torch.ops.mkldnn
    if not (torch.backends.mkldnn.is_available() and hasattr(mkldnn, "_reorder_linear_weight")):
        return False
    try:
        if hasattr(mkldnn, "_is_mkldnn_bf16_supported") and not mkldnn._is_mkldnn_bf16_supported():
            return False
        packed = mkldnn._reorder_linear_weight(torch.ones(32, 32, dtype=torch.bfloat16), 32)
        y = mkldnn._linear_pointwise(torch.ones(1, 32, dtype=torch.bfloat16), packed, None, "none", [], "")
        return bool(y.float().eq(32).all())
    except (RuntimeError, AttributeError):
        return False


MATRICES = ("qkv", "o", "gate_up", "down")
PACKED = {"q4": ("q", "d", "m"), "q8": ("q", "d"), "fp32": ()}  # the state's names of each format's tensors


def pack(weight: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
    """One matrix [N, K] in the engine's state: `t` (its rounded values, transposed, fp32) and the packed form."""
    from pipeline import kernels

    weight = weight.detach().float()
    if fmt == "fp32":
        return {"t": weight.t().contiguous()}
    packed = kernels.quantize_q4(weight) if fmt == "q4" else kernels.quantize_q8(weight)
    rounded = kernels.unpack_q4(*packed) if fmt == "q4" else kernels.unpack_q8(*packed)
    return {"t": rounded.t().contiguous(), **dict(zip(PACKED[fmt], packed))}


def head_format(fmt: str) -> str:
    """The lm_head's format: q8 in both quantized formats (a GGUF model's head is Q8_0, which int8 keeps exact)."""
    return "q8" if fmt == "q4" else fmt


def state_from_model(model, fmt: str) -> dict[str, torch.Tensor]:
    """The engine's weights taken from a transformers Llama model and packed in `fmt` (quantized where needed).

    q and k rows are reordered within each head so that rotary pairs (i, i + dim/2) sit side by side: then the
    rotation is one complex multiply. Attention scores are dot products of q and k, which the same reordering
    of both leaves unchanged; v and o keep their order. (A GGUF file stores q and k in this order already.)
    """
    inner, state = model.model, {}
    for i, block in enumerate(inner.layers):
        attn, mlp = block.self_attn, block.mlp
        projections = [(n, getattr(attn, n)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        for name, module in projections + [(n, getattr(mlp, n)) for n in ("gate_proj", "up_proj", "down_proj")]:
            if getattr(module, "bias", None) is not None:
                raise EngineUnsupported(f"backend=engine has no bias support ({name}); use backend=transformers")
        q, k = (_interleave_halves(w, attn.head_dim) for w in (attn.q_proj.weight, attn.k_proj.weight))
        matrices = {
            "qkv": torch.cat([q, k, attn.v_proj.weight]),
            "o": attn.o_proj.weight,
            "gate_up": torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
            "down": mlp.down_proj.weight,
        }
        for name, weight in matrices.items():
            state.update({f"layers.{i}.{name}.{key}": t for key, t in pack(weight, fmt).items()})
        state[f"layers.{i}.attn_norm"] = block.input_layernorm.weight.detach().float().contiguous()
        state[f"layers.{i}.mlp_norm"] = block.post_attention_layernorm.weight.detach().float().contiguous()
    state["embedding"] = inner.embed_tokens.weight.detach().float().contiguous()
    state["norm"] = inner.norm.weight.detach().float().contiguous()
    head = model.get_output_embeddings().weight
    state.update({f"lm_head.{key}": t for key, t in pack(head, head_format(fmt)).items()})
    return state


class Layer:
    def __init__(
        self,
        state: dict[str, torch.Tensor],
        index: int,
        fmt: str,
        max_kernel_rows: int,
        gemm_dtype: torch.dtype,
        tiles: bool = False,
    ):
        prefix = f"layers.{index}."

        def linear(name: str) -> Linear:
            packed = tuple(state[f"{prefix}{name}.{key}"] for key in PACKED[fmt])
            plain = state.get(f"{prefix}{name}.bf16")
            return Linear(state[f"{prefix}{name}.t"], packed, fmt, max_kernel_rows, gemm_dtype, tiles, plain)

        self.qkv, self.o, self.gate_up, self.down = (linear(name) for name in MATRICES)
        self.attn_norm = state[f"{prefix}attn_norm"]
        self.mlp_norm = state[f"{prefix}mlp_norm"]
        self.intermediate = self.gate_up.out_features // 2
        # what the fused layer kernel reads, in its order: each matrix packed, its GEMM weight and for q4 its tiles
        # (empty in fp32)
        matrices = (self.qkv, self.o, self.gate_up, self.down)
        own = (lambda m: (m.tiles,)) if fmt == "q4" else (lambda m: ())
        self.packed = [t for m in matrices for t in (*m.packed, m.gemm_t, *own(m))] if fmt != "fp32" else []


def _fused_kernel_available() -> bool:
    from pipeline import kernels

    return kernels.available()


def _kernel_amx_attention() -> bool:
    from pipeline import kernels

    return kernels.amx_attention()


def _kernel_ops():
    from pipeline import kernels

    return kernels.ops()


def _check_shapes(config, heads: int, kv_heads: int, head_dim: int, fmt: str) -> None:
    """Raise EngineUnsupported (backend=auto then uses transformers) for shapes the engine's code does not run."""
    why = ""
    if heads * head_dim != config.hidden_size:
        why = f"{heads} heads x head_dim {head_dim} differ from hidden_size {config.hidden_size}"
    elif heads % kv_heads:
        why = f"{heads} query heads do not group evenly onto {kv_heads} key/value heads"
    elif head_dim % 8:
        why = f"head_dim {head_dim} is not a multiple of 8"
    elif fmt in ("q4", "q8"):
        from pipeline.kernels import GROUP_SIZE

        odd = [k for k in (config.hidden_size, config.intermediate_size) if k % GROUP_SIZE]
        if odd:
            why = f"{fmt} weights come in groups of {GROUP_SIZE} along K, and K = {odd[0]} is not a multiple"
    if why:
        raise EngineUnsupported(f"backend=engine cannot run this model: {why}; use backend=transformers")


def _interleave_halves(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Reorder each head's output rows from [0..d/2), [d/2..d) to 0, d/2, 1, d/2 + 1, ..."""
    heads = weight.shape[0] // head_dim
    per_head = weight.view(heads, 2, head_dim // 2, -1).transpose(1, 2)
    return per_head.reshape(weight.shape).contiguous()


class Engine:
    """Weights, KV cache and the prefill/decode steps of one model; `generate` runs a list of prompts."""

    def __init__(
        self,
        model=None,
        fmt: str = "fp32",
        slots: int = 1,
        max_kernel_rows: int = 8,
        int8_activations: bool = False,
        *,
        config=None,
        state: dict[str, torch.Tensor] | None = None,
        gemm_dtype: torch.dtype = torch.float32,
        tiles: bool = False,
    ):
        """From a transformers Llama `model` (its weights packed now), or from a `config` and the `state` that
        `state_from_model` (or a GGUF file's blocks, pipeline.engine_weights) made in `fmt`.

        `gemm_dtype` is the GEMM's of more rows than the kernel's limit (fp32 or bf16); with `tiles` (q4 only) the
        layers also hold their weights as int8 tiles, which take rows up to `set_tile_rows`' limit."""
        if fmt not in FORMATS:
            raise PipelineError(f"engine weight format {fmt!r} is not one of {', '.join(FORMATS)}")
        config = model.config if model is not None else config
        if getattr(config, "model_type", "") != "llama":
            raise EngineUnsupported(
                f"backend=engine runs Llama-architecture models (this one is {config.model_type!r}); "
                "use backend=transformers"
            )
        self.config, self.fmt = config, fmt
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.hidden = config.hidden_size
        self.eps = config.rms_norm_eps
        _check_shapes(config, self.num_heads, self.num_kv_heads, self.head_dim, fmt)
        if state is None:
            state = state_from_model(model, fmt)
        self.embedding = state["embedding"]
        self.gemm_dtype = gemm_dtype
        self.layers = [
            Layer(state, i, fmt, max_kernel_rows, gemm_dtype, tiles) for i in range(config.num_hidden_layers)
        ]
        self.tile_rows, self.tile_split = 0, True
        self.norm = state["norm"]
        head_packed = tuple(state[f"lm_head.{key}"] for key in PACKED[head_format(fmt)])
        # the head's GEMM (a batched step's rows above its kernel limit) in the layers' GEMM dtype
        self.lm_head = Linear(
            state["lm_head.t"], head_packed, head_format(fmt), max_kernel_rows, gemm_dtype,
            gemm_plain=state.get("lm_head.bf16"),
        )  # fmt: skip
        self._rotary = None  # transformers' LlamaRotaryEmbedding, for RoPE types other than the default
        self.rotations = torch.empty(0, dtype=torch.complex64)
        self.rotations_real = torch.empty(0)  # the same as [length, dim/2, (cos, sin)] for the fused kernel
        # q4/q8 weights run every step and prefill as one fused kernel call per layer (our kernel up to
        # max_kernel_rows rows, fp32 GEMM above); fp32 weights, or no kernel, take the eager path
        self.fused = fmt != "fp32" and _fused_kernel_available()
        self._ops = _kernel_ops() if self.fused else None
        self.max_kernel_rows = max_kernel_rows
        # one-row decoding multiplies q4/q8 weights with activations quantized to int8 (llama.cpp's way)
        self.int8_x = int8_activations
        self.slots, self.capacity = 0, 0
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []
        self.prefix: list[int] = []
        self.prefix_k: list[torch.Tensor] = []
        self.prefix_v: list[torch.Tensor] = []
        self.prefix_kt: list[torch.Tensor] = []  # the fused kernel's copy: [kv_heads, head_dim, P padded to 32]
        # the prefix's keys and values as bf16 pairs, for attention on AMX tiles (set_bf16_attention)
        self.bf16_attention = False
        self.prefix_kb: list[torch.Tensor] = []
        self.prefix_vb: list[torch.Tensor] = []
        # per slot: whether it holds the shared prefix (a prompt without the prefix writes over its slot's copy;
        # a prompt with the prefix admitted there later gets it back first); for the fused kernel, whether its
        # row reads the prefix from the one shared copy (no slot holds one: _write_prefix)
        self.prefix_ok: list[bool] = []
        self._untouched = False  # whether the caches' pages past the prefix are still to be touched (_touch)
        self._observe = None  # generate's `observe` hook while it runs
        # forced runs of constrained rows enter the cache in one multi-token step (exact up to summation order)
        self.jump_forward = False
        # every layer pass generate made, by its rows ("32": a step or prefill of 32 rows), and every full lm_head
        # by its rows ("head:5"): what the bench's roofline of a stage is computed from
        self.steps: Counter[str] = Counter()
        self._ensure(slots, 256)

    def bf16_copies(self) -> dict[str, torch.Tensor]:
        """The bf16 GEMM's weights as plain [N, K] matrices, by state key (`layers.i.qkv.bf16`, `lm_head.bf16`):
        what a state given them skips computing at load (empty where the GEMM is not oneDNN's bf16)."""
        if self.gemm_dtype != torch.bfloat16 or not onednn_bf16():
            return {}
        copies = {
            f"layers.{i}.{name}.bf16": bf16_plain(getattr(layer, name).weight_t)
            for i, layer in enumerate(self.layers)
            for name in MATRICES
        }
        copies["lm_head.bf16"] = bf16_plain(self.lm_head.weight_t)
        return copies

    def set_kernel_rows(self, rows: int, head_rows: int | None = None) -> None:
        """Our kernel up to `rows` rows, GEMM above (the calibration times both sides of the limit); the lm_head's
        own limit `head_rows` (None: the same)."""
        self.max_kernel_rows = rows
        for linear in [m for layer in self.layers for m in (layer.qkv, layer.o, layer.gate_up, layer.down)]:
            linear.max_kernel_rows = rows
        self.lm_head.max_kernel_rows = rows if head_rows is None else head_rows

    def set_tile_rows(self, rows: int, split: bool = True) -> None:
        """The int8 tiles (an engine made with `tiles`) take the rows above the kernel's limit up to `rows`, with
        activations in two int8 digits (`split`: 15 bits) or one (lossy); GEMM above."""
        if rows and not self.layers[0].qkv.tiles.numel():
            raise PipelineError("set_tile_rows: this engine holds no int8 tiles (make it with tiles=True, q4 weights)")
        self.tile_rows, self.tile_split = rows, split
        for linear in [m for layer in self.layers for m in (layer.qkv, layer.o, layer.gate_up, layer.down)]:
            linear.tile_rows, linear.tile_split = rows, split

    # ------------------------------------------------------------------ memory

    def weight_bytes(self) -> int:
        """Weight bytes read per decoded token: every matrix in its decode format, plus the norms."""
        matrices = [m for layer in self.layers for m in (layer.qkv, layer.o, layer.gate_up, layer.down)]
        norms = sum(layer.attn_norm.numel() + layer.mlp_norm.numel() for layer in self.layers) + self.norm.numel()
        return sum(m.decode_bytes() for m in matrices) + self.lm_head.decode_bytes() + 4 * norms

    def work_shape(self) -> dict[str, str]:
        """Bytes and parameters of one pass through the layers and through the lm_head (the bench's roofline)."""
        matrices = [m for layer in self.layers for m in (layer.qkv, layer.o, layer.gate_up, layer.down)]
        return {
            "layer_bytes": str(sum(m.decode_bytes() for m in matrices)),
            "head_bytes": str(self.lm_head.decode_bytes()),
            "layer_params": str(sum(m.in_features * m.out_features for m in matrices)),
            "head_params": str(self.lm_head.in_features * self.lm_head.out_features),
        }

    def _ensure(self, slots: int, length: int) -> None:
        """Grow the KV cache to `slots` rows of `length` positions (the shared prefix is copied into new rows)."""
        if slots <= self.slots and length <= self.capacity:
            return
        slots, length = max(slots, self.slots), max(length, self.capacity)
        length = (length + 63) // 64 * 64
        shape = (slots, self.num_kv_heads, length, self.head_dim)
        # the fused kernel writes every position before it reads it and never reads a slot's prefix positions
        # (_write_prefix): those pages are left untouched, 0.44 of SmolLM2's 0.66 GB for 32 slots
        new = torch.empty if self.fused else torch.zeros
        self.k_cache = [new(shape) for _ in self.layers]
        self.v_cache = [new(shape) for _ in self.layers]
        self.slots, self.capacity = slots, length
        cos, sin = self._rotary_tables(length)
        self.rotations = torch.complex(cos, sin)  # [length, dim/2]
        self.rotations_real = torch.view_as_real(self.rotations).contiguous()
        self._write_prefix()

    def _rotary_tables(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of every position's rotary angles, [length, head_dim / 2], as transformers computes them.

        The default RoPE (the embedded model's) is computed here, with transformers' exact float32 operations:
        importing its Llama module only for these tables cost 0.8 s of a warm process. Other RoPE types (llama3,
        linear, dynamic, yarn scaling) take transformers' LlamaRotaryEmbedding itself.
        """
        params = getattr(self.config, "rope_parameters", None) or {}
        if params.get("rope_type", "default") == "default" and "rope_theta" in params:
            dim = self.head_dim
            inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
            angles = torch.arange(length)[:, None].float() * inv_freq
            return angles.cos(), angles.sin()
        if self._rotary is None:
            from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

            config = self.config.to_transformers() if hasattr(self.config, "to_transformers") else self.config
            self._rotary = LlamaRotaryEmbedding(config=config)
        cos, sin = self._rotary(self.embedding[:1].unsqueeze(0), torch.arange(length).unsqueeze(0))
        half = self.head_dim // 2  # transformers' tables repeat the angles for the second half of a head
        return cos[0, :, :half].float(), sin[0, :, :half].float()

    def _write_prefix(self, slot: int | None = None) -> None:
        """Put the shared prefix at the start of one slot, or of every slot.

        Only the eager path reads it there: the fused kernel reads a row's prefix from the one shared copy
        (prefix_kt, prefix_v) and never a slot's first positions, so for it a slot holds the prefix by being
        marked. Copying it into 32 slots wrote 0.5 GB for SmolLM2 at every start."""
        width, rows = len(self.prefix), slice(None) if slot is None else slice(slot, slot + 1)
        if slot is None:
            self._untouched = self.fused
        for k, v, pk, pv in zip(self.k_cache, self.v_cache, self.prefix_k, self.prefix_v) if not self.fused else ():
            k[rows, :, :width] = pk
            v[rows, :, :width] = pv
        if slot is None:
            self.prefix_ok = [True] * self.slots
        else:
            self.prefix_ok[slot] = True

    def _touch(self) -> None:
        """Touch the pages of every slot's positions past the prefix, once per cache and prefix (the fused
        engine's caches are allocated untouched): generate's first call, the warm-up, pays their first touch
        rather than a stage (about 30 ms of a batched stage, AVX512-BF16 EPYC)."""
        if self._untouched:
            for cache in self.k_cache + self.v_cache:
                cache[:, :, len(self.prefix) :].zero_()
            self._untouched = False

    def _admit(self, slot: int, seq: Sequence) -> None:
        """Make `slot` ready for `seq`: the shared prefix back where seq needs it, marked overwritten where not."""
        if seq.start > 0 and not self.prefix_ok[slot]:
            self._write_prefix(slot)
        elif seq.start == 0 and self.prefix:
            self.prefix_ok[slot] = False

    def set_prefix(self, prefix: list[int], cached: dict[str, torch.Tensor] | None = None) -> None:
        """Compute the KV cache of `prefix` once (or take it from `cached`, what `prefix_state` gave for the same
        prefix and engine) and put it at the start of every slot."""
        self.prefix, self.prefix_k, self.prefix_v, self.prefix_kt = [], [], [], []
        self.prefix_kb, self.prefix_vb = [], []
        if not prefix:
            return
        self._ensure(self.slots, len(prefix) + 64)
        if cached is not None:
            self.prefix_k = [cached[f"k.{i}"].contiguous() for i in range(len(self.layers))]
            self.prefix_v = [cached[f"v.{i}"].contiguous() for i in range(len(self.layers))]
        else:
            self._prefill([(0, Sequence(0, list(prefix), start=0, budget=0, generated=[]))], logits=False)
            self.prefix_k = [k[0, :, : len(prefix)].clone(memory_format=torch.contiguous_format) for k in self.k_cache]
            self.prefix_v = [v[0, :, : len(prefix)].clone(memory_format=torch.contiguous_format) for v in self.v_cache]
        pad = -len(prefix) % 32
        self.prefix_kt = [F.pad(k.transpose(1, 2), (0, pad)).contiguous() for k in self.prefix_k]
        self.prefix = list(prefix)
        self._bf16_pairs()
        self._write_prefix()

    def set_bf16_attention(self, on: bool) -> None:
        """Whether rows that read the shared prefix attend to it on AMX bf16 tiles (calls of 24 rows or more that
        read it: batched prefills and steps; the kernel rounds the queries, the prefix's keys and values and the
        probabilities to bf16, with fp32 sums). Needs the fused kernel and `pipeline.kernels.amx_attention()`."""
        if on and not (self.fused and _kernel_amx_attention() and self.head_dim == 64):
            raise PipelineError(
                "set_bf16_attention: attention on AMX tiles needs our kernel on an AMX CPU (CPU kind amx) and heads "
                "of 64 dimensions; choose precision.prefix_attention=fp32"
            )
        self.bf16_attention = on
        self._bf16_pairs()

    def _bf16_pairs(self) -> None:
        """The prefix's keys as bf16 pairs of dimensions ([kv_heads, head_dim/2, P32, 2]) and its values as pairs
        of keys ([kv_heads, P32/2, head_dim, 2]), padded with zero keys: what the AMX tiles load."""
        self.prefix_kb, self.prefix_vb = [], []
        if not (self.bf16_attention and self.prefix):
            return
        pad = -len(self.prefix) % 32
        for k, v in zip(self.prefix_k, self.prefix_v):
            heads, width, dim = k.shape
            k32, v32 = F.pad(k, (0, 0, 0, pad)).to(torch.bfloat16), F.pad(v, (0, 0, 0, pad)).to(torch.bfloat16)
            self.prefix_kb.append(k32.view(heads, width + pad, dim // 2, 2).permute(0, 2, 1, 3).contiguous())
            self.prefix_vb.append(v32.view(heads, (width + pad) // 2, 2, dim).permute(0, 1, 3, 2).contiguous())

    def prefix_state(self) -> dict[str, torch.Tensor]:
        """The shared prefix's keys and values, to be given back to `set_prefix` by a later process."""
        return {
            **{f"k.{i}": k for i, k in enumerate(self.prefix_k)},
            **{f"v.{i}": v for i, v in enumerate(self.prefix_v)},
        }

    def _move(self, source: int, target: int, seq: Sequence) -> None:
        """Copy a running row's cache to a lower slot, keeping running rows packed.

        A row with the shared prefix copies only its own positions where the target slot holds the prefix (for
        the fused kernel always: it reads the prefix from its one copy), else all of them; a row without the
        prefix always copies all and leaves the target without it."""
        start = seq.start if seq.start > 0 and (self.prefix_ok[target] or self.fused) else 0
        for k, v in zip(self.k_cache, self.v_cache):
            k[target, :, start : seq.position] = k[source, :, start : seq.position]
            v[target, :, start : seq.position] = v[source, :, start : seq.position]
        self.prefix_ok[target] = seq.start > 0 or not self.prefix

    # ------------------------------------------------------------------ the model

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (self.hidden,), weight, self.eps)

    def _mlp(self, layer: Layer, h: torch.Tensor) -> torch.Tensor:
        gate_up = layer.gate_up(self._norm(h, layer.mlp_norm))
        gate, up = gate_up.split(layer.intermediate, dim=-1)
        return h + layer.down(F.silu(gate) * up)

    def _qkv(self, layer: Layer, h: torch.Tensor, rotations: torch.Tensor):
        """Projections of the rows of `h` ([T, hidden]), q and k rotated by `rotations` ([T, 1, dim/2] complex)."""
        qkv = layer.qkv(self._norm(h, layer.attn_norm))
        rows, heads, kv_heads, dim = h.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qk = torch.view_as_complex(qkv[:, : (heads + kv_heads) * dim].reshape(rows, heads + kv_heads, dim // 2, 2))
        qk = torch.view_as_real(qk * rotations).view(rows, heads + kv_heads, dim)
        v = qkv[:, (heads + kv_heads) * dim :].view(rows, kv_heads, dim)
        return qk[:, :heads], qk[:, heads:], v

    def _prefill(
        self, batch: list[tuple[int, Sequence]], logits: bool = True, pending: bool = False
    ) -> torch.Tensor | None:
        """Run the new tokens of each (slot, sequence) as one packed sequence: its prompt suffix, or with
        `pending` the generated tokens not in the cache yet (a jump-forward step).

        Returns each sequence's last hidden state after the final norm (the lm_head's input; `_accept`
        decides which logits it needs), or None with `logits=False`.
        """
        tokens, positions, slots = [], [], []
        spans = []  # (slot, first position, length, offset in the packed sequence)
        for slot, seq in batch:
            new = seq.generated[-seq.pending :] if pending else seq.suffix
            start = seq.position if pending else seq.start
            tokens += new
            positions += range(start, start + len(new))
            slots += [slot] * len(new)
            spans.append((slot, start, len(new), len(tokens) - len(new)))
            seq.position = start + len(new)
        token_ids, pos, slot_ids = torch.tensor(tokens), torch.tensor(positions), torch.tensor(slots)
        if self.fused:
            h = self._fused_layers(token_ids, slot_ids, pos)
            if not logits:
                return None
            last = torch.tensor([offset + length - 1 for _, _, length, offset in spans])
            return self._norm(h[last], self.norm)
        masks = [
            torch.arange(start + length).unsqueeze(0) <= torch.arange(start, start + length).unsqueeze(1)
            for _, start, length, _ in spans
        ]
        h = self.embedding[token_ids]
        rotations = self.rotations[pos].unsqueeze(1)
        for layer, k_cache, v_cache in zip(self.layers, self.k_cache, self.v_cache):
            q, k, v = self._qkv(layer, h, rotations)
            k_cache[slot_ids, :, pos] = k
            v_cache[slot_ids, :, pos] = v
            outputs = []
            for (slot, start, length, offset), mask in zip(spans, masks):
                query = q[offset : offset + length].transpose(0, 1).unsqueeze(0)  # [1, heads, L, dim]
                keys = k_cache[slot : slot + 1, :, : start + length]
                values = v_cache[slot : slot + 1, :, : start + length]
                out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, enable_gqa=True)
                outputs.append(out[0].transpose(0, 1).reshape(length, self.hidden))
            h = h + layer.o(torch.cat(outputs) if len(outputs) > 1 else outputs[0])
            h = self._mlp(layer, h)
        if not logits:
            return None
        last = torch.tensor([offset + length - 1 for _, _, length, offset in spans])
        return self._norm(h[last], self.norm)

    def _attend_one(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, hidden_mask) -> torch.Tensor:
        """Attention of one new query per row ([B, heads, dim]) over the cache ([B, kv_heads, S, dim]).

        Written out rather than through scaled_dot_product_attention: for a single query the fused kernel's
        set-up costs more than the arithmetic. Query heads are grouped onto their key/value head (GQA)
        without copying the cache.
        """
        rows, groups = q.shape[0], self.num_heads // self.num_kv_heads
        q = q.view(rows, self.num_kv_heads, groups, self.head_dim)
        scores = torch.matmul(q, keys.transpose(-1, -2)) * self.head_dim**-0.5  # [B, kv_heads, groups, S]
        if hidden_mask is not None:
            scores = scores.masked_fill(hidden_mask, float("-inf"))
        return torch.matmul(scores.softmax(dim=-1), values).reshape(rows, self.hidden)

    def decode_one_token(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One step for the running rows 0..B-1: `tokens` [B] at `positions` [B] in; logits [B, vocab] out."""
        self._touch()  # a step made up outside generate may read positions nothing wrote: zeros, as eager
        return self.lm_head(self._decode_hidden(tokens, positions))

    def _decode_hidden(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """`decode_one_token` up to the lm_head: the final-norm hidden state of each row [B, hidden]."""
        rows = tokens.shape[0]
        length = int(positions.max()) + 1
        slot_ids = torch.arange(rows)
        if self.fused:
            return self._norm(self._fused_layers(tokens, slot_ids, positions), self.norm)
        # a key is visible to a row up to the row's own position (rows differ in length)
        mask = None if rows == 1 else (torch.arange(length).unsqueeze(0) > positions.unsqueeze(1))[:, None, None]
        h = self.embedding[tokens]
        rotations = self.rotations[positions].unsqueeze(1)
        for layer, k_cache, v_cache in zip(self.layers, self.k_cache, self.v_cache):
            q, k, v = self._qkv(layer, h, rotations)
            k_cache[slot_ids, :, positions] = k
            v_cache[slot_ids, :, positions] = v
            out = self._attend_one(q, k_cache[:rows, :, :length], v_cache[:rows, :, :length], mask)
            h = h + layer.o(out)
            h = self._mlp(layer, h)
        return self._norm(h, self.norm)

    def _fused_layers(self, tokens: torch.Tensor, slot_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Hidden states after every layer for rows `tokens` at (slot, position), one kernel call per layer."""
        h = self.embedding[tokens]  # indexing copies: h is the rows' own buffer, updated in place
        # rows whose slot holds the shared prefix read its keys and values from the one copy in prefix_kt/v:
        # 32 rows then read the same few hundred KB per layer from cache instead of 32 copies from memory, many
        # queries at a time (the keys transposed for that)
        width = len(self.prefix)
        shared = None
        if width:
            shared = torch.tensor([width if self.prefix_ok[s] else 0 for s in slot_ids.tolist()])
        for i, (layer, k_cache, v_cache) in enumerate(zip(self.layers, self.k_cache, self.v_cache)):
            self._ops.decoder_layer(
                h, slot_ids, positions, k_cache, v_cache, self.rotations_real,
                layer.attn_norm, layer.mlp_norm, self.eps, self.num_heads, layer.packed, self.int8_x,
                self.max_kernel_rows, self.prefix_kt[i] if width else None, self.prefix_v[i] if width else None,
                shared, self.tile_rows, self.tile_split,
                self.prefix_kb[i] if width and self.prefix_kb else None,
                self.prefix_vb[i] if width and self.prefix_vb else None,
            )  # fmt: skip
        return h

    def logits(self, ids: list[int]) -> torch.Tensor:
        """Logits of every position of one token sequence, without the cache (the reference for tests)."""
        positions = torch.arange(len(ids))
        mask = positions.unsqueeze(0) <= positions.unsqueeze(1)
        self._ensure(self.slots, len(ids))
        h = self.embedding[torch.tensor(ids)]
        rotations = self.rotations[positions].unsqueeze(1)
        for layer in self.layers:
            q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in self._qkv(layer, h, rotations))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
            h = h + layer.o(out[0].transpose(0, 1).reshape(len(ids), self.hidden))
            h = self._mlp(layer, h)
        return self._norm(h, self.norm) @ self.lm_head.weight_t

    # ------------------------------------------------------------------ the loop

    def generate(
        self,
        prompts: list[list[int]],
        budget: int,
        stopper: StopTokens,
        slots: int,
        on_first_token=None,
        constraints: list[Constraint | None] | None = None,
        budgets: list[int] | None = None,
        observe=None,
    ) -> list[Sequence]:
        """Greedy generation for every prompt (token ids), `slots` rows at a time; results in prompt order.

        Prompts that start with the shared prefix skip it. Continuous batching: whenever rows finish,
        waiting prompts take their slots in the next prefill. `on_first_token` is called once, when the
        first prefill has produced its tokens. `constraints[i]`, where given, limits prompt i's tokens;
        `budgets[i]` replaces `budget` for prompt i; `observe(rows, hidden)` sees each step's rows and their
        final-norm hidden states before a token is chosen (teacher forcing reads the distributions there).
        """
        width = len(self.prefix)
        waiting = []
        for i, ids in enumerate(prompts):
            shared = width > 0 and len(ids) > width and ids[:width] == self.prefix
            suffix = ids[width:] if shared else list(ids)
            constraint = constraints[i] if constraints else None
            own_budget = budgets[i] if budgets else budget
            waiting.append(Sequence(i, suffix, width if shared else 0, own_budget, [], constraint=constraint))
        waiting.reverse()  # pop() takes them in order
        longest = max(seq.start + len(seq.suffix) + seq.budget for seq in waiting)
        self._ensure(min(slots, len(prompts)), longest + 1)
        self._touch()
        self._observe = observe
        running: list[Sequence] = []
        finished: list[Sequence] = []
        while waiting or running:
            if waiting and len(running) < slots:
                admitted = []
                while waiting and len(running) + len(admitted) < slots:
                    admitted.append(waiting.pop())
                batch = [(len(running) + i, seq) for i, seq in enumerate(admitted)]
                for slot, seq in batch:
                    self._admit(slot, seq)
                hidden = self._prefill(batch)
                self.steps[f"{sum(len(seq.suffix) for _, seq in batch)}"] += 1
                if on_first_token is not None:
                    on_first_token()
                    on_first_token = None
                running += admitted
                self._accept(admitted, hidden, stopper)
            elif any(seq.pending > 1 for seq in running):
                # jump-forward: a forced run enters the cache in one multi-token step with the other rows' tokens
                hidden = self._prefill(list(enumerate(running)), pending=True)
                self.steps[f"{sum(seq.pending for seq in running)}"] += 1
                self._accept(running, hidden, stopper)
            else:
                tokens = torch.tensor([seq.generated[-1] for seq in running])
                positions = torch.tensor([seq.position for seq in running])
                hidden = self._decode_hidden(tokens, positions)
                self.steps[f"{len(running)}"] += 1
                for seq in running:
                    seq.position += 1
                self._accept(running, hidden, stopper)
            if any(seq.done for seq in running):
                running = self._compact(running, finished)
        return sorted(finished, key=lambda seq: seq.index)

    def teacher_forced(
        self, prompts: list[list[int]], continuations: list[list[int]], slots: int
    ) -> list[torch.Tensor]:
        """The log-softmax distributions this engine's decoding path gives along each prompt + continuation.

        `generate` itself runs, with each row forced to its continuation and stopping where it ended, so the
        steps, their row counts and therefore the kernels used are those of the run that produced them;
        every step scores the full lm_head in the decode format. Returns [len(continuation), vocab] each.
        """
        rows: list[list[torch.Tensor]] = [[] for _ in prompts]

        def observe(seqs: list[Sequence], hidden: torch.Tensor) -> None:
            logprobs = torch.log_softmax(self.lm_head(hidden, self.int8_x), dim=-1)
            for seq, row in zip(seqs, logprobs):
                rows[seq.index].append(row)

        live = [i for i, c in enumerate(continuations) if c]
        jump, self.jump_forward = self.jump_forward, False  # every position gets its own distribution
        if live:
            self.generate(
                [prompts[i] for i in live],
                1,
                StopTokens(None, None, []),
                slots,
                constraints=[_Forced(continuations[i]) for i in live],
                budgets=[len(continuations[i]) for i in live],
                observe=lambda seqs, hidden: observe([_Renumbered(s, live) for s in seqs], hidden),
            )
        self._observe, self.jump_forward = None, jump
        return [torch.stack(r) if r else torch.empty(0) for r in rows]

    def _accept(self, rows: list[Sequence], hidden: torch.Tensor, stopper: StopTokens) -> None:
        """Greedy choice of each row's next token (among the allowed ones where a constraint says), then stop rules.

        `hidden` holds each row's final-norm hidden state. Only rows decoding freely need the full lm_head
        (a third of a decode step's weight reads); a constrained row scores just its allowed tokens, and
        one whose next token is forced scores nothing.
        """
        if self._observe is not None:
            self._observe(rows, hidden)
        allowed = [seq.constraint.allowed(seq.generated) if seq.constraint is not None else None for seq in rows]
        free = [row for row, choices in enumerate(allowed) if choices is None]
        tokens = dict.fromkeys(range(len(rows)), 0)
        if free:
            logits = self.lm_head(hidden if len(free) == len(rows) else hidden[free], self.int8_x)
            self.steps[f"head:{len(free)}"] += 1
            tokens.update(zip(free, logits.argmax(dim=-1).tolist()))
        for row, (seq, choices) in enumerate(zip(rows, allowed)):
            token = tokens[row]
            if choices is not None:
                if not choices:  # nothing may follow: the constrained text is complete
                    seq.done = True
                    continue
                if len(choices) == 1:
                    token = int(choices[0])
                else:
                    ids = torch.as_tensor(choices)
                    token = int(ids[(self.lm_head.rows(ids) @ hidden[row]).argmax()])
            seq.generated.append(token)
            seq.pending = 1
            self._stop_rules(seq, stopper)
            # jump-forward: where the constraint allows a single next token, or a run of them, they are taken now
            # and enter the cache together in the next step (SGLang's jump-forward decoding)
            while self.jump_forward and not seq.done and seq.constraint is not None:
                forced = seq.constraint.allowed(seq.generated)
                if forced is None or len(forced) != 1:
                    break
                seq.generated.append(int(forced[0]))
                seq.pending += 1
                self._stop_rules(seq, stopper)

    @staticmethod
    def _stop_rules(seq: Sequence, stopper: StopTokens) -> None:
        if stopper.stops(seq.generated):
            seq.done = True
        elif len(seq.generated) >= seq.budget:
            seq.done, seq.hit_budget = True, True

    def _compact(self, running: list[Sequence], finished: list[Sequence]) -> list[Sequence]:
        """Drop finished rows; running rows above the new count move into the freed slots below it.

        Row i of `running` lives in cache slot i, so after this slots 0..B-1 hold the B running rows.
        """
        finished += [seq for seq in running if seq.done]
        count = sum(not seq.done for seq in running)
        holes = [slot for slot, seq in enumerate(running[:count]) if seq.done]
        movers = [slot for slot, seq in enumerate(running) if slot >= count and not seq.done]
        rows = list(running[:count])
        for hole, slot in zip(holes, movers):
            self._move(slot, hole, running[slot])
            rows[hole] = running[slot]
        return rows


class _Forced:
    """A constraint that allows exactly the next token of a recorded continuation (teacher forcing)."""

    def __init__(self, ids: list[int]):
        self.ids = ids

    def allowed(self, generated: list[int]) -> list[int]:
        return [self.ids[len(generated)]] if len(generated) < len(self.ids) else []


class _Renumbered:
    """A sequence seen by `teacher_forced`'s observer with its index in the caller's full list."""

    def __init__(self, seq: Sequence, live: list[int]):
        self.index = live[seq.index]


class StopTokens:
    """Decides from token ids alone whether a generated sequence has stopped.

    EOS ids stop at once. For a stop text, the tokens whose text contains its last character are found
    once; only when such a token comes out is the tail decoded and searched (never for a one-character
    stop text such as a newline, where the token itself decides).
    """

    def __init__(self, tokenizer, stop: str | None, eos_ids: list[int]):
        self.tokenizer, self.stop, self.eos = tokenizer, stop or None, set(eos_ids)
        self.candidates: set[int] = set()
        self.direct: set[int] = set()
        if self.stop:
            from pipeline.tokens import token_texts

            texts = token_texts(tokenizer)
            self.candidates = {i for i, text in enumerate(texts) if self.stop[-1] in text}
            self.direct = {i for i in self.candidates if self.stop in texts[i]}

    def stops(self, generated: list[int]) -> bool:
        """True when the last token is EOS or completes the stop text."""
        token = generated[-1]
        if token in self.eos or token in self.direct:
            return True
        if token in self.candidates:
            return self.stop in self.tokenizer.decode(generated[-8:])
        return False
