"""The MLflow edges (sync, report, summary, the sweep callback) start without torch or transformers."""

from __future__ import annotations

import json
import subprocess
import sys

LIGHT = ["pipeline.sync", "pipeline.report", "pipeline.summary", "pipeline.sweep", "pipeline.results",
         "pipeline.tracking", "pipeline.config", "pipeline.environment"]  # fmt: skip
HEAVY = ["torch", "transformers"]


def test_mlflow_edges_import_neither_torch_nor_transformers():
    code = (
        f"import importlib, json, sys\nfor m in {LIGHT!r}: importlib.import_module(m)\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-1500:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
