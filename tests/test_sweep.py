"""Sweeps: one MLflow parent per multirun, a child per job, a comparison at the end; joblib loses nothing."""

from __future__ import annotations

import subprocess
import sys
import time

import mlflow
import pytest
from conftest import run_app

from pipeline.report import Row, _runs_from_mlflow, _runs_from_sqlite, compare, mark_pareto, pareto_front
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
    "launcher",
    [
        pytest.param([], id="basic"),
        # the same checks through the parallel launcher: 31 s of a 2-core make test, so in make test-slow (CI runs it)
        pytest.param(["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], id="joblib", marks=pytest.mark.slow),
    ],
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
    assert parent.data.tags["mlflow.runName"] == "sweep: precision=fp32,bf16 attention=eager,sdpa"  # what it varies
    assert "model=tiny" in parent.data.params["sweep.overrides"]  # and every override, as a param
    assert "system/cpu_utilization_percentage" in parent.data.metrics  # sampled while the sweep ran
    for child in children:  # the headline the runs table and the compare view lead with
        assert child.data.metrics["1_time/batched_s"] == child.data.metrics["batched/wall_time_s"]
        assert "2_accuracy/batched" in child.data.metrics and "system/process_rss_mb" in child.data.metrics
    experiment_id = parent.info.experiment_id
    assert f"#/experiments/{experiment_id}/runs?viewStateShareKey=pipeline-compare" in result.stdout  # browse link
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"comparison.txt", "comparison.csv", "comparison.json", "pareto.png", "speedup.png",
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
    assert (tmp_path / "fig" / "pareto.png").stat().st_size > 1000
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


def test_pareto_fronts_over_time_and_accuracy_or_kld():
    points = [(1.0, 0.5), (2.0, 0.9), (3.0, 0.9), (0.5, 0.1), (2.5, 0.95)]
    assert pareto_front(points, maximize_y=True) == [(0.5, 0.1), (1.0, 0.5), (2.0, 0.9), (2.5, 0.95)]
    kld = [(1.0, 0.02), (2.0, 0.01), (3.0, 0.03), (0.5, 0.2)]
    assert pareto_front(kld, maximize_y=False) == [(0.5, 0.2), (1.0, 0.02), (2.0, 0.01)]


def _sweep_row(i, single_s, batched_s, accuracy, kld):
    metrics = {"single/wall_time_s": single_s, "batched/wall_time_s": batched_s, "single/accuracy": accuracy,
               "batched/accuracy": accuracy, "batched/accuracy_null": 0.0625, "single/kld_mean": kld,
               "batched/kld_mean": kld}  # fmt: skip
    params = {"dataset.name": "unit_conversion", "dataset.path": "None", "dataset.num_questions": "32"}
    tags = {"device_name": "AMD EPYC", "cpu_kind": "avx2"}
    name = f"precision={('fp32', 'bf16', 'int8', 'q4')[i]},attention={('eager', 'sdpa')[i % 2]}"
    return Row(f"id{i}", name, "FINISHED", params, single_s, batched_s, 0.0, 0.0, accuracy, metrics=metrics, tags=tags)


def test_the_pareto_figure_names_every_run_in_a_legend_clear_of_the_panels():
    """Four runs at the same accuracy and nearly the same time (where labels at the points overlapped)."""
    import matplotlib.pyplot as plt

    from pipeline.report import figure_title, pareto_figure

    rows = [_sweep_row(i, 4.4 + 0.01 * i, 2.0 + 0.01 * i, 1.0, 0.04 - 0.01 * i) for i in range(4)]  # KLD falls
    title = figure_title(rows, "precision, attention")
    assert title == "sweep over precision, attention: AMD EPYC (avx2); unit_conversion, 32 questions"
    fig = pareto_figure(rows, title)
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        (legend,) = fig.legends
        names = [t.get_text() for t in legend.get_texts()]
        assert names[:4] == [r.name for r in rows] and "Pareto front" in " ".join(names) and "null model" in names[-1]
        box = legend.get_window_extent(renderer)
        assert len(fig.axes) == 4 and all(not box.overlaps(ax.get_tightbbox(renderer)) for ax in fig.axes)
        assert not {t.get_text() for ax in fig.axes for t in ax.texts} & set(names)  # no label at a point
        assert fig._suptitle.get_text() == title
        panels = {ax.get_title(): ax for ax in fig.axes}
        assert set(panels) == {"single stage", "batched stage"}  # both stages, accuracy above KLD
        assert [ax.get_ylabel() for ax in fig.axes] == [
            "accuracy",
            "accuracy",
            *["KL divergence to fp32, mean per token"] * 2,
        ]
    finally:
        plt.close(fig)
