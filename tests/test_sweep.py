"""Sweeps: one MLflow parent per multirun, a child per job, a comparison at the end; joblib loses nothing."""

from __future__ import annotations

import subprocess
import sys
import time

import mlflow
import pytest
from conftest import run_app

from pipeline.report import Row, _runs_from_mlflow, _runs_from_sqlite, compare, mark_pareto
from pipeline.report import main as report_main

TINY = ["model=tiny", "prompt=raw", "dataset.num_questions=3", "generation.max_new_tokens=4"]
SWEEP = ["precision=fp32,bf16", "attention=eager,sdpa"]


def _parent_and_children(db):
    mlflow.set_tracking_uri(f"sqlite:///{db}")  # MlflowClient.load_table searches the global store
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("unit-conversion")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("pipeline.sweep") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    return client, parents, children


@pytest.mark.parametrize(
    "launcher", [[], ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]], ids=["basic", "joblib"]
)
def test_multirun_is_one_parent_with_a_child_per_job(tmp_path, launcher):
    result = run_app(["-m", *TINY, *SWEEP, *launcher], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "sweep comparison" in result.stdout and "(baseline)" in result.stdout

    client, parents, children = _parent_and_children(tmp_path / "mlflow.db")
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert {c.data.tags["mlflow.runName"] for c in children} == {
        "precision=fp32,attention=eager", "precision=fp32,attention=sdpa",
        "precision=bf16,attention=eager", "precision=bf16,attention=sdpa",
    }  # fmt: skip
    # each child ran its own combination (its params, not only its name)
    combos = {(c.data.params["precision.name"], c.data.params["attention.implementation"]) for c in children}
    assert combos == {("fp32", "eager"), ("fp32", "sdpa"), ("bf16", "eager"), ("bf16", "sdpa")}
    for child in children:
        assert child.info.status == "FINISHED"
        for metric in ("single/wall_time_s", "batched/wall_time_s", "batched/accuracy", "load_time_s"):
            assert metric in child.data.metrics
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"comparison.txt", "comparison.csv", "comparison.json", "latency_vs_accuracy.png", "speedup.png",
            "multirun.yaml"} <= artifacts  # fmt: skip
    table = client.load_table(parent.info.experiment_id, "comparison.json", run_ids=[parent.info.run_id])
    assert sorted(table["run"]) == sorted(c.data.tags["mlflow.runName"] for c in children)
    assert table["baseline"].sum() == 1 and table["speedup_single"][table["baseline"]].iloc[0] == 1.0


def test_a_failing_job_is_marked_failed_and_the_sweep_goes_on(tmp_path):
    result = run_app(["-m", *TINY, "attention=sdpa,flash_attention_2"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "attention=flash_attention_2 needs a CUDA GPU" in result.stderr
    _, parents, children = _parent_and_children(tmp_path / "mlflow.db")
    status = {c.data.tags["mlflow.runName"]: c for c in children}
    assert status["attention=sdpa"].info.status == "FINISHED"
    failed = status["attention=flash_attention_2"]
    assert failed.info.status == "FAILED" and "CUDA" in failed.data.tags["error"]
    assert len(parents) == 1 and parents[0].data.tags["jobs_failed"] == "1"


def test_report_command_prints_the_table_against_a_baseline(tmp_path, capsys):
    result = run_app(["-m", *TINY, "precision=fp32,bf16", "tracking.baseline='precision=bf16'"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    # tracking.baseline picks the row the sweep's own comparison measures against
    comparison = result.stdout[result.stdout.index("sweep comparison") :]
    assert "precision=bf16 (baseline)" in comparison and "precision=fp32 (baseline)" not in comparison
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert report_main(["--uri", uri, "--baseline", "precision=bf16", "--figures", str(tmp_path / "fig")]) == 0
    out = capsys.readouterr().out
    assert "precision=bf16 (baseline)" in out and "precision=fp32" in out and "speed-up single" in out
    assert (tmp_path / "fig" / "latency_vs_accuracy.png").stat().st_size > 1000
    assert report_main(["--uri", uri, "--baseline", "precision=fp64"]) == 2
    assert report_main(["--uri", uri, "--experiment", "nope"]) == 2

    # the plain SQLite read and MLflow's client see the same runs, with and without a sweep filter
    _, parents, _ = _parent_and_children(tmp_path / "mlflow.db")
    for sweep in (None, parents[0].info.run_id):
        direct = _runs_from_sqlite(uri, "unit-conversion", sweep)
        through_mlflow = _runs_from_mlflow(uri, "unit-conversion", sweep)
        assert direct and sorted(direct, key=lambda r: r.run_id) == sorted(through_mlflow, key=lambda r: r.run_id)

    # and it answers without importing MLflow, in a fraction of the seconds MLflow's import alone takes
    code = f"import sys; from pipeline.report import main; main(['--uri', '{uri}']); print('mlflow' in sys.modules)"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip().splitlines()[-1] == "False" and "precision=bf16" in done.stdout
    assert time.perf_counter() - start < 10


def _row(name, single_s, accuracy):
    return Row(name, name, "FINISHED", {}, single_s, single_s / 4, 0.0, 0.0, accuracy)


def test_speedups_accuracy_changes_and_pareto_front():
    rows = [_row("fp32", 10.0, 0.90), _row("bf16", 5.0, 0.90), _row("int8", 4.0, 0.80), _row("slow-bad", 12.0, 0.5)]
    rows, base = compare(rows, "fp32")
    assert base.name == "fp32"
    assert rows[1].speedup_single == pytest.approx(2.0) and rows[2].accuracy_change == pytest.approx(-0.10)
    mark_pareto(rows)
    assert [r.name for r in rows if r.pareto] == ["bf16", "int8"]
