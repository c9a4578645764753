"""One row, one process: run.py with the row's overrides in a fresh interpreter, its results.json read back."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.environment import PROJECT_ROOT
from pipeline.errors import PipelineError

RUN_PY = PROJECT_ROOT / "run.py"
PROCESS_TIMEOUT_S = 1800
# no MLflow (the bench logs its own table), no course loss pass (minutes, and not what is timed)
COMMON = ("tracking.enabled=false", "stages.grader_loss=false")


class RowFailed(PipelineError):
    """A row's process failed or gave no results; the message is its error line and where its log is."""


@dataclass
class Sample:
    results: dict  # results.json
    # (stage, index) -> the prediction's fields the bench compares: token ids, correct, forced
    predictions: dict[tuple[str, int], dict] = field(default_factory=dict)
    process_s: float = float("nan")

    def stage(self, stage: str, key: str) -> float:
        value = self.results.get("stages", {}).get(stage, {}).get(key)
        return float(value) if isinstance(value, (int, float)) else float("nan")


def _reason(done: subprocess.CompletedProcess) -> str:
    """The line that says why a run failed: its `error:` line, else its exception's last line, else its last line."""
    lines = [line.strip() for line in (done.stdout + "\n" + done.stderr).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    errors = errors or [line for line in lines if re.match(r"[\w.]*(Error|Exception|Interrupt)\b", line)]
    last = errors[-1] if errors else (lines[-1] if lines else "no output")
    return f"exit {done.returncode}: {last[:300]}"


def run_row(overrides: list[str], folder: Path, env: dict[str, str] | None = None,
            timeout_s: float = PROCESS_TIMEOUT_S, common: tuple[str, ...] = COMMON) -> Sample:  # fmt: skip
    """run.py OVERRIDES in a fresh process (its own folder, `env` added to the environment); RowFailed says why not.

    `common` (default: MLflow and the course loss off) goes after the overrides.
    """
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(RUN_PY), *overrides, *common, f"hydra.run.dir={folder}"]
    start = time.perf_counter()
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            cwd=PROJECT_ROOT,
            timeout=timeout_s,
            env={**os.environ, **(env or {})},
        )
    except subprocess.TimeoutExpired:
        raise RowFailed(f"no result within {timeout_s:.0f} s (log: {folder})") from None
    process_s = time.perf_counter() - start
    (folder / "bench.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0 or not (folder / "results.json").is_file():
        raise RowFailed(f"{_reason(done)} (log: {folder / 'bench.log'})")
    results = json.loads((folder / "results.json").read_text())
    predictions = {}
    with open(folder / "predictions.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            predictions[(row["stage"], int(row["index"]))] = {
                "token_ids": json.loads(row.get("token_ids") or "[]"),
                "correct": row["correct"] == "True",
                "forced": row.get("forced") == "True",
            }
    return Sample(results, predictions, process_s)


def token_match(sample: Sample, reference: Sample, stage: str) -> float:
    """Share of questions whose generated token ids equal the reference's, in one stage (same questions, same
    decoding mode: the caller pairs them)."""
    pairs = [(p, reference.predictions.get(key)) for key, p in sample.predictions.items() if key[0] == stage]
    pairs = [(a, b) for a, b in pairs if b is not None]
    return sum(a["token_ids"] == b["token_ids"] for a, b in pairs) / len(pairs) if pairs else float("nan")
