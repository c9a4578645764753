"""The whole app as a user runs it: run.py into a real MLflow store, single runs and multiruns."""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import mlflow
import pytest
from conftest import run_app
from omegaconf import OmegaConf
from test_config import differences

from pipeline.config import Config, load_config

TINY = ["model=tiny", "dataset.num_questions=4", "generation.max_new_tokens=6"]


def _runs(db: Path, experiment: str = "unit-conversion"):
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    return mlflow.search_runs(experiment_names=[experiment])


def test_tiny_run_logs_params_metrics_tags_and_artifacts(tmp_path):
    start = time.perf_counter()
    result = run_app([*TINY, "precision=fp32", "attention=eager"], tmp_path)
    wall_s = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-2000:]
    assert "single" in result.stdout and "batched" in result.stdout and "in_budget" in result.stdout
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path / 'mlflow.db'}" in result.stdout

    runs = _runs(tmp_path / "mlflow.db")
    assert len(runs) == 1
    run = runs.iloc[0]
    assert (
        run["tags.mlflow.runName"]
        == "model=tiny,dataset.num_questions=4,generation.max_new_tokens=6,precision=fp32,attention=eager"
    )
    assert run["params.precision.name"] == "fp32" and run["params.attention.implementation"] == "eager"
    assert run["params.generation.max_new_tokens"] == "6" and run["params.model.source"] == "tiny"
    assert run["params.generation.stop_string"] == "\n"  # as used: the tool prompt's request, not conf/'s null
    assert run["tags.dtype"] == "fp32" and run["tags.torch_version"] and run["tags.git_commit"]
    assert run["tags.device_name"] and run["tags.transformers_version"].startswith("5.")
    for stage in ("single", "batched"):
        assert run[f"metrics.{stage}/num_questions"] == 4
        assert run[f"metrics.{stage}/wall_time_s"] > 0
        assert 0 < run[f"metrics.{stage}/generated_tokens"] <= 4 * 6
        assert run[f"metrics.{stage}/tokens_per_s"] > 0
        assert 0 <= run[f"metrics.{stage}/accuracy"] <= 1 and 0 <= run[f"metrics.{stage}/answer_rate"] <= 1
        assert run[f"metrics.{stage}/within_budget"] in (0, 1)
        assert run[f"metrics.{stage}/within_budget_with_load"] in (0, 1)
    assert (
        run["metrics.single/latency_p50_s"]
        <= run["metrics.single/latency_p90_s"]
        <= run["metrics.single/latency_max_s"]
    )
    assert run["metrics.load_time_s"] > 0 and run["metrics.warmup_time_s"] > 0
    # from the process's start: to a warmed backend, then to the first stage (the solver and grammar loaded too),
    # both within the child's own life as this test timed it
    assert 0 < run["metrics.ready_s"] < run["metrics.first_stage_s"] < wall_s

    client = mlflow.MlflowClient()
    artifacts = {a.path for a in client.list_artifacts(run["run_id"])}
    assert {"config.json", "results.json", "predictions.csv", "predictions.json", ".hydra"} <= artifacts
    hydra_files = {a.path for a in client.list_artifacts(run["run_id"], ".hydra")}
    assert ".hydra/config.yaml" in hydra_files and ".hydra/overrides.yaml" in hydra_files

    # the evaluation set is the run's dataset input: name, digest of the 4 questions used, source file
    (dataset_input,) = client.get_run(run["run_id"]).inputs.dataset_inputs
    dataset = dataset_input.dataset
    assert dataset.name == "unit_conversion" and len(dataset.digest) == 8
    assert json.loads(dataset.source)["uri"].endswith("src/pipeline/data/unit_conversion.json")
    assert json.loads(dataset.profile) == {"num_rows": 4}
    assert {(t.key, t.value) for t in dataset_input.tags} == {("mlflow.data.context", "evaluation")}
    # the predictions are an MLflow table (what the UI's table view and mlflow.load_table read), typed
    table = client.load_table(run["experiment_id"], "predictions.json", run_ids=[run["run_id"]])
    assert len(table) == 8 and list(table["stage"]) == ["single"] * 4 + ["batched"] * 4
    assert table["correct"].dtype == bool and table["num_tokens"].dtype.kind == "i"
    assert {"path": "predictions.json", "type": "table"} in json.loads(run["tags.mlflow.loggedArtifacts"])

    # the run folder keeps the same results, written before MLflow was touched
    (run_dir,) = (tmp_path / "outputs" / "runs").glob("*/*")
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["dtype"] == "fp32" and set(saved["stages"]) == {"single", "batched"}
    # what run.py ran is what load_config builds from the same overrides, field by field
    ran = OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(run_dir / ".hydra/config.yaml"))
    )
    assert differences(ran, load_config([*TINY, "precision=fp32", "attention=eager"])) == []
    with open(run_dir / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {"question", "expected", "output", "parsed", "correct", "latency_s", "stage"} <= set(rows[0])
    assert [row["stage"] for row in rows] == ["single"] * 4 + ["batched"] * 4


def test_tracking_can_be_turned_off(tmp_path):
    result = run_app([*TINY, "tracking.enabled=false", "stages.single=false"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not (tmp_path / "mlflow.db").exists()
    assert "batched" in result.stdout


@pytest.mark.slow
def test_default_config_runs_the_embedded_model(tmp_path):
    """`python run.py` as `make run` does it, on the first 3 questions to keep the suite short."""
    result = run_app(["dataset.num_questions=3"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    run = _runs(tmp_path / "mlflow.db").iloc[0]
    assert run["params.model.name"] == "smollm2-135m" and run["params.prompt.style"] == "tool"
    assert run["tags.dtype"] in ("bf16", "fp32")
    assert run["metrics.single/generated_tokens"] > 0 and run["metrics.batched/generated_tokens"] > 0
    assert run["metrics.batched/answer_rate"] > 0 and run["metrics.batched/accuracy"] > 0
    family_metrics = [c for c in runs_columns(run) if c.startswith("metrics.batched/accuracy/")]
    assert family_metrics  # accuracy by unit family

    # the tool prompt: the model's `QUANTITY SOURCE -> TARGET` line is recorded, parsed, and answered by pint
    (run_dir,) = (tmp_path / "outputs" / "runs").glob("*/*")
    with open(run_dir / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6
    answered = [row for row in rows if row["form"]]
    assert len(answered) >= 4, [row["output"] for row in rows]
    for row in answered:
        quantity, arrow, target = row["form"].partition(" -> ")
        assert arrow and target, row["form"]
        assert quantity.split()[0] in row["question"]  # the number is the question's own
        if row["parsed"] != "nan":  # a form pint computes gets its answer appended, and that is what is scored
            appended = row["output"].rsplit("<answer>", 1)[1].removesuffix("</answer>")
            assert float(appended) == float(row["parsed"])


def runs_columns(run) -> list[str]:
    return [c for c in run.index if isinstance(run[c], float) and not math.isnan(run[c])]


def test_the_run_process_leaves_mlflow_to_its_agent_and_waits_for_it_only_before_the_stages(tmp_path):
    """MLflow's import and store (2-6 s on a default run) are the agent's, beside the model's load: the run's own
    process never imports mlflow, and the run is logged in full all the same."""
    import subprocess
    import sys

    from conftest import ROOT

    seen = tmp_path / "imported.json"
    code = (
        "import atexit, json, runpy, sys\n"
        f"atexit.register(lambda: open({str(seen)!r}, 'w').write(json.dumps(sorted(m for m in sys.modules "
        "if m == 'mlflow' or m.startswith('mlflow.')))))\n"
        f"sys.argv = [{str(ROOT / 'run.py')!r}, *{[*TINY, 'runtime.warmup=false']!r}]\n"
        f"runpy.run_path({str(ROOT / 'run.py')!r}, run_name='__main__')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(seen.read_text()) == []  # the old in-process start imported mlflow here
    assert "logged to MLflow run" in result.stdout

    runs = _runs(tmp_path / "mlflow.db")
    assert len(runs) == 1 and runs.iloc[0]["status"] == "FINISHED"
    run = runs.iloc[0]
    assert run["metrics.single/num_questions"] == 4 and run["params.model.source"] == "tiny"
    assert run["metrics.system/process_rss_mb"] > 0  # whose: test_tracking's pid test
    (noted,) = (tmp_path / "outputs").rglob("tracking.json")
    assert json.loads(noted.read_text())["run_id"] == run["run_id"]
