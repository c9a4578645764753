"""What the machine can do, measured by the bench before its rows: how busy it is, how fast it reads memory, how
many FLOPs its GEMM does per second. The rooflines are computed from these, so they are measured, not assumed."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat; None where there is no such file."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return total - idle, total


def cpu_busy_share(seconds: float = 2.0) -> float:
    """Share of all cores in use over `seconds` (NaN where /proc/stat is missing).

    The 1-minute load average lags: right after another job ends it still reads high, and a job that just started
    reads low; this says what the cores do now.
    """
    before = _cpu_times()
    time.sleep(seconds)
    after = _cpu_times()
    if before is None or after is None or after[1] == before[1]:
        return math.nan
    return (after[0] - before[0]) / (after[1] - before[1])


def read_bandwidth_gb_s(size_mb: int = 512, repeats: int = 7) -> float:
    """Memory read bandwidth: the best of `repeats` sums over a buffer far larger than the caches."""
    buffer = torch.ones(size_mb * 1024 * 1024 // 4, dtype=torch.float32)
    buffer.sum()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return buffer.numel() * 4 / best / 1e9


def gemm_gflop_s(dtype: torch.dtype, rows: int = 256, k: int = 576, n: int = 1536, repeats: int = 7) -> float:
    """The GEMM rate (best of `repeats`) at a prefill's shape: `rows` rows through a [k, n] weight."""
    x, w = torch.randn(rows, k).to(dtype), torch.randn(k, n).to(dtype)
    x @ w
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(4):
            x @ w
        best = min(best, (time.perf_counter() - start) / 4)
    return 2 * rows * k * n / best / 1e9


def int8_gop_s(rows: int = 256, k: int = 576, n: int = 1536, repeats: int = 7) -> float:
    """The int8 matrix product's rate (torch._int_mm, oneDNN's VNNI GEMM where the CPU has it: int32 sums of int8
    products) at a prefill's shape, best of `repeats`; NaN where this torch has none for the CPU."""
    x = torch.randint(-127, 128, (rows, k), dtype=torch.int8)
    w = torch.randint(-127, 128, (k, n), dtype=torch.int8)
    try:
        torch._int_mm(x, w)
    except (RuntimeError, AttributeError):
        return math.nan
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(4):
            torch._int_mm(x, w)
        best = min(best, (time.perf_counter() - start) / 4)
    return 2 * rows * k * n / best / 1e9


def roofline_s(steps: dict[str, int], layer_bytes: float, head_bytes: float, layer_params: float,
               head_params: float, bandwidth_gb_s: float, gemm_gflop_s: float, tile_rows: int = 0,
               tile_gflop_s: float = math.nan) -> float:  # fmt: skip
    """The least time a stage's work can take here: each layer pass of r rows reads the layers' weights once or
    does 2 r * params FLOPs at the GEMM rate, whichever takes longer, and the same for each full lm_head product.
    Layer passes of up to `tile_rows` rows run the int8 tiles: their FLOPs at `tile_gflop_s` (the int8 product's
    rate, halved for two digits: two products per multiply-add).

    `steps` is the engine's count of passes by rows ("32": 32 rows through every layer; "head:5": 5 rows through
    the lm_head). Attention, norms and the KV cache are left out: the weights dominate this model's steps.
    """
    total = 0.0
    for key, count in steps.items():
        head = key.startswith("head:")
        rows = int(key.removeprefix("head:"))
        weights, params = (head_bytes, head_params) if head else (layer_bytes, layer_params)
        rate = tile_gflop_s if not head and rows <= tile_rows else gemm_gflop_s
        total += count * max(weights / (bandwidth_gb_s * 1e9), 2 * rows * params / (rate * 1e9))
    return total
