"""`precision=auto` measures instead of guessing: a few seconds of matmuls on this machine, cached.

Which weight format decodes fastest depends on the CPU (AVX2-only machines run bf16 GEMM 5x slower than
fp32 and take a scalar path in torch's int8 kernel with fp32 activations; AVX512-BF16 machines do the
opposite), so the choice is measured: the linear layers of one decoding step (M=1 row) and of one batched
step (M=32 rows) at the model's real shapes, with random weights (timing does not depend on values), for

- the engine's decode formats: fp32 (x @ W.T), q8 and q4 (our kernels), and q8/q4 with int8 activations
  for one row (`q8x8`, `q4x8`: x quantized per 32 values, llama.cpp's scheme);
- the transformers backend's: fp32 and bf16 (F.linear) and int8 (torch's `_weight_int8pack_mm`).

Results are cached per CPU, thread count, torch version and model shape in the model cache folder, so
later runs pay nothing. `precision=auto` never picks what was measured slower, and an explicit choice that
measured slower than fp32 gets one warning naming the faster one.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROWS = (1, 4, 8, 16, 32)  # M values measured; 1 is a decode step, 32 a full batched step
# a choice counts as slower when it takes this much longer than the reference
SLOWER = 1.15
# int8 activations are not bit-exact, so auto takes them only for a clear gain (at least 5%)
INT8_GAIN = 1.05
X8 = "x8"  # suffix of an engine format with int8 activations for one row


@dataclass
class Shapes:
    hidden: int
    intermediate: int
    qkv_out: int  # q + k + v output features
    vocab: int
    layers: int

    @classmethod
    def of(cls, config) -> Shapes:
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            config.hidden_size,
            config.intermediate_size,
            (heads + 2 * kv_heads) * head_dim,
            config.vocab_size,
            config.num_hidden_layers,
        )

    def matrices(self) -> list[tuple[int, int, int]]:
        """(out features, in features, how many per step): fused qkv, o, fused gate/up, down, lm_head."""
        h, i = self.hidden, self.intermediate
        return [(self.qkv_out, h, self.layers), (h, h, self.layers), (2 * i, h, self.layers), (h, i, self.layers),
                (self.vocab, h, 1)]  # fmt: skip


@dataclass
class Calibration:
    # step time in ms of each candidate, per number of rows: {"engine:q4": {"1": 9.1, "32": 80.2}, ...}
    step_ms: dict[str, dict[str, float]]
    machine: str
    seconds: float  # how long measuring took

    def time(self, candidate: str, rows: int) -> float:
        return self.step_ms.get(candidate, {}).get(str(rows), float("inf"))

    def engine_format(self, int8_activations: bool = False, allowed: tuple[str, ...] | None = None) -> str:
        """The engine's fastest decode format for one row among `allowed` (those exact for the source weights;
        None: any); fp32 on ties.

        With `int8_activations` (precision.activations auto or int8) a format counts at its better time, with
        or without int8 activations: q8 can be faster than q4 with fp32 activations and slower with int8 ones.
        """
        formats = [c.split(":", 1)[1] for c in self.step_ms if c.startswith("engine:") and not c.endswith(X8)]
        formats = [f for f in formats if allowed is None or f in allowed] or ["fp32"]

        def best(f: str) -> float:
            x8 = self.time(f"engine:{f}{X8}", 1) * INT8_GAIN if int8_activations else float("inf")
            return min(self.time(f"engine:{f}", 1), x8)

        return min(formats, key=lambda f: (best(f), f != "fp32"))

    def kernel_rows(self, fmt: str) -> int:
        """The most rows for which the format's kernel is no slower than fp32 GEMM (then GEMM takes over)."""
        best = 0
        for rows in ROWS:
            if self.time(f"engine:{fmt}", rows) <= self.time("engine:fp32", rows):
                best = rows
        return best

    def int8_activations(self, fmt: str) -> bool:
        """Whether int8 activations measured faster than fp32 ones for a decode step in `fmt` (by INT8_GAIN)."""
        return self.time(f"engine:{fmt}{X8}", 1) * INT8_GAIN < self.time(f"engine:{fmt}", 1)

    def transformers_dtype(self) -> str:
        """fp32 or bf16 for transformers: bf16 only where it measured faster both for one row and for a batch."""
        faster = all(self.time("transformers:bf16", r) < self.time("transformers:fp32", r) for r in (1, 32))
        return "bf16" if faster else "fp32"

    def slower_than_fp32(self, candidate: str) -> str:
        """A warning when `candidate` measured slower than fp32 on the same backend ('' when it is not)."""
        backend = candidate.split(":", 1)[0]
        reference = f"{backend}:fp32"
        if candidate not in self.step_ms or reference not in self.step_ms:
            return ""  # not measured here (no kernel of ours): the caller says what runs instead
        worst = max(ROWS, key=lambda r: self.time(candidate, r) / self.time(reference, r))
        ratio = self.time(candidate, worst) / self.time(reference, worst)
        if ratio <= SLOWER:
            return ""
        kind = "a decode step" if worst == 1 else f"a step of {worst} rows"
        return f"{candidate.split(':', 1)[1]} measured {ratio:.1f}x slower than fp32 for {kind} on this CPU"


