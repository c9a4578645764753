"""Weight-only quantized linear layers (4-bit and 8-bit, groups of 32) with kernels of our own per instruction set.

Formats:
  q4: per group of 32 weights along K, w = d * q + m with q in 0..15. qweight uint8 [N, K/2], byte j of a
      group holds element j in its low nibble and element j + 16 in its high nibble; scales, mins fp32 [N, K/32].
      Exact for GGUF Q4_1 layers (llama.cpp's Q4_1 puts each block's min and max on q = 0 and 15).
  q8: per group of 32, w = d * q with q int8. qweight int8 [N, K]; scales fp32 [N, K/32]. Exact for Q8_0.

`q4_linear` / `q8_linear` compute x @ dequant(W).T for fp32 x of shape [..., K]. The kernel source
(qlinear.cpp) is compiled once per instruction set the CPU kind calls for (pipeline.cpu: avx2, or avx512
with what its CPU adds), with torch.utils.cpp_extension (10 to 60 s; then cached under
$TORCH_EXTENSIONS_DIR; a later process loads the library file a process before it loaded, if unchanged,
without importing cpp_extension), registered as torch.ops.pipeline_<isa>.*
with fake implementations so that torch.compile traces through them, and checked against the portable
reference before it is used. A build that fails or computes wrong is remembered per source and flags
(not retried by every process) and said once: `available()`, `unavailable_reason()`, `describe()`. Without
a kernel these functions dequantize and call torch's matmul (the reference: correct, slow); the engine
then dequantizes q4/q8 weights once at load instead. The kernel splits N over torch.get_num_threads().
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.errors import PipelineError

GROUP_SIZE = 32
_SOURCE = Path(__file__).with_name("qlinear.cpp")
# what the calibration's cache key holds, so that a changed kernel is measured again
SOURCE_DIGEST = hashlib.sha1(_SOURCE.read_bytes()).hexdigest()[:12]
# Set to 1 to skip the extension and always take the portable path.
_DISABLE_ENV = "PIPELINE_DISABLE_KERNELS"
# Set to 1 to build again although an earlier build of this source failed (it is remembered, not retried).
REBUILD_ENV = "PIPELINE_REBUILD_KERNELS"
# compiler flags per instruction set (pipeline.cpu.KERNEL_ISAS); the source adds what each ISA has under #if
ISA_FLAGS = {
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"],
    # VNNI: one vpdpbusd per int8 dot product of a block where AVX2 needs maddubs + madd
    "avx512vnni": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni"],
}


def _extension_name(isa: str) -> str:
    # One build folder per checkout and ISA: two copies of the project sharing ~/.cache/torch_extensions under
    # one name would rebuild each other's extension on every first call (a build command names its source path).
    return f"pipeline_qlinear_{isa}_" + hashlib.sha1(str(_SOURCE.resolve()).encode()).hexdigest()[:8]


@dataclass
class _State:
    loaded: bool = False
    reason: str = ""  # why the kernel is not in use ('' when it is)


_states: dict[str | None, _State] = {}  # per kernel ISA (None: the kind has no kernel), tried once per process


def _failure_marker(isa: str) -> Path:
    """Where a failed build of this source for `isa` is remembered, so that later processes do not retry it."""
    from pipeline.models import default_cache_dir

    digest = hashlib.sha1((SOURCE_DIGEST + " ".join(ISA_FLAGS[isa]) + torch.__version__).encode()).hexdigest()[:12]
    return default_cache_dir() / "kernels" / f"{_extension_name(isa)}-{digest}.failed"


def _load(isa: str | None) -> _State:
    """Build (or reuse the cached build of) the extension for `isa` and check it, once per process."""
    if isa in _states:
        return _states[isa]
    state = _states[isa] = _State()
    if os.environ.get(_DISABLE_ENV, "") not in ("", "0"):
        state.reason = f"disabled by {_DISABLE_ENV}={os.environ[_DISABLE_ENV]}"
        return state
    if isa is None:
        from pipeline import cpu

        state.reason = f"CPU kind {cpu.current().describe()}: no kernel of ours runs here (it needs AVX2 + FMA)"
        return state
    marker = _failure_marker(isa)
    if marker.is_file() and os.environ.get(REBUILD_ENV, "") in ("", "0"):
        state.reason = f"{marker.read_text().strip()} (remembered; delete {marker} or set {REBUILD_ENV}=1 to retry)"
        return state
    name = _extension_name(isa)
    try:
        if not _load_built(isa):
            from torch.utils import cpp_extension

            cpp_extension.load(
                name=name,
                sources=[str(_SOURCE)],
                extra_cflags=_cflags(isa),
                # the process already holds torch's libgomp.so.1, so this links to the same OpenMP runtime
                # and follows torch.set_num_threads
                extra_ldflags=["-fopenmp"],
                is_python_module=False,  # the .so registers torch ops; no Python bindings to compile
                verbose=False,
            )
            _remember_built(isa, Path(cpp_extension._get_build_directory(name, False)) / f"{name}.so")
        _register_fakes(isa)
        error = _self_test(isa)
    except Exception as failure:  # no compiler, no ninja, a failed build: all mean "use the portable path"
        error = f"building {_SOURCE.name} for {isa} failed: {_first_error_line(failure)}"
    if error:
        state.reason = error
        from pipeline import cache

        if re.search(DISK_ERRORS, error):  # no property of the source: not remembered, the next process builds again
            state.reason = (
                f"{error} (free disk space in $TORCH_EXTENSIONS_DIR and the temporary folder, or point them elsewhere)"
            )
        else:
            cache.write_text(marker, error + "\n")
        return state
    state.loaded = True
    return state


def _cflags(isa: str) -> list[str]:
    return ["-O3", *ISA_FLAGS[isa], "-fopenmp", "-DNDEBUG", f"-DPIPELINE_NS=pipeline_{isa}"]


def _built_record(isa: str) -> tuple[Path, dict]:
    """Where the build last loaded for `isa` is remembered, and what it must still match to be loaded directly:
    this source, its flags, torch's version and the extensions folder asked for."""
    from pipeline.models import default_cache_dir

    key = {"source": SOURCE_DIGEST, "flags": _cflags(isa), "torch": torch.__version__,
           "extensions_dir": os.environ.get("TORCH_EXTENSIONS_DIR", ""), "python": sys.version}  # fmt: skip
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return default_cache_dir() / "kernels" / f"{_extension_name(isa)}-{digest}.built.json", key


