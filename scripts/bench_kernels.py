"""Time the q4/q8 kernels against fp32 torch matmul on SmolLM2-135M's linear shapes; print markdown tables.

    .venv/bin/python scripts/bench_kernels.py [--threads 2] [--ms 1,2,4,8,16,32,64] [--hot] [--no-step] [--stat min]

Weights come from DRAM as in real decoding: each timed call uses the next of enough copies of the
weights to overflow the last-level cache (--hot: one copy, so that small layers are read from cache).
M = 1 is reported against the measured read bandwidth (sums over 64 MB), larger M in GFLOP/s. Times are
medians of single calls (--stat min: the fastest call, an estimate of a quiet machine when other
processes share the cores; they inflate medians, and a fork/join of two threads waits for both).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pipeline import kernels

# name, N, K, format: SmolLM2-135M with q/k/v and gate/up fused, as a decoder stores them
SHAPES = [
    ("qkv", 960, 576, "q4"),
    ("o_proj", 576, 576, "q4"),
    ("gate_up", 3072, 576, "q4"),
    ("down", 576, 1536, "q4"),
    ("lm_head", 49152, 576, "q8"),
]
LAYERS = 30
COLD_BYTES = 96 << 20  # three times the 32 MiB L3 of the EPYC this was written on
BYTES_PER_WEIGHT = {"q4": 0.5 + 8 / 32, "q8": 1 + 4 / 32, "fp32": 4.0}
OPS = {"q4": lambda: torch.ops.pipeline.q4_linear, "q8": lambda: torch.ops.pipeline.q8_linear}


def read_bandwidth_gb_s(stat, calls: int = 30) -> float:
    """Read bandwidth the cores can draw: sums over 64 MB fp32 buffers (6 of them, so none stays in cache),
    timed call by call with the same statistic as the kernels."""
    buffers = [torch.ones(16 << 20) for _ in range(6)]
    for b in buffers:
        b.sum()
    return buffers[0].numel() * 4 / stat([_timed(buffers[i % 6].sum) for i in range(calls)]) / 1e9


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


STAT = {"p50": statistics.median, "min": min}


def call_s(fn, x: torch.Tensor, operands: list[tuple], calls: int, stat) -> float:
    """p50 (or min) time of fn(x, *operands[i]) over `calls` calls, cycling through the operand sets."""
    for args in operands[:4]:
        fn(x, *args)
    return stat([_timed(fn, x, *operands[i % len(operands)]) for i in range(calls)])


def copies(make, nbytes: int, hot: bool) -> list:
    """Enough copies of a weight to overflow the caches (one when `hot`)."""
    return [make() for _ in range(1 if hot else max(1, -(-COLD_BYTES // nbytes)))]


def quantize(fmt: str, w: torch.Tensor) -> tuple:
    return kernels.quantize_q4(w) if fmt == "q4" else kernels.quantize_q8(w)


def fp32_linear(x, w):  # F.linear's layout: W [N, K]
    return x @ w.t()


def fp32_transposed(x, w_t):  # W stored as [K, N]
    return x @ w_t


def bench_shape(name: str, n: int, k: int, fmt: str, ms: list[int], bandwidth: float, hot: bool, stat) -> list[dict]:
    """One row per M: the kernel vs fp32 `x @ W.t()` and `x @ W_t`."""
    w = torch.randn(n, k) * 0.02
    quantized = copies(lambda: quantize(fmt, w), int(n * k * BYTES_PER_WEIGHT[fmt]), hot)
    dense = copies(lambda: (w.clone(),), n * k * 4, hot)
    dense_t = [(d.t().contiguous(),) for (d,) in dense]
    rows = []
    for m in ms:
        x = torch.randn(m, k)
        calls = max(20, int(300 * 1e6 / (n * k * max(m, 8))))  # ~300 calls of a 1M-weight layer
        kernel_s = call_s(OPS[fmt](), x, quantized, calls, stat)
        fp32_s = call_s(fp32_linear, x, dense, calls, stat)
        fp32_t_s = call_s(fp32_transposed, x, dense_t, calls, stat)
        best_fp32_s = min(fp32_s, fp32_t_s)
        weight_gb_s = n * k * BYTES_PER_WEIGHT[fmt] / kernel_s / 1e9
        rows.append(
            dict(
                shape=f"{name} {n}x{k} {fmt}",
                m=m,
                kernel_us=kernel_s * 1e6,
                fp32_us=fp32_s * 1e6,
                fp32_t_us=fp32_t_s * 1e6,
                weight_gb_s=weight_gb_s,
                pct_bw=100 * weight_gb_s / bandwidth,
                kernel_gflop_s=2 * m * n * k / kernel_s / 1e9,
                fp32_gflop_s=2 * m * n * k / best_fp32_s / 1e9,
                speedup=best_fp32_s / kernel_s,
            )
        )
    return rows


def decode_step(ms: list[int], bandwidth: float, stat, repeats: int = 15) -> tuple[list[dict], int, int]:
    """All linear layers of one decode step (30 x [qkv, o, gate_up, down] + lm_head), each with its own weights."""
    shapes = [s for _ in range(LAYERS) for s in SHAPES[:-1]] + [SHAPES[-1]]
    layers = [(OPS[fmt](), quantize(fmt, torch.randn(n, k) * 0.02)) for _, n, k, fmt in shapes]
    dense = [torch.randn(n, k) * 0.02 for _, n, k, _ in shapes]
    weight_bytes = sum(t.numel() * t.element_size() for _, tensors in layers for t in tensors)
    params = sum(n * k for _, n, k, _ in shapes)

    def step(xs):
        for (op, tensors), (_, _, k, _) in zip(layers, shapes):
            op(xs[k], *tensors)

    def step_fp32(xs):
        for w in dense:
            fp32_linear(xs[w.shape[1]], w)

    rows = []
    for m in ms:
        xs = {k: torch.randn(m, k) for k in (576, 1536)}
        step(xs), step_fp32(xs)
        kernel_s = stat([_timed(step, xs) for _ in range(repeats)])
        fp32_s = stat([_timed(step_fp32, xs) for _ in range(max(3, repeats // 3))])
        gb_s = weight_bytes / kernel_s / 1e9
        rows.append(dict(m=m, kernel_ms=kernel_s * 1e3, fp32_ms=fp32_s * 1e3, gb_s=gb_s, pct=100 * gb_s / bandwidth))
    return rows, weight_bytes, params


def crossover(rows: list[dict]) -> str:
    """The smallest M from which fp32 torch matmul is faster than the kernel, or '-' if none measured."""
    slower = [r["m"] for r in rows if r["speedup"] < 1]
    return str(min(slower)) if slower else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ms", default="1,2,4,8,16,32,64", help="comma-separated batch sizes (rows of x)")
    parser.add_argument("--hot", action="store_true", help="one copy of each weight (small ones stay in cache)")
    parser.add_argument("--no-step", action="store_true", help="skip the whole decode step")
    parser.add_argument("--stat", choices=sorted(STAT), default="p50", help="statistic of the timed calls")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ms = [int(m) for m in args.ms.split(",")]
    if not kernels.available():
        raise SystemExit(f"kernel unavailable: {kernels.unavailable_reason()}")

    bandwidth = read_bandwidth_gb_s(STAT[args.stat])
    print(
        f"threads {args.threads}, read bandwidth {bandwidth:.1f} GB/s, weights {'hot' if args.hot else 'cold'}, "
        f"time per call: {args.stat}\n"
    )
    print(
        "| shape | M | kernel µs | fp32 x@W.t() µs | fp32 x@W_t µs | weight GB/s | % of bw "
        "| kernel GFLOP/s | fp32 best GFLOP/s | speedup vs fp32 |"
    )
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    crossovers = {}
    for name, n, k, fmt in SHAPES:
        rows = bench_shape(name, n, k, fmt, ms, bandwidth, args.hot, STAT[args.stat])
        crossovers[rows[0]["shape"]] = crossover(rows)
        for r in rows:
            print(
                f"| {r['shape']} | {r['m']} | {r['kernel_us']:.1f} | {r['fp32_us']:.1f} | {r['fp32_t_us']:.1f} "
                f"| {r['weight_gb_s']:.1f} | {r['pct_bw']:.0f}% | {r['kernel_gflop_s']:.1f} "
                f"| {r['fp32_gflop_s']:.1f} | {r['speedup']:.2f}x |"
            )
    print("\n| shape | fp32 faster from M |\n|---|--:|")
    for shape, m in crossovers.items():
        print(f"| {shape} | {m} |")

    if not args.no_step:
        step_ms = [m for m in ms if m in (1, 8, 32)] or ms[:1]
        rows, weight_bytes, params = decode_step(step_ms, bandwidth, STAT[args.stat])
        print(
            f"\nOne decode step's linear layers ({LAYERS} x [qkv, o, gate_up, down] q4 + lm_head q8: "
            f"{params / 1e6:.1f} M weights, {weight_bytes / 1e6:.1f} MB; fp32 x@W.t() on the same shapes)\n"
        )
        print("| M | kernel ms | fp32 ms | weight GB/s | % of bw |\n|--:|--:|--:|--:|--:|")
        for r in rows:
            print(f"| {r['m']} | {r['kernel_ms']:.2f} | {r['fp32_ms']:.2f} | {r['gb_s']:.1f} | {r['pct']:.0f}% |")


if __name__ == "__main__":
    main()
