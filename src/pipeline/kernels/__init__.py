"""Weight-only quantized linear layers (4-bit and 8-bit, groups of 32) with an AVX2 kernel of our own.

Formats (both lossless for the SmolLM2 GGUF, whose layers are Q4_1 and whose embedding/lm_head is Q8_0):
  q4: per group of 32 weights along K, w = d * q + m with q in 0..15. qweight uint8 [N, K/2], byte j of a
      group holds element j in its low nibble and element j + 16 in its high nibble; scales, mins fp32 [N, K/32].
  q8: per group of 32, w = d * q with q int8. qweight int8 [N, K]; scales fp32 [N, K/32].

`q4_linear` / `q8_linear` compute x @ dequant(W).T for fp32 x of shape [..., K]. The kernel (qlinear.cpp)
is compiled on first use with torch.utils.cpp_extension (20 s on an idle 2-core machine, a minute on a
busy one; then cached under ~/.cache/torch_extensions, and a later process loads it in ~0.2 s) and
registered as torch.ops.pipeline.q4_linear / q8_linear, with fake implementations so that torch.compile
traces through them. Without a compiler or AVX2 the same functions dequantize and call torch's matmul:
correct, slow; `available()` and `unavailable_reason()` say which. Call `available()` before
torch.compile so the extension is not built while tracing. The kernel splits N over
torch.get_num_threads() threads.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from pipeline.errors import PipelineError

GROUP_SIZE = 32
_SOURCE = Path(__file__).with_name("qlinear.cpp")
# One build folder per checkout: two copies of the project sharing ~/.cache/torch_extensions under one
# name would rebuild each other's extension on every first call (a build command names its source path).
_EXTENSION_NAME = "pipeline_qlinear_" + hashlib.sha1(str(_SOURCE.resolve()).encode()).hexdigest()[:8]
# what the calibration's cache key holds, so that a changed kernel is measured again
SOURCE_DIGEST = hashlib.sha1(_SOURCE.read_bytes()).hexdigest()[:12]
# Set to 1 to skip the extension and always take the dequantize + matmul path.
_DISABLE_ENV = "PIPELINE_DISABLE_KERNELS"


class _State:
    loaded: bool | None = None  # None: not tried yet
    reason: str = ""


_state = _State()


def _load() -> None:
    """Build (or reuse the cached build of) the extension and register its fake implementations, once."""
    if _state.loaded is not None:
        return
    _state.loaded, _state.reason = False, ""
    if os.environ.get(_DISABLE_ENV, "") not in ("", "0"):
        _state.reason = f"disabled by {_DISABLE_ENV}={os.environ[_DISABLE_ENV]}"
        return
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        _state.reason = f"the CPU lacks AVX2+FMA (torch reports {capability})"
        return
    try:
        from torch.utils import cpp_extension

        cpp_extension.load(
            name=_EXTENSION_NAME,
            sources=[str(_SOURCE)],
            extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-DNDEBUG"],
            # the process already holds torch's libgomp.so.1, so this links to the same OpenMP runtime
            # and follows torch.set_num_threads
            extra_ldflags=["-fopenmp"],
            is_python_module=False,  # the .so registers torch ops; no Python bindings to compile
            verbose=False,
        )
    except Exception as error:  # no compiler, no ninja, a failed build: all mean "use the fallback"
        _state.reason = f"building {_SOURCE.name} failed: {_first_error_line(error)}"
        return
    _register_fakes()
    _state.loaded = True


def _first_error_line(error: Exception) -> str:
    """The compiler's first `error:` line if there is one (the build log starts with the whole command)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    return next((line for line in lines if "error:" in line), lines[0])[:300]


def _register_fakes() -> None:
    """Shapes-only implementations, so torch.compile / FakeTensor tracing sees the output shape."""
    if getattr(_register_fakes, "done", False):
        return

    @torch.library.register_fake("pipeline::q4_linear")
    def _(x, qweight, scales, mins, int8_x=False):
        return x.new_empty((*x.shape[:-1], qweight.shape[0]))

    @torch.library.register_fake("pipeline::q8_linear")
    def _(x, qweight, scales, int8_x=False):
        return x.new_empty((*x.shape[:-1], qweight.shape[0]))

    @torch.library.register_fake("pipeline::decoder_layer")
    def _(*args, **kwargs):  # updates h and the caches in place, returns nothing
        return None

    _register_fakes.done = True


def available() -> bool:
    """Whether the AVX2 kernel is in use (builds or loads it on the first call)."""
    _load()
    return bool(_state.loaded)


def unavailable_reason() -> str:
    """One line saying why the kernel is not in use; empty when it is."""
    _load()
    return _state.reason


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
    if available():
        return torch.ops.pipeline.q4_linear(x, qweight, scales, mins, int8_x)
    return x @ dequantize_q4(qweight, scales, mins).t()


def q8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, int8_x: bool = False) -> torch.Tensor:
    """x [..., K] fp32 @ dequantize_q8(...).T -> [..., N] fp32 (`int8_x`: see `Engine`'s activations)."""
    if available():
        return torch.ops.pipeline.q8_linear(x, qweight, scales, int8_x)
    return x @ dequantize_q8(qweight, scales).t()