def _load_built(isa: str) -> bool:
    """Loads the build a process before this one made or checked, without torch.utils.cpp_extension (its import
    alone took 60-140 ms of every warm start: it imports setuptools), where the library file is the very one it
    loaded (path, size and modification time). False (nothing loaded): build or check it as before."""
    if os.environ.get(REBUILD_ENV, "") not in ("", "0"):
        return False
    record, key = _built_record(isa)
    try:
        built = json.loads(record.read_text())
        library = Path(built["library"])
        stat = library.stat()
        if built["key"] != key or [stat.st_size, stat.st_mtime_ns] != built["stat"]:
            return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    try:
        torch.ops.load_library(str(library))
    except (OSError, RuntimeError):
        return False  # cpp_extension builds or loads it again, and says what is wrong if anything is
    return hasattr(torch.ops, f"pipeline_{isa}")


def _remember_built(isa: str, library: Path) -> None:
    from pipeline import cache

    record, key = _built_record(isa)
    try:
        stat = library.stat()
    except OSError:
        return  # not where cpp_extension builds it: the next process asks cpp_extension again
    built = {"key": key, "library": str(library), "stat": [stat.st_size, stat.st_mtime_ns]}
    cache.write_text(record, json.dumps(built))


# a build that failed for one of these reasons says nothing about the source and is not remembered
DISK_ERRORS = r"No space left|Disk quota exceeded|Read-only file system|File too large"


def _self_test(isa: str) -> str:
    """'' when the fresh build computes what the portable reference does, else why not (then it is not used)."""
    generator = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 64, generator=generator), torch.randn(40, 64, generator=generator)
    ops = getattr(torch.ops, f"pipeline_{isa}")
    q4, q8 = quantize_q4(w), quantize_q8(w)
    for name, got, want in (
        ("q4_linear", ops.q4_linear(x, *q4), x @ dequantize_q4(*q4).t()),
        ("q8_linear", ops.q8_linear(x, *q8), x @ dequantize_q8(*q8).t()),
    ):
        error = float((got - want).abs().max())
        if not error <= 1e-3:  # NaN fails too
            return f"the {isa} build of {name} is off by {error:.3g} from the reference"
    return ""


