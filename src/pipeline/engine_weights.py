"""The engine's weights without transformers: read from a GGUF file's blocks, and cached once packed.

A warm process loads the packed engine from one safetensors file beside the model cache (memory-mapped:
no transformers model, no quantizing); a cold one reads the GGUF file's blocks straight into the engine's
formats where they match (Q4_1 is the q4 format byte for byte, Q8_0 the q8 one) and dequantizes the rest in
torch. transformers' own GGUF loader, which dequantizes in Python for 20 s, is then needed only for the
transformers model itself (the course's loss, the fidelity reference), and only when one is asked for.

The GGUF reader here reads the header's scalars and tensor table and skips its arrays (the vocabulary is
the tokenizer's business), in milliseconds where gguf-py's reader maps every array element.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.engine import PACKED, head_format
from pipeline.errors import PipelineError

# GGUF value types: struct formats of the scalars; 8 is a string, 9 an array
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
# GGUF tensor types the engine reads: name, block size, bytes per block
TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 3: ("Q4_1", 32, 20), 8: ("Q8_0", 32, 34)}
# names of the other types, for saying what a file holds
TYPE_NAMES = {2: "Q4_0", 6: "Q5_0", 7: "Q5_1", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K",
              14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL",
              30: "BF16"}  # fmt: skip


@dataclass
class Tensor:
    name: str
    kind: str  # F32, F16, Q4_1, Q8_0, or the GGUF type number of one the engine does not read
    rows: int  # N (GGUF's outer dimension)
    cols: int  # K (GGUF's ne0, along which blocks run)
    data: np.ndarray  # the raw bytes [rows, bytes per row]


@dataclass
class GGUF:
    metadata: dict  # the scalar and string keys (arrays skipped)
    tensors: dict[str, Tensor]


def read_gguf(path: Path) -> GGUF:
    """The metadata scalars and the tensors of a GGUF (version 2 or 3) file, memory-mapped."""
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    buffer = memoryview(raw)
    if bytes(buffer[:4]) != b"GGUF":
        raise PipelineError(f"{path} is not a GGUF file; give a .gguf file or a model folder")
    version, tensor_count, kv_count = struct.unpack_from("<IQQ", buffer, 4)
    if version < 2:
        raise PipelineError(f"{path} is GGUF version {version}; convert it again with a current llama.cpp")
    offset = 24

    def string(at: int) -> tuple[str, int]:
        (length,) = struct.unpack_from("<Q", buffer, at)
        return bytes(buffer[at + 8 : at + 8 + length]).decode("utf-8", "replace"), at + 8 + length

    def skip(kind: int, at: int) -> int:
        if kind in _SCALARS:
            return at + struct.calcsize(_SCALARS[kind])
        if kind == 8:
            return string(at)[1]
        item, count = struct.unpack_from("<IQ", buffer, at)
        at += 12
        if item in _SCALARS:
            return at + count * struct.calcsize(_SCALARS[item])
        if item == 8:  # the vocabulary's ~50k strings: read their lengths only (decoding them took 0.1 s a process)
            length = struct.Struct("<Q").unpack_from
            for _ in range(count):
                at += 8 + length(buffer, at)[0]
            return at
        for _ in range(count):
            at = skip(item, at)
        return at

    metadata: dict = {}
    for _ in range(kv_count):
        key, offset = string(offset)
        (kind,) = struct.unpack_from("<I", buffer, offset)
        offset += 4
        if kind in _SCALARS:
            (metadata[key],) = struct.unpack_from(_SCALARS[kind], buffer, offset)
        elif kind == 8:
            metadata[key], _ = string(offset)
        offset = skip(kind, offset)
    table = []
    for _ in range(tensor_count):
        name, offset = string(offset)
        (dims,) = struct.unpack_from("<I", buffer, offset)
        shape = struct.unpack_from(f"<{dims}Q", buffer, offset + 4)
        kind, start = struct.unpack_from("<IQ", buffer, offset + 4 + 8 * dims)
        offset += 4 + 8 * dims + 12
        table.append((name, shape, kind, start))
    alignment = int(metadata.get("general.alignment", 32))
    data_start = (offset + alignment - 1) // alignment * alignment
    tensors = {}
    for name, shape, kind, start in table:
        cols, rows = int(shape[0]), int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
        kind_name, block, size = TYPES.get(kind, (TYPE_NAMES.get(kind, f"type {kind}"), 0, 0))
        row_bytes = cols // block * size if block else 0
        data = (
            raw[data_start + start : data_start + start + rows * row_bytes].reshape(rows, row_bytes)
            if block
            else raw[:0]
        )
        tensors[name] = Tensor(name, kind_name, rows, cols, data)
    return GGUF(metadata, tensors)


@dataclass
class LlamaShape:
    """What the engine, the calibration and the GGUF readers need of a Llama config, under LlamaConfig's names.

    transformers' LlamaConfig costs 0.7 s of imports (its Llama package), a fifth of a warm process's ready
    time; `to_transformers()` makes one where a transformers model is built (the fp32 reference, scaled RoPE).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_parameters: dict
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    tie_word_embeddings: bool
    model_type: str = "llama"

    def fields(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "model_type"}

    def to_transformers(self):
        from transformers import LlamaConfig

        return LlamaConfig(**self.fields(), architectures=["LlamaForCausalLM"])

    def to_json_string(self) -> str:
        return json.dumps(self.fields(), sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict) -> LlamaShape:
        return cls(**values)


