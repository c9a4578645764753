"""The tracking store check: every store scheme fails in seconds when it is down or its driver is missing."""

from __future__ import annotations

import importlib.util
import time

import pytest
from conftest import free_port

from pipeline.errors import PipelineError
from pipeline.tracking import check_reachable, client_for, flatten


def _fails_fast(uri: str, needle: str) -> str:
    start = time.perf_counter()
    with pytest.raises(PipelineError, match=needle) as caught:
        client_for(uri)
    assert time.perf_counter() - start < 10
    return str(caught.value)


def test_database_server_that_is_down_fails_in_seconds():
    message = _fails_fast(f"postgresql://user:secret@127.0.0.1:{free_port()}/mlflow", "is unreachable")
    assert "secret" not in message and "user:***@127.0.0.1" in message


def test_http_server_that_is_down_fails_in_seconds():
    _fails_fast(f"http://127.0.0.1:{free_port()}", "is unreachable")


@pytest.mark.parametrize(
    ("uri", "module", "package"),
    [
        ("mysql://u@127.0.0.1/mlflow", "MySQLdb", "mysqlclient"),
        ("mssql+pymssql://u@127.0.0.1/mlflow", "pymssql", "pymssql"),
    ],
)
def test_missing_database_driver_names_the_package(uri, module, package):
    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed here")
    _fails_fast(uri, f"driver, which is not installed .*; pip install {package}")


def test_unknown_driver_is_refused():
    _fails_fast("mysql+nosuchdriver://u@127.0.0.1/mlflow", "is not a database URL MLflow can use")


def test_sqlite_under_a_file_or_in_a_non_database_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    _fails_fast(f"sqlite:///{tmp_path / 'file' / 'sub' / 'mlflow.db'}", "is not a writable folder")
    (tmp_path / "notes.db").write_text("not a database at all")
    _fails_fast(f"sqlite:///{tmp_path / 'notes.db'}", "is not an SQLite database")


def test_usable_sqlite_paths_pass(tmp_path):
    check_reachable(f"sqlite:///{tmp_path / 'new' / 'folders' / 'mlflow.db'}")  # MLflow makes the folders
    (tmp_path / "empty.db").write_bytes(b"")
    check_reachable(f"sqlite:///{tmp_path / 'empty.db'}")
    check_reachable("sqlite://")  # in memory


def test_a_live_postgresql_store_passes(postgres_uri):
    check_reachable(postgres_uri)
    _fails_fast(postgres_uri.rsplit("/", 1)[0] + "/no_such_database", "refuses the connection")


def test_flatten_turns_nested_config_into_dotted_params():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": "1", "a.c": "[1, 2]", "d": "None"}


# --- what the MLflow UI gets: headline metrics, rounding, the experiment's kind and view, system metrics ---


def _result(**stage_fields):
    """A finished run with one batched stage, as results.json holds it: values a real run produces."""
    from pipeline.results import RunResult, StageResult

    fields = dict(name="batched", wall_time_s=18.381234567, generated_tokens=1727, tokens_per_s=93.95432101,
                  accuracy=31 / 32, answer_rate=1.0, num_questions=32, budget_s=15.0, within_budget=False,
                  within_budget_with_load=False, latency_p50_s=0.5, latency_p90_s=0.6, latency_max_s=0.7,
                  accuracy_null=0.0625, kld_mean=0.000123456789, top1_agreement=0.98765432,
                  peak_rss_mb=612.34567)  # fmt: skip
    fields.update(stage_fields)
    return RunResult("fp32", "q4", 1000, "cpu", "sdpa", "embedded", 2.0512345, 0.3, 32, {"cpu_kind": "avx2"},
                     stages=[StageResult(**fields)], status="finished", peak_rss_load_mb=420.987654)  # fmt: skip


def test_headline_metrics_lead_rounded_to_what_they_resolve():
    from pipeline.tracking import HEADLINE_METRICS, mlflow_metrics

    metrics = mlflow_metrics(_result(kld_mean=float("nan")).summary())
    keys = list(metrics)
    assert keys == sorted(keys)  # the order MLflow's UI sorts them in is the order they are logged in
    headline = [k for k in keys if k[0].isdigit()]
    assert headline == ["1_time/batched_s", "2_accuracy/batched", "2_accuracy/batched_null", "3_fidelity/batched_top1",
                        "4_throughput/batched_tokens_per_s"]  # fmt: skip
    assert keys[: len(headline)] == headline and len(headline) < len(HEADLINE_METRICS)  # the single stage is absent
    assert "3_fidelity/batched_kld" not in metrics and "batched/kld_mean" not in metrics  # NaN: not computed
    assert metrics["1_time/batched_s"] == metrics["batched/wall_time_s"] == 18.38
    assert metrics["2_accuracy/batched"] == 0.9688 and metrics["2_accuracy/batched_null"] == 0.0625
    assert metrics["3_fidelity/batched_top1"] == 0.9877 and metrics["4_throughput/batched_tokens_per_s"] == 93.95
    assert metrics["batched/peak_rss_mb"] == 612.3 and metrics["peak_rss_load_mb"] == 421.0
    assert metrics["load_time_s"] == 2.051 and metrics["batched/generated_tokens"] == 1727  # counts stay exact
    assert mlflow_metrics(_result().summary())["3_fidelity/batched_kld"] == 0.0001235  # 4 significant digits