def _first_error_line(error: Exception) -> str:
    """The compiler's first `error:` line if there is one (the build log starts with the whole command)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    return next((line for line in lines if "error:" in line), lines[0])[:300]


def _register_fakes(isa: str) -> None:
    """Shapes-only implementations, so torch.compile / FakeTensor tracing sees the output shape."""
    ns = f"pipeline_{isa}"
    if ns in _faked:
        return

    @torch.library.register_fake(f"{ns}::q4_linear")
    def _(x, qweight, scales, mins, int8_x=False):
        return x.new_empty((*x.shape[:-1], qweight.shape[0]))

    @torch.library.register_fake(f"{ns}::q8_linear")
    def _(x, qweight, scales, int8_x=False):
        return x.new_empty((*x.shape[:-1], qweight.shape[0]))

    @torch.library.register_fake(f"{ns}::q4_dequantize")
    def _(qweight, scales, mins, rows=None):
        return scales.new_empty((qweight.shape[0] if rows is None else rows.shape[0], 2 * qweight.shape[1]))

    @torch.library.register_fake(f"{ns}::q8_dequantize")
    def _(qweight, scales, rows=None):
        return scales.new_empty((qweight.shape[0] if rows is None else rows.shape[0], qweight.shape[1]))

    @torch.library.register_fake(f"{ns}::q4_gemm_i8")
    def _(x, tiles, split=False):
        return x.new_empty((*x.shape[:-1], tiles.shape[0] * TILE_OUTPUTS))

    @torch.library.register_fake(f"{ns}::round_bf16")
    def _(x):
        return x.new_empty(x.shape, dtype=torch.bfloat16)

    @torch.library.register_fake(f"{ns}::decoder_layer")
    def _(*args, **kwargs):  # updates h and the caches in place, returns nothing
        return None

    _faked.add(ns)


_faked: set[str] = set()


def _current() -> tuple[str | None, _State]:
    from pipeline import cpu

    global _in_use
    isa = cpu.current().kernel_isa
    state = _load(isa)
    _in_use = getattr(torch.ops, f"pipeline_{isa}") if state.loaded else None
    return isa, state


# the op namespace the last look found in use: what code being traced by torch.compile reads (tracing cannot
# read the CPU's flags or the build cache), hence "call available() before torch.compile"
_in_use = None


def _ops_for_call():
    """The op namespace to call now, or None for the portable path."""
    if torch.compiler.is_compiling():
        return _in_use
    isa, state = _current()
    return _in_use if state.loaded else None


def available() -> bool:
    """Whether a kernel build of ours runs for the CPU kind in force (builds or loads it on the first call)."""
    return _current()[1].loaded


def unavailable_reason() -> str:
    """One line saying why no kernel is in use; empty when one is."""
    return _current()[1].reason


def isa() -> str | None:
    """The instruction set of the kernel build in use (avx2, avx512), None when none is."""
    current_isa, state = _current()
    return current_isa if state.loaded else None


def ops():
    """The op namespace of the kernel build in use (torch.ops.pipeline_avx2, ...); call `available()` first."""
    current_isa, state = _current()
    if not state.loaded:
        raise PipelineError(f"no kernel of ours is in use: {state.reason}")
    return getattr(torch.ops, f"pipeline_{current_isa}")


def amx_attention() -> bool:
    """Whether the shared prefix's attention can run on AMX bf16 tiles: the kind in force is `amx` (not simulated)
    and the build in use has them and was given the tiles by Linux (decoder_layer's prefix_kb/prefix_vb)."""
    from pipeline import cpu

    kind = cpu.current()
    if kind.kind != "amx" or kind.simulated or not available():
        return False
    return bool(ops().amx_attention())


def describe() -> str:
    """One line for logs and tags: the build in use, or why there is none."""
    current_isa, state = _current()
    return f"{current_isa} build of {_SOURCE.name}" if state.loaded else f"none ({state.reason})"


def _check_weight(w: torch.Tensor) -> torch.Tensor:
    if w.dim() != 2 or w.shape[1] % GROUP_SIZE != 0:
        raise PipelineError(
            f"quantizing a weight of shape {list(w.shape)}: it must be [N, K] with K a multiple of {GROUP_SIZE}"
        )
    return w.detach().float().reshape(w.shape[0], -1, GROUP_SIZE)


def quantize_q4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit per group of 32: returns (qweight uint8 [N, K/2], scales fp32 [N, K/32], mins)."""
    blocks = _check_weight(w)
    mins = blocks.amin(dim=-1)
    scales = (blocks.amax(dim=-1) - mins) / 15
    safe = torch.where(scales == 0, torch.ones_like(scales), scales)  # flat group: every q is 0
    q = ((blocks - mins[..., None]) / safe[..., None]).round().clamp(0, 15).to(torch.uint8)
    packed = q[..., :16] | (q[..., 16:] << 4)
    return packed.reshape(w.shape[0], -1).contiguous(), scales.contiguous(), mins.contiguous()


def dequantize_q4(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """The reference inverse of quantize_q4: fp32 [N, K]."""
    packed = qweight.reshape(qweight.shape[0], -1, GROUP_SIZE // 2)
    q = torch.cat([packed & 0xF, packed >> 4], dim=-1).float()
    return (q * scales[..., None] + mins[..., None]).reshape(qweight.shape[0], -1)


def unpack_q4(
    qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """`dequantize_q4` by our kernel where one runs (milliseconds for a model; the fp32 GEMM weights at load),
    else the reference. Both give the same weights up to the last bit of an fma. `rows`: only these weight rows,
    in this order (gathered by the kernel as it unpacks them)."""
    namespace = _ops_for_call()
    if namespace is not None:
        return namespace.q4_dequantize(qweight, scales, mins, rows)
    if rows is not None:
        qweight, scales, mins = qweight[rows], scales[rows], mins[rows]
    return dequantize_q4(qweight, scales, mins)


def unpack_q8(qweight: torch.Tensor, scales: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """`dequantize_q8` by our kernel where one runs, else the reference; `rows` as for unpack_q4."""
    namespace = _ops_for_call()
    if namespace is not None:
        return namespace.q8_dequantize(qweight, scales, rows)
    return dequantize_q8(qweight, scales) if rows is None else dequantize_q8(qweight[rows], scales[rows])


def quantize_q8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric 8-bit per group of 32: returns (qweight int8 [N, K], scales fp32 [N, K/32])."""
    blocks = _check_weight(w)
    scales = blocks.abs().amax(dim=-1) / 127
    safe = torch.where(scales == 0, torch.ones_like(scales), scales)
    q = (blocks / safe[..., None]).round().clamp(-127, 127).to(torch.int8)
    return q.reshape(w.shape[0], -1).contiguous(), scales.contiguous()


def dequantize_q8(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The reference inverse of quantize_q8: fp32 [N, K]."""
    q = qweight.reshape(qweight.shape[0], -1, GROUP_SIZE).float()
    return (q * scales[..., None]).reshape(qweight.shape[0], -1)


def q4_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, int8_x: bool = False
) -> torch.Tensor:
    """x [..., K] fp32 @ dequantize_q4(...).T -> [..., N] fp32 (`int8_x`: see `Engine`'s activations)."""
    namespace = _ops_for_call()
    if namespace is not None:
        return namespace.q4_linear(x, qweight, scales, mins, int8_x)
    return x @ dequantize_q4(qweight, scales, mins).t()


def q8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, int8_x: bool = False) -> torch.Tensor:
    """x [..., K] fp32 @ dequantize_q8(...).T -> [..., N] fp32 (`int8_x`: see `Engine`'s activations)."""
    namespace = _ops_for_call()
    if namespace is not None:
        return namespace.q8_linear(x, qweight, scales, int8_x)
    return x @ dequantize_q8(qweight, scales).t()


TILE_OUTPUTS = 16  # outputs side by side in the int8 products' tiles


def q4_tiles(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """q4 weights re-laid for the int8 products of many rows (`q4_gemm_i8`): uint8 [N/16, K/32, 384], per tile of
    16 outputs and block its nibbles (byte 4n + i of chunk j = byte 4j + i of output n's block), then the 16
    scales and the 16 mins in fp32. The same bits as stored: only their order changes."""
    n, half = qweight.shape
    blocks = half // (GROUP_SIZE // 2)
    if n % TILE_OUTPUTS or scales.shape != (n, blocks) or mins.shape != scales.shape:
        raise PipelineError(
            f"q4 tiles need [N, K/2] weights with N a multiple of {TILE_OUTPUTS} and scales, mins [N, K/32]; got "
            f"{list(qweight.shape)}, {list(scales.shape)}, {list(mins.shape)}"
        )
    tiles = n // TILE_OUTPUTS
    nibbles = qweight.reshape(tiles, TILE_OUTPUTS, blocks, 4, 4).permute(0, 2, 3, 1, 4).reshape(tiles, blocks, 256)

    def per_tile(t: torch.Tensor) -> torch.Tensor:
        return t.float().reshape(tiles, TILE_OUTPUTS, blocks).transpose(1, 2).contiguous().view(torch.uint8)

    return torch.cat([nibbles, per_tile(scales), per_tile(mins)], dim=-1).contiguous()


def gemm_i8_available() -> bool:
    """Whether the kernel in use has the int8 products of many rows (its AVX512 builds)."""
    return isa() in ("avx512", "avx512vnni")


def q4_gemm_i8(x: torch.Tensor, tiles: torch.Tensor, split: bool = True) -> torch.Tensor:
    """x [..., K] fp32 @ W.T for q4 weights as `q4_tiles`, x quantized to int8 per 32 values (AVX512 builds)."""
    namespace = _ops_for_call()
    if namespace is None:
        raise PipelineError(f"the int8 products of many rows need our kernel, and none runs: {unavailable_reason()}")
    return namespace.q4_gemm_i8(x, tiles, split)


def main() -> None:
    """`python -m pipeline.kernels`: build (or load) the kernel for this CPU's kind now and say which runs."""
    from pipeline import cpu

    print(f"CPU kind {cpu.current().describe()}: {describe()}")
