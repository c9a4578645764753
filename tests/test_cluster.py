"""Sweeps through submitit (the SLURM launcher's local twin) into a real MLflow server on PostgreSQL."""

from __future__ import annotations

import mlflow
import pytest
from conftest import run_app, start_mlflow_server


@pytest.fixture(scope="module")
def tracking_server(postgres_uri, tmp_path_factory):
    """One server for the module (starting one takes 10-15 s); each test uses experiments of its own."""
    folder = tmp_path_factory.mktemp("server")
    process, uri = start_mlflow_server(postgres_uri, folder / "artifacts", folder / "mlflow-server.log")
    yield uri
    process.terminate()
    process.wait(timeout=30)


@pytest.mark.slow
def test_submitit_local_sweep_logs_to_a_postgres_backed_server(tmp_path, tracking_server):
    args = [
        "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
        "model=tiny", "prompt=raw", "dataset.num_questions=3", "generation.max_new_tokens=4",
        "attention=eager,sdpa", f"tracking.uri={tracking_server}", "tracking.experiment=cluster",
    ]  # fmt: skip
    result = run_app(args, tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    client = mlflow.MlflowClient(tracking_uri=tracking_server)
    experiment = client.get_experiment_by_name("cluster")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("pipeline.sweep") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1 and len(children) == 2
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    for child in children:
        assert child.info.status == "FINISHED"
        for metric in ("single/wall_time_s", "batched/wall_time_s", "single/accuracy", "batched/tokens_per_s"):
            assert metric in child.data.metrics, (child.data.tags["mlflow.runName"], metric)
    assert "comparison.txt" in {a.path for a in client.list_artifacts(parents[0].info.run_id)}


def test_slurm_launcher_config_composes(compose_cfg):
    from conftest import CONF
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)  # fmt: skip
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.partition == "gpu" and launcher.gpus_per_node == 1 and launcher.timeout_min == 60


@pytest.mark.slow
def test_runs_logging_one_data_set_at_once_all_get_it(tmp_path, tracking_server):
    """A parallel sweep's runs log the same data set together: its row's unique key must fail none of them."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.tracking import _log_dataset

    client = mlflow.MlflowClient(tracking_uri=tracking_server)
    experiment = client.create_experiment("together")
    config = {"dataset": {"num_questions": 5}}
    for attempt in range(3):  # the race is a matter of timing: give it several chances to show
        runs = [client.create_run(experiment).info.run_id for _ in range(8)]
        config["dataset"]["num_questions"] = 5 + attempt  # a data set (digest) new to the store each time
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda run_id: _log_dataset(client, run_id, tmp_path, config), runs))
        for run_id in runs:
            inputs = client.get_run(run_id).inputs.dataset_inputs
            assert [i.dataset.profile for i in inputs] == [f'{{"num_rows": {5 + attempt}}}']
