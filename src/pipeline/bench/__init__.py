"""`python -m pipeline.bench`: every row in its own process, interleaved rounds, verdicts with intervals.

Writes docs/BENCHMARKS.md (or --out): per row single and batched time, the ratio to our default in the same
decoding mode, fidelity against fp32, accuracy with the null model's and the forced share, peak memory and ready
time; accuracy of each prompt strategy on 256 questions of both shipped sets; the default's stages against the
roofline; the targets of issues 17, 18 and 19, each met, missed or inconclusive.

The package: `rows` (what runs, as data), `run` (one row, one process), `machine` (busy share, bandwidth, GEMM
rate, roofline), `judge` (targets with intervals), `report` (the markdown), `main` (the command).
"""

from pipeline.bench.main import main

__all__ = ["main"]