def _best_ms(function, reps: int) -> float:
    """The fastest of `reps` timed calls: other work on the machine only ever adds time, so the minimum is
    the closest to what the kernel itself costs (a median taken on a busy machine picks different winners)."""
    function()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def _engine_linear(weight: torch.Tensor, fmt: str):
    from pipeline import kernels

    int8_x = fmt.endswith(X8)
    fmt = fmt.removesuffix(X8)
    if fmt == "q4":
        packed = kernels.quantize_q4(weight)
        return lambda x: kernels.q4_linear(x, *packed, int8_x=int8_x)
    if fmt == "q8":
        packed = kernels.quantize_q8(weight)
        return lambda x: kernels.q8_linear(x, *packed, int8_x=int8_x)
    weight_t = weight.t().contiguous()
    return lambda x: x @ weight_t


def _transformers_linear(weight: torch.Tensor, fmt: str):
    if fmt == "int8" and not _int8_activations_bf16():  # what WeightOnlyInt8Linear does then
        return _engine_linear(weight, "q8") if _kernels_available() else _aten_int8(weight)
    if fmt == "int8":
        return _aten_int8(weight)
    dtype = torch.bfloat16 if fmt == "bf16" else torch.float32
    cast = weight.to(dtype)
    return lambda x: F.linear(x.to(dtype), cast)


def _kernels_available() -> bool:
    from pipeline import kernels

    return kernels.available()


def _aten_int8(weight: torch.Tensor):
    scales = weight.abs().amax(dim=1) / 127
    quantized = (weight / scales[:, None]).round().to(torch.int8)
    # the kernel wants its scales in the activations' dtype (bf16 activations: bf16 scales), as quantize.py keeps them
    by_dtype = {dtype: scales.to(dtype) for dtype in (torch.float32, torch.bfloat16)}
    return lambda x: torch.ops.aten._weight_int8pack_mm(x, quantized, by_dtype[x.dtype])


def candidates() -> list[str]:
    """The formats measured here: the engine's (q4/q8 only where our kernel is built) and transformers'."""
    from pipeline import kernels

    engine = ["fp32", *(("q8", "q4", f"q8{X8}", f"q4{X8}") if kernels.available() else ())]
    return [f"engine:{f}" for f in engine] + [f"transformers:{f}" for f in ("fp32", "bf16", "int8")]


def measure(shapes: Shapes, names: list[str], reps: int = 5) -> dict[str, dict[str, float]]:
    """Step time in ms of each candidate for each row count in ROWS (the lm_head counted for one row only)."""
    generator = torch.Generator().manual_seed(0)
    weights = {(n, k): torch.randn(n, k, generator=generator) * 0.02 for n, k, _ in shapes.matrices()}
    step_ms: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        for name in names:
            backend, fmt = name.split(":", 1)
            make = _engine_linear if backend == "engine" else _transformers_linear
            linears = {key: make(w, fmt) for key, w in weights.items()}
            step_ms[name] = {}
            for rows in ROWS:
                if name.endswith(X8) and rows > 1:  # the flag changes one-row products only
                    step_ms[name][str(rows)] = step_ms[name.removesuffix(X8)][str(rows)]
                    continue
                total = 0.0
                for n, k, count in shapes.matrices():
                    x = torch.randn(rows if count > 1 else 1, k, generator=generator)
                    if backend == "transformers" and fmt == "int8":
                        x = x.to(torch.bfloat16 if _int8_activations_bf16() else torch.float32)
                    total += count * _best_ms(lambda f=linears[(n, k)], x=x: f(x), reps)
                step_ms[name][str(rows)] = round(total, 3)
            # fewer rows never take longer than more rows: where a busy moment says so, trust the larger count
            for smaller, larger in zip(ROWS[-2::-1], ROWS[:0:-1]):
                step_ms[name][str(smaller)] = min(step_ms[name][str(smaller)], step_ms[name][str(larger)])
    return step_ms


def _int8_activations_bf16() -> bool:
    from pipeline.models import resolve_dtype

    return resolve_dtype("int8", torch.device("cpu")) == torch.bfloat16


def machine_key(shapes: Shapes, names: list[str]) -> str:
    """What the measurement depends on: CPU model and flags, threads, torch version, shapes, candidates, and
    the source of our kernels, the CPU kind in force and the kernel build it loads."""
    from pipeline import cpu, kernels
    from pipeline.environment import cpuinfo_field

    text = json.dumps(
        [cpuinfo_field("model name"), cpuinfo_field("flags"), platform.machine(), torch.get_num_threads(),
         torch.__version__, asdict(shapes), names, kernels.SOURCE_DIGEST, cpu.current().describe(), kernels.isa()],
        sort_keys=True,
    )  # fmt: skip
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def calibrate(shapes: Shapes, cache_dir: Path, log=print) -> Calibration:
    """The cached calibration for this machine and model shape, measured now if there is none."""
    names = candidates()
    key = machine_key(shapes, names)
    file = cache_dir / "calibration" / f"{key}.json"
    if file.is_file():
        try:
            return Calibration(**json.loads(file.read_text()))
        except (TypeError, ValueError):
            pass  # an old or damaged file: measure again
    log("calibrating weight formats on this machine (once; cached in " + str(file.parent) + ")")
    start = time.perf_counter()
    step_ms = measure(shapes, names)
    from pipeline.environment import cpuinfo_field

    result = Calibration(step_ms, cpuinfo_field("model name") or platform.machine(), time.perf_counter() - start)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(f".{time.time_ns()}.tmp")
    tmp.write_text(json.dumps(asdict(result), indent=1))
    tmp.replace(file)
    return result