def _log(tmp_path, result, experiment="ui", config=None):
    from pipeline.results import save_results
    from pipeline.tracking import default_uri, finish_run, start_run

    folder = tmp_path / "run"
    save_results(result, folder)
    uri = default_uri(tmp_path)
    config = config or {"dataset": {"num_questions": 32}}
    run_id = start_run(uri, experiment, "precision=q4", config, folder)
    return uri, run_id, lambda: finish_run(uri, run_id, folder, config)


def test_a_run_gets_system_metrics_the_kind_tag_and_the_saved_view(tmp_path, monkeypatch):
    import json
    import threading

    from mlflow import MlflowClient

    from pipeline.tracking import KIND, KIND_TAG, RUNS_VIEW_ID, VIEW_TAG_PREFIX, folder_browse_hint, ui_link

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    uri, run_id, finish = _log(tmp_path, _result())
    time.sleep(1.0)  # the stages, for the sampler
    finish()
    assert not [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor"]  # stopped with the run

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    history = client.get_metric_history(run_id, "system/cpu_utilization_percentage")
    assert len(history) >= 3 and [m.step for m in history] == list(range(len(history)))
    assert "system/system_memory_usage_megabytes" in run.data.metrics
    assert 10 < run.data.metrics["system/process_rss_mb"] < 100_000  # this process, MiB
    logged = [m.key for m in run.data._metric_objs if not m.key.startswith("system/")]
    assert logged[:6] == ["1_time/batched_s", "2_accuracy/batched", "2_accuracy/batched_null", "3_fidelity/batched_kld",
                          "3_fidelity/batched_top1", "4_throughput/batched_tokens_per_s"]  # fmt: skip

    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags[KIND_TAG] == KIND
    view = json.loads(experiment.tags[VIEW_TAG_PREFIX + RUNS_VIEW_ID])
    state = json.loads(view["state"])
    assert view["name"] and isinstance(view["createdAt"], int)
    shown = [c for c in state["selectedColumns"] if c.startswith("metrics.") and c[9:-1] in logged]
    assert shown == [f"metrics.`{key}`" for key in logged[:6]]  # the view shows the run's headline, in order
    assert state["columnOrder"][0] == "attributes.`Run Name`" and state["columnWidths"]["attributes.`Run Name`"] >= 300
    link = ui_link(uri, run.info.experiment_id)
    assert link.endswith(f"/#/experiments/{run.info.experiment_id}/runs?viewStateShareKey={RUNS_VIEW_ID}"
                         "&workflowType=machine_learning") and link.startswith("http://127.0.0.1:5000/")  # fmt: skip
    assert ui_link("http://mlflow.example:5000/", "7").startswith("http://mlflow.example:5000/#/experiments/7/")
    assert folder_browse_hint(tmp_path / "run") == f"mlflow ui --backend-store-uri {uri}, then open {link}"


def test_a_run_shorter_than_one_sampling_interval_still_gets_a_point(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "60")
    uri, run_id, finish = _log(tmp_path, _result())
    start = time.perf_counter()
    finish()
    assert time.perf_counter() - start < 10  # closing does not wait for the next sample
    assert len(MlflowClient(tracking_uri=uri).get_metric_history(run_id, "system/process_rss_mb")) == 1


def test_system_metrics_can_be_turned_off(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from pipeline.tracking import system_metrics_wanted

    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    uri, run_id, finish = _log(tmp_path, _result())
    finish()
    assert not [k for k in MlflowClient(tracking_uri=uri).get_run(run_id).data.metrics if k.startswith("system/")]
    monkeypatch.delenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING")
    assert system_metrics_wanted({}) and not system_metrics_wanted({"tracking": {"system_metrics": False}})


def test_existing_experiments_get_the_kind_the_first_time_and_a_chosen_kind_stays(tmp_path):
    from mlflow import MlflowClient

    from pipeline.tracking import KIND, KIND_TAG, RUNS_VIEW_ID, VIEW_TAG_PREFIX, default_uri, ensure_experiment

    uri = default_uri(tmp_path)
    client = MlflowClient(tracking_uri=uri)
    plain = client.create_experiment("made-elsewhere")
    chosen = client.create_experiment("genai", tags={KIND_TAG: "genai_development"})
    assert ensure_experiment(client, "made-elsewhere", uri) == plain
    ensure_experiment(client, "genai", uri)
    assert client.get_experiment(plain).tags[KIND_TAG] == KIND
    tags = client.get_experiment(chosen).tags
    assert tags[KIND_TAG] == "genai_development" and VIEW_TAG_PREFIX + RUNS_VIEW_ID in tags


def test_process_metrics_sample_the_process_they_are_given(tmp_path, monkeypatch):
    """The tracking agent samples the run's process, not itself: a small process's memory is not this one's."""
    import subprocess
    import sys

    from mlflow import MlflowClient

    from pipeline.results import save_results
    from pipeline.tracking import default_uri, finish_run, start_run

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    small = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        folder, uri, config = tmp_path / "run", default_uri(tmp_path), {"dataset": {"num_questions": 1}}
        save_results(_result(), folder)
        mine = start_run(uri, "pids", "this process", config, folder)
        theirs = start_run(uri, "pids", "a small process", config, folder, pid=small.pid)
        time.sleep(1.0)
        finish_run(uri, mine, folder, config)
        finish_run(uri, theirs, folder, config)
    finally:
        small.kill()
    client = MlflowClient(tracking_uri=uri)
    this_mb = client.get_run(mine).data.metrics["system/process_rss_mb"]
    small_mb = client.get_run(theirs).data.metrics["system/process_rss_mb"]
    assert small_mb < 40 < this_mb, (small_mb, this_mb)  # a bare interpreter against one with torch and MLflow