def llama_config(gguf: GGUF) -> LlamaShape | None:
    """The Llama config a GGUF file's `llama.*` keys describe (as transformers' GGUF loader reads them)."""
    meta = gguf.metadata
    if meta.get("general.architecture") != "llama":
        return None
    heads = int(meta["llama.attention.head_count"])
    hidden = int(meta["llama.embedding_length"])
    vocab = int(meta.get("llama.vocab_size") or gguf.tensors["token_embd.weight"].rows)
    return LlamaShape(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(meta["llama.feed_forward_length"]),
        num_hidden_layers=int(meta["llama.block_count"]),
        num_attention_heads=heads,
        num_key_value_heads=int(meta.get("llama.attention.head_count_kv", heads)),
        head_dim=int(meta.get("llama.rope.dimension_count", hidden // heads)),
        max_position_embeddings=int(meta.get("llama.context_length", 2048)),
        rms_norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_parameters={"rope_type": "default", "rope_theta": float(meta.get("llama.rope.freq_base", 10000.0))},
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
        tie_word_embeddings="output.weight" not in gguf.tensors,
    )


def _blocks(tensor: Tensor) -> np.ndarray:
    return tensor.data.reshape(tensor.rows, tensor.cols // 32, -1)


def _as_torch(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array))  # a copy: the file's pages stay read-only


def _packed(tensor: Tensor) -> tuple[torch.Tensor, ...]:
    """A Q4_1 / Q8_0 tensor's blocks as the q4 / q8 format's tensors (the same bytes, scales in fp32)."""
    blocks = _blocks(tensor)
    scales = _as_torch(blocks[..., 0:2]).view(torch.float16).reshape(tensor.rows, -1).float()
    if tensor.kind == "Q4_1":
        mins = _as_torch(blocks[..., 2:4]).view(torch.float16).reshape(tensor.rows, -1).float()
        return _as_torch(blocks[..., 4:]).reshape(tensor.rows, -1), scales, mins
    return _as_torch(blocks[..., 2:]).view(torch.int8).reshape(tensor.rows, -1), scales


def dequantize(tensor: Tensor) -> torch.Tensor:
    """fp32 [rows, cols] of a tensor the engine reads."""
    from pipeline import kernels

    if tensor.kind == "F32":
        return _as_torch(tensor.data).view(torch.float32).reshape(tensor.rows, tensor.cols)
    if tensor.kind == "F16":
        return _as_torch(tensor.data).view(torch.float16).reshape(tensor.rows, tensor.cols).float()
    if tensor.kind == "Q4_1":
        return kernels.unpack_q4(*_packed(tensor))
    if tensor.kind == "Q8_0":
        return kernels.unpack_q8(*_packed(tensor))
    raise PipelineError(f"{tensor.name} is GGUF type {tensor.kind}, which the engine does not read")


_EXACT = {"q4": "Q4_1", "q8": "Q8_0"}  # the GGUF type each packed format holds byte for byte


def _matrix(tensors: list[Tensor], fmt: str) -> dict[str, torch.Tensor]:
    """Matrices stacked along N (q, k, v; gate, up) in `fmt`: the file's blocks where they are that format."""
    from pipeline import kernels
    from pipeline.engine import pack

    if fmt != "fp32" and all(t.kind == _EXACT[fmt] for t in tensors):
        parts = [_packed(t) for t in tensors]
        packed = [torch.cat(group) if len(tensors) > 1 else group[0] for group in zip(*parts)]
        weight = kernels.unpack_q4(*packed) if fmt == "q4" else kernels.unpack_q8(*packed)
        return {"t": weight.t().contiguous(), **dict(zip(PACKED[fmt], packed))}
    weight = torch.cat([dequantize(t) for t in tensors]) if len(tensors) > 1 else dequantize(tensors[0])
    return pack(weight, fmt)


def state_from_gguf(gguf: GGUF, config, fmt: str) -> dict[str, torch.Tensor]:
    """The engine's state in `fmt` from a Llama GGUF file (q and k are stored in the engine's row order)."""
    t = gguf.tensors
    state: dict[str, torch.Tensor] = {}
    for i in range(config.num_hidden_layers):
        b = f"blk.{i}."
        groups = {
            "qkv": [t[b + "attn_q.weight"], t[b + "attn_k.weight"], t[b + "attn_v.weight"]],
            "o": [t[b + "attn_output.weight"]],
            "gate_up": [t[b + "ffn_gate.weight"], t[b + "ffn_up.weight"]],
            "down": [t[b + "ffn_down.weight"]],
        }
        for name, tensors in groups.items():
            state.update({f"layers.{i}.{name}.{key}": v for key, v in _matrix(tensors, fmt).items()})
        state[f"layers.{i}.attn_norm"] = dequantize(t[b + "attn_norm.weight"]).reshape(-1).clone()
        state[f"layers.{i}.mlp_norm"] = dequantize(t[b + "ffn_norm.weight"]).reshape(-1).clone()
    state["embedding"] = dequantize(t["token_embd.weight"]).contiguous()
    state["norm"] = dequantize(t["output_norm.weight"]).reshape(-1).clone()
    head = t.get("output.weight", t["token_embd.weight"])
    state.update({f"lm_head.{key}": v for key, v in _matrix([head], head_format(fmt)).items()})
    return state


def source_formats(gguf: GGUF) -> dict[str, str]:
    """The types of the layers' matrices and of the output head (the tied embedding where there is no output)."""
    t = gguf.tensors
    layers = sorted({x.kind for name, x in t.items() if name.startswith("blk.") and x.rows > 1})
    head = t.get("output.weight", t.get("token_embd.weight"))
    return {"layers": "+".join(layers) or "F32", "output": head.kind if head else ""}


def readable(gguf: GGUF) -> bool:
    """Whether every matrix of the file is a type `state_from_gguf` reads."""
    return gguf.metadata.get("general.architecture") == "llama" and all(
        tensor.kind in ("F32", "F16", "Q4_1", "Q8_0") for tensor in gguf.tensors.values()
    )


def _hf_rows(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """q or k rows from a GGUF file's order (rotary pairs side by side) back to transformers' (halves)."""
    heads = weight.shape[0] // head_dim
    return weight.view(heads, head_dim // 2, 2, -1).transpose(1, 2).reshape(weight.shape).contiguous()


def transformers_state(gguf: GGUF, config) -> dict[str, torch.Tensor]:
    """The fp32 weights of a Llama GGUF file under transformers' names and in its q/k row order."""
    t, head_dim = gguf.tensors, config.head_dim
    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
             "ffn_norm": "post_attention_layernorm"}  # fmt: skip
    state = {}
    for i in range(config.num_hidden_layers):
        for ours, theirs in names.items():
            weight = dequantize(t[f"blk.{i}.{ours}.weight"])
            if ours in ("attn_q", "attn_k"):
                weight = _hf_rows(weight, head_dim)
            state[f"model.layers.{i}.{theirs}.weight"] = weight.reshape(-1) if "norm" in ours else weight
    state["model.embed_tokens.weight"] = dequantize(t["token_embd.weight"])
    state["model.norm.weight"] = dequantize(t["output_norm.weight"]).reshape(-1)
    if "output.weight" in t:
        state["lm_head.weight"] = dequantize(t["output.weight"])
    return state


def transformers_model(gguf: GGUF, config, dtype: torch.dtype, attention: str):
    """A transformers Llama model with a GGUF file's weights, built without transformers' GGUF loader (which
    dequantizes in Python, 20 s for 135M parameters): the same values, in a second."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    if isinstance(config, LlamaShape):
        config = config.to_transformers()
    config._attn_implementation = attention
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attention)
    missing, unexpected = model.load_state_dict(transformers_state(gguf, config), strict=False, assign=True)
    if unexpected or [name for name in missing if name != "lm_head.weight"]:
        raise PipelineError(f"the GGUF file's tensors do not fit a Llama model: missing {missing[:3]}")
    model.tie_weights()
    return model.to(dtype).eval()


# ------------------------------------------------------------------ the packed engine, cached

_PACKAGE = Path(__file__).resolve().parent
CACHE_VERSION = 1


def code_digest() -> str:
    """The code that decides the packed state's bytes: this module, the engine and the quantizers."""
    digest = hashlib.sha1(str(CACHE_VERSION).encode())
    for name in ("engine_weights.py", "engine.py", "kernels/__init__.py"):
        digest.update((_PACKAGE / name).read_bytes())
    return digest.hexdigest()[:12]


def cache_file(folder: Path, source: Path, fmt: str) -> Path:
    """Where the engine packed in `fmt` from `source` is kept: beside that model's cache, named by what it
    depends on (the source file's identity, the format, this code, torch's version)."""
    stat = source.stat()
    key = json.dumps([str(source.resolve()), stat.st_size, stat.st_mtime_ns, fmt, code_digest(), torch.__version__])
    return folder / "engine" / f"{fmt}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.safetensors"


def save_tensors(file: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bool:
    """Write tensors atomically (a parallel job may write the same file), then prune the folder's older files.

    A full or read-only disk only costs the cache: the half-written file is removed, one warning names the
    folder and the fix, and the next process computes the tensors again. True when the file was written."""
    from safetensors.torch import save_file

    from pipeline import cache

    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        tmp.replace(file)
    except Exception as error:
        if cache.is_write_error(error):
            return cache.refused(file, tmp, error)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    prune_engine_folder(file.parent)
    return True


def load_tensors(file: Path) -> dict[str, torch.Tensor] | None:
    """What `save_tensors` wrote (memory-mapped), None when there is none or it is damaged."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (OSError, ValueError, RuntimeError):
        return None
    mark_used(file)
    return tensors


def save_state(file: Path, state: dict[str, torch.Tensor], config) -> bool:
    """Write the packed state and its config as `save_tensors` writes (atomic, pruned, a full disk warned of)."""
    return save_tensors(file, state, metadata={"config": config.to_json_string()})


# how many files of one kind a model's engine folder keeps, the ones used last: packed states per format (a
# change to this code or torch gives new ones; the old stay useful only to a checkout of the old code) and
# shared prefixes (one per prompt template, numerics and code)
KEEP_STATES = 2
KEEP_PREFIXES = 8
STALE_TMP_S = 3600.0  # a temporary file this old was left by a process killed while writing


def mark_used(file: Path) -> None:
    """Mark a cached file as just used (its mtime), so pruning removes the files unused longest."""
    try:
        os.utime(file)
    except OSError:  # a read-only cache: pruning there is not ours to do either
        pass


def prune_engine_folder(folder: Path, keep_states: int = KEEP_STATES, keep_prefixes: int = KEEP_PREFIXES) -> list[Path]:
    """Remove all but the `keep_*` files of each kind used last, and stale temporary files; what was removed.

    Without it every change to the engine's code left another 0.7 GB packed state behind: one cache grew to
    18 GB, and a CI run on that machine failed with a full disk."""
    groups: dict[str, list[tuple[float, str, Path]]] = {}
    removed: list[Path] = []
    now = time.time()
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        try:
            mtime = entry.stat().st_mtime
        except OSError:  # removed by a parallel job
            continue
        if entry.name.startswith(".") and entry.name.endswith(".tmp"):
            if now - mtime > STALE_TMP_S:
                try:
                    entry.unlink(missing_ok=True)
                except OSError:  # another user's, or a folder of that name
                    continue
                removed.append(entry)
        elif entry.suffix == ".safetensors" and "-" in entry.name:
            groups.setdefault(entry.name.split("-", 1)[0], []).append((mtime, entry.name, entry))
    for kind, files in groups.items():
        keep = keep_prefixes if kind == "prefix" else keep_states
        for *_, entry in sorted(files, reverse=True)[keep:]:
            try:
                entry.unlink(missing_ok=True)
            except OSError:
                continue
            removed.append(entry)
    return removed


def load_state(file: Path):
    """(config, state) from a cached file, the tensors memory-mapped; None when there is none or it is damaged."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            config = LlamaShape.from_dict(json.loads(handle.metadata()["config"]))
            state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open has no iter)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError):
        return None
    mark_used(file)
    return config, state


# ------------------------------------------------------------------ where the engine's weights come from


class Source:
    """What the engine backend loads: tokenizer, config, source formats, the packed state, the transformers model.

    A Llama GGUF file the reader here understands gives all but the transformers model without loading it (the
    packed state from the cache, or from the file's blocks); anything else loads the transformers model first.
    """

    def __init__(self, model_cfg, seed: int = 0):
        from pipeline.models import _cache_folder, embedded_gguf, local_model_path, model_cache_dir

        self.model_cfg, self.seed, self.cache_dir = model_cfg, seed, model_cache_dir(model_cfg)
        self.gguf_path: Path | None = None
        if not model_cfg.random_weights and model_cfg.source == "embedded":
            self.gguf_path = embedded_gguf()
        elif not model_cfg.random_weights and model_cfg.source == "local" and str(model_cfg.path).endswith(".gguf"):
            self.gguf_path = local_model_path(model_cfg.path)
        self.parsed = read_gguf(self.gguf_path) if self.gguf_path else None
        if self.parsed is not None and not readable(self.parsed):
            self.parsed = None
        self._loaded = None
        if self.parsed is not None:
            from pipeline.models import _prepare_tokenizer, gguf_tokenizer

            self.tokenizer = gguf_tokenizer(self.gguf_path, self.cache_dir, light=True)
            _prepare_tokenizer(self.tokenizer)
            self.config = llama_config(self.parsed)
            self.formats = source_formats(self.parsed)
            self.description = str(self.gguf_path)
            self.folder = _cache_folder(self.gguf_path, self.cache_dir)
        else:
            loaded = self.transformers_model()
            self.tokenizer, self.config = loaded.tokenizer, loaded.model.config
            self.formats, self.description = loaded.source_formats, loaded.source

    def prefix_file(self, prefix: list[int], numerics: str) -> Path:
        """Where the keys and values of a shared prompt prefix are kept for this source and engine numerics."""
        key = json.dumps([str(self.gguf_path), self.gguf_path.stat().st_mtime_ns, prefix, numerics, code_digest()])
        return self.folder / "engine" / f"prefix-{hashlib.sha1(key.encode()).hexdigest()[:16]}.safetensors"

    def bf16_file(self, fmt: str) -> Path | None:
        """Where the bf16 GEMM's copies of the weights packed in `fmt` are kept (Engine.bf16_copies); None
        without a GGUF source."""
        return cache_file(self.folder, self.gguf_path, f"bf16.{fmt}") if self.parsed is not None else None

    def transformers_model(self):
        """The fp32 transformers model of these weights (loaded on first use: the loss pass, fidelity)."""
        if self._loaded is None:
            from pipeline.models import load_model

            self._loaded = load_model(self.model_cfg, torch.device("cpu"), torch.float32, "sdpa", self.seed)
        return self._loaded

    def state(self, fmt: str, log=print) -> tuple[dict[str, torch.Tensor], str]:
        """The engine's packed weights in `fmt` and how they were had: the cache, the GGUF blocks, or the model."""
        from pipeline.engine import state_from_model

        if self.parsed is None:
            return state_from_model(self.transformers_model().model, fmt), "packed from the transformers model"
        file = cache_file(self.folder, self.gguf_path, fmt)
        cached = load_state(file)
        if cached is not None:
            return cached[1], f"cached ({file.name})"
        state = state_from_gguf(self.parsed, self.config, fmt)
        # written when the process ends (a second of disk writes, kept out of the ready time and the stages; a
        # process killed before then only leaves the next one to pack again)
        atexit.register(save_state, file, state, self.config)
        return state, "read from the GGUF blocks"
