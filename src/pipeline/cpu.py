"""The CPU kind: the one place that decides, from the CPU's flags, which fast paths this machine has.

Kinds, from least to most capable: `none` (no kernel of ours: ARM, older x86, macOS), `avx2` (AVX2 + FMA),
`avx512` (AVX512 F/BW/VL, VNNI where present), `avx512_bf16` (also native bf16 dot products), `amx` (also AMX
tiles for bf16). Every CPU-dependent decision in the project asks this module: the compute dtype `auto`
picks, which kernel build is loaded, what the calibration measures, the activations torch's int8 kernel
gets. A kind's code can run on a CPU of that kind or above.

`PIPELINE_CPU_KIND=<kind>` forces a kind. A kind below the CPU's runs as it would on such a CPU (AVX2 code
runs on an AVX512 machine). A kind above it is refused, since its instructions would fault, unless
`PIPELINE_CPU_KIND_SIMULATE=1` (the test suite sets it): then every Python-side decision of that kind is
made as on such a CPU, and the kernels are the best build this CPU executes. That is how the tests run
every kind on whatever machine runs them.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from functools import lru_cache

from pipeline.errors import PipelineError

KINDS = ("none", "avx2", "avx512", "avx512_bf16", "amx")
KIND_ENV = "PIPELINE_CPU_KIND"
SIMULATE_ENV = "PIPELINE_CPU_KIND_SIMULATE"
# flags each kind needs, on top of the kinds below it
NEEDS = {
    "avx2": {"avx2", "fma", "f16c"},
    "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq"},
    "avx512_bf16": {"avx512_bf16"},
    "amx": {"amx_bf16", "amx_tile", "amx_int8"},
}
# kernel builds (instruction sets our C++ is compiled for), best first: the flags each needs, and the kind it is of
KERNEL_ISAS = ("avx512vnni", "avx512", "avx2")
ISA_NEEDS = {
    "avx2": NEEDS["avx2"],
    "avx512": NEEDS["avx2"] | NEEDS["avx512"],
    "avx512vnni": NEEDS["avx2"] | NEEDS["avx512"] | {"avx512_vnni"},
}
ISA_KIND = {"avx2": "avx2", "avx512": "avx512", "avx512vnni": "avx512"}
# PIPELINE_KERNEL_ISA=<isa> picks a build below the best one the kind and CPU allow (to compare builds)
ISA_ENV = "PIPELINE_KERNEL_ISA"


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags from /proc/cpuinfo (empty where that file does not exist: macOS, Windows); read once
    per process: every call of our ops asks which kernel build is in force, and reading the file cost 46 us."""
    from pipeline.environment import cpuinfo_field

    return frozenset((cpuinfo_field("flags") or "").split())


def detected_kind(flags: frozenset[str] | set[str] | None = None) -> str:
    """The most capable kind whose flags the CPU has (every kind below it included); `none` off x86."""
    if flags is None:
        if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
            return "none"
        flags = cpu_flags()
    best = "none"
    for kind in KINDS[1:]:
        if not NEEDS[kind] <= set(flags):
            break
        best = kind
    return best


def rank(kind: str) -> int:
    return KINDS.index(kind)


@dataclass(frozen=True)
class CpuKind:
    kind: str  # what every decision follows
    detected: str  # what the CPU is
    forced: bool  # set by PIPELINE_CPU_KIND
    simulated: bool  # forced above what the CPU runs (tests only): kernels are the CPU's best build at or below

    @property
    def fast_bf16(self) -> bool:
        """Whether bf16 matrix products are native here (AVX512-BF16 or AMX); elsewhere torch emulates them."""
        return rank(self.kind) >= rank("avx512_bf16")

    @property
    def kernel_isa(self) -> str | None:
        """The kernel build to load: the best ISA the kind allows and the CPU's flags run ($PIPELINE_KERNEL_ISA
        picks a lower one); None for `none`."""
        return _kernel_isa(self, os.environ.get(ISA_ENV, "").strip())

    def describe(self) -> str:
        """e.g. 'avx512_bf16', 'avx2 (forced; the CPU is avx512_bf16)', 'amx (simulated on avx2)'."""
        if not self.forced:
            return self.kind
        how = "simulated on" if self.simulated else "forced; the CPU is"
        return f"{self.kind} ({how} {self.detected})"


@lru_cache(maxsize=32)
def _kernel_isa(kind: CpuKind, asked: str) -> str | None:
    """CpuKind.kernel_isa, worked out once per kind and $PIPELINE_KERNEL_ISA: every call of our ops asks it."""
    ceiling = min(rank(kind.kind), rank(kind.detected))
    runnable = [isa for isa in KERNEL_ISAS if rank(ISA_KIND[isa]) <= ceiling and ISA_NEEDS[isa] <= cpu_flags()]
    if asked:
        if asked not in KERNEL_ISAS:
            raise PipelineError(f"{ISA_ENV}={asked} is not a kernel build; choose one of: {', '.join(KERNEL_ISAS)}")
        if asked not in runnable:
            raise PipelineError(f"{ISA_ENV}={asked} does not run under CPU kind {kind.describe()}; unset it")
        return asked
    return runnable[0] if runnable else None


def current() -> CpuKind:
    """The kind in force: PIPELINE_CPU_KIND when set (checked), else the CPU's own."""
    return _resolve(os.environ.get(KIND_ENV, "").strip(), os.environ.get(SIMULATE_ENV, "") not in ("", "0"))


@lru_cache(maxsize=32)
def _resolve(forced: str, simulate: bool) -> CpuKind:
    detected = detected_kind()
    if not forced:
        return CpuKind(detected, detected, False, False)
    if forced not in KINDS:
        raise PipelineError(f"{KIND_ENV}={forced} is not a CPU kind; choose one of: {', '.join(KINDS)}")
    if rank(forced) > rank(detected) and not simulate:
        raise PipelineError(
            f"{KIND_ENV}={forced}: this CPU runs {detected} code at most ({forced} instructions would fault); "
            f"unset {KIND_ENV} or set it to {detected} or below"
        )
    return CpuKind(forced, detected, True, rank(forced) > rank(detected))


def kind() -> str:
    """The name of the kind in force (see `current`)."""
    return current().kind
