"""The environment block every run carries: device name, core count, library versions, git commit."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a device is at hand, so this module loads without it
    import torch

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CPUINFO = Path("/proc/cpuinfo")


def cpuinfo_field(name: str, cpuinfo: Path = CPUINFO) -> str | None:
    """The value of `name` (e.g. 'model name', 'flags') for the first CPU in /proc/cpuinfo; None where absent."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == name:
            return value.strip()
    return None


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo, else what `platform` knows."""
    return cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_kind(flags: str | None = None) -> str:
    """The CPU kind that decides which kernels are fast (pipeline.cpu): the forced kind where one is set;
    with `flags`, the kind those flags make."""
    from pipeline import cpu

    if flags is not None:
        return cpu.detected_kind(frozenset(flags.split()))
    return cpu.kind()


def device_name(device: torch.device) -> str:
    """The GPU name for CUDA, else the CPU model."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple MPS ({platform.machine()})"
    return cpu_model()


def git_commit(root: Path = PROJECT_ROOT) -> str:
    """The checked-out commit of the project (with -dirty when the tree has changes), or 'unknown'."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment(device: torch.device) -> dict[str, str]:
    """Machine and library facts for the run record."""
    import torch

    from pipeline import cpu

    kind = cpu.current()
    return {
        "device": device.type,
        "device_name": device_name(device),
        "cpu_model": cpu_model(),
        "cpu_kind": kind.kind,
        "cpu_kind_detected": kind.detected,
        "cpu_kind_forced": "simulated" if kind.simulated else "forced" if kind.forced else "no",
        "cpu_count": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "torch_version": torch.__version__,
        "transformers_version": _version("transformers"),  # without importing it (0.45 s of the ready time)
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": git_commit(),
    }
