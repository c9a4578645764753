"""MLflow logging of a run. The core never imports mlflow; this module, `sync`, `report`, `sweep` and `bench` do.

A run is opened before the stages (params, status RUNNING) and closed after them from what the run
folder holds (metrics, tags, artifacts), so a crash or an interrupt leaves a FAILED or KILLED run,
not a RUNNING one. `run.py` does both through `tracking_agent`, a process of its own that opens the run
while the model loads (MLflow's import is not on the way to a ready engine) and closes it as told.
`sync_folder` logs a saved run folder later, into the same run when one exists.
Clients come from `client_for`, which first checks that the store answers: a store that is down costs
seconds, not MLflow's retries.

What the MLflow UI shows first is decided here too: the experiment's kind tag, a saved runs view whose
columns lead with the numbers a sweep compares (`RUNS_VIEW_ID`), the headline metrics (`HEADLINE_METRICS`,
named so that MLflow's alphabetical lists put them first), values rounded to what they resolve, and
MLflow's system metrics sampled while the run is open.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

from pipeline.errors import PipelineError
from pipeline.results import FAILURES_FILE, PREDICTIONS_FILE, RESULTS_FILE, Prediction

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
TRACKING_FILE = "tracking.json"  # in the run folder: where the run was (to be) logged
DATASET_FILE = "dataset.json"  # in the run folder: name, digest and source of the questions the run evaluated
PREDICTIONS_TABLE = "predictions.json"  # the predictions as an MLflow table (the UI shows it as one)
FAILURES_TABLE = "failures.json"  # the wrong or missing answers with their failure class, as an MLflow table
FOLDER_TAG = "run_folder"
STATUS_BY_RESULT = {"finished": "FINISHED", "killed": "KILLED", "running": "FAILED", "failed": "FAILED"}
log = logging.getLogger(__name__)


# The numbers a sweep compares, first, under names that MLflow's alphabetical lists (column picker, charts,
# `Array.sort` in its UI) put first and in this order: stage times, accuracy with the null model's, fidelity
# against the fp32 reference, tokens/s. They repeat `<stage>/<field>` metrics, which are all logged as well.
HEADLINE_METRICS = (
    ("1_time/batched_s", "batched/wall_time_s"),
    ("1_time/single_s", "single/wall_time_s"),
    ("2_accuracy/batched", "batched/accuracy"),
    ("2_accuracy/batched_null", "batched/accuracy_null"),
    ("2_accuracy/single", "single/accuracy"),
    ("2_accuracy/single_null", "single/accuracy_null"),
    ("3_fidelity/batched_kld", "batched/kld_mean"),
    ("3_fidelity/batched_top1", "batched/top1_agreement"),
    ("3_fidelity/single_kld", "single/kld_mean"),
    ("3_fidelity/single_top1", "single/top1_agreement"),
    ("4_throughput/batched_tokens_per_s", "batched/tokens_per_s"),
    ("4_throughput/single_tokens_per_s", "single/tokens_per_s"),
)
# results.json fields outside its `metrics` block that MLflow gets too (older results.json lacked them there)
EXTRA_METRICS = ("peak_rss_load_mb",)


def mlflow_metrics(results: dict) -> dict[str, float]:
    """The metrics of a results.json record as MLflow gets them: headline first, then every metric, in key order.

    Values are rounded to what the measurement resolves (`round_metric`); NaN, infinite and missing values
    (a fidelity or a null model not computed) are left out.
    """
    source = dict(results.get("metrics") or {})
    for key in EXTRA_METRICS:
        source.setdefault(key, results.get(key))
    values = {key: source.get(field) for key, field in HEADLINE_METRICS}
    values.update(source)
    finite = {}
    for key, value in values.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            finite[key] = round_metric(key, number)
    return dict(sorted(finite.items()))  # the order MLflow's run page and compare view list them in


def round_metric(key: str, value: float) -> float:
    """`value` rounded to what metric `key` resolves, so the UI shows 18.38 s, not 18.381234567890123.

    Counts, flags and bytes stay exact; times keep 4 significant digits (down to 1 µs), tokens/s 4 significant
    digits, memory 0.1 MiB, accuracies and shares 4 decimals (1/n resolved for n up to 10 000), KL divergences
    4 significant digits, anything else 6.
    """
    name = key.rsplit("/", 1)[-1]
    if value == int(value) and abs(value) < 2**53:
        return value
    if name.endswith("_per_s"):
        return _significant(value, 4)
    if name.endswith("_s"):
        return round(_significant(value, 4), 6)
    if name.endswith("_mb"):
        return round(value, 1)
    if "kld" in name:
        return _significant(value, 4)
    if "accuracy" in key or name.endswith(("_rate", "_share", "_agreement", "_top1", "_null")):
        return round(value, 4)
    return _significant(value, 6)


def _significant(value: float, digits: int) -> float:
    return float(f"{value:.{digits}g}")


def default_uri(launch_dir: Path) -> str:
    """SQLite store in the launch directory, absolute so every multirun job writes the same file."""
    return f"sqlite:///{(Path(launch_dir) / 'mlflow.db').resolve()}"


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    """Nested config to {'a.b.c': 'value'}; lists become JSON text."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
            flat[name] = text[:MAX_PARAM_LENGTH]
    return flat


# server databases MLflow takes as a store, and their usual ports
DATABASE_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}
# the pip package that provides a missing database driver module
DRIVER_PACKAGES = {"psycopg": "psycopg[binary]", "psycopg2": "psycopg2-binary", "MySQLdb": "mysqlclient",
                   "pymysql": "pymysql", "pyodbc": "pyodbc", "pymssql": "pymssql"}  # fmt: skip
SQLITE_HEADER = b"SQLite format 3\x00"


def check_reachable(uri: str, timeout_s: float = 3.0) -> None:
    """Fail in seconds, not after MLflow's minutes of retries, when the store is down or its driver is missing.

    http(s): the server's port answers. Database URIs: the driver imports, the server's port answers and
    one connection opens; SQLite: the database file can be created or written where the URI says.
    """
    scheme = urlparse(uri).scheme.split("+", 1)[0]
    if scheme in ("http", "https"):
        parsed = urlparse(uri)
        _check_port(uri, parsed.hostname, parsed.port or (443 if scheme == "https" else 80), timeout_s)
    elif scheme == "sqlite" or scheme in DATABASE_PORTS:
        _check_database(uri, scheme, timeout_s)


def _check_port(shown: str, host: str | None, port: int, timeout_s: float) -> None:
    try:
        socket.create_connection((host or "127.0.0.1", port), timeout=timeout_s).close()
    except OSError as err:
        raise PipelineError(f"tracking store {shown} is unreachable ({err})") from None


def _check_database(uri: str, scheme: str, timeout_s: float) -> None:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(uri)
        dialect = url.get_dialect()
    except ArgumentError as err:
        raise PipelineError(f"tracking.uri={uri} is not a database URL MLflow can use ({err})") from None
    shown = url.render_as_string(hide_password=True)
    try:
        dialect.import_dbapi()
    except ImportError as err:
        module = getattr(err, "name", None) or url.get_driver_name()
        package = DRIVER_PACKAGES.get(str(module).split(".")[0], module)
        raise PipelineError(
            f"tracking store {shown} needs the {url.get_driver_name()} driver, which is not installed "
            f"({_first_line(err)}); pip install {package}, or use another tracking.uri"
        ) from None
    if scheme == "sqlite":
        _check_sqlite_file(shown, url.database)
        return
    if url.host:  # without a host the driver uses a local socket; the connection below still tries it
        _check_port(shown, url.host, url.port or DATABASE_PORTS[scheme], timeout_s)
    _check_connection(shown, url, timeout_s)


def _check_connection(shown: str, url, timeout_s: float) -> None:
    """Open one connection, in a thread so that a server that never answers costs `timeout_s`, not a hang."""
    import threading

    import sqlalchemy
    from sqlalchemy.pool import NullPool

    outcome: list[BaseException | None] = []

    def connect() -> None:
        try:
            engine = sqlalchemy.create_engine(url, poolclass=NullPool)
            engine.connect().close()
            engine.dispose()
            outcome.append(None)
        except Exception as err:
            outcome.append(err)

    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    worker.join(timeout_s)
    if not outcome:
        raise PipelineError(f"tracking store {shown} does not answer within {timeout_s:.0f} s")
    if outcome[0] is not None:
        raise PipelineError(f"tracking store {shown} refuses the connection ({_first_line(outcome[0])})")


def _check_sqlite_file(shown: str, database: str | None) -> None:
    """The SQLite file exists and is a database, or the closest existing folder above it is writable."""
    if not database or database == ":memory:":
        return
    path = Path(database).expanduser()
    fix = "point tracking.uri at sqlite:///<a writable folder>/mlflow.db"
    if path.exists():
        if not path.is_file() or not os.access(path, os.R_OK | os.W_OK):
            raise PipelineError(f"tracking store {shown}: {path} is not a writable file; {fix}")
        with open(path, "rb") as handle:
            head = handle.read(len(SQLITE_HEADER))
        if head and head != SQLITE_HEADER:
            raise PipelineError(f"tracking store {shown}: {path} is not an SQLite database; {fix}")
        return
    folder = path.parent
    while not folder.exists():  # MLflow creates the missing folders
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise PipelineError(f"tracking store {shown}: cannot create {path} ({folder} is not a writable folder); {fix}")


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


# MLflow's experiment kind: what its UI's type selector wrote for "Machine learning" experiments, and what 3.x UIs
# before the sidebar's "GenAI / Model training" switch read to open the runs table instead of the GenAI overview
# (3.17 decides by the switch alone: the runs table needs "Model training", or `ui_link`)
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"
# a saved view of the runs table (the UI's "Views" menu, an experiment tag in the UI's own format)
VIEW_TAG_PREFIX = "mlflow.sharedViewState."
RUNS_VIEW_ID, RUNS_VIEW_NAME = "pipeline-compare", "Speed, accuracy, fidelity"


def ensure_experiment(client, name: str, uri: str) -> str:
    """The id of experiment `name`, created (with artifacts beside a SQLite store) when it does not exist.

    Created or not, the experiment gets the model-development kind and the saved runs view when it lacks them
    (a kind or a view someone set is kept).
    """
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        _tag_experiment(client, experiment.experiment_id, experiment.tags)
        return experiment.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:///"):  # keep artifacts beside the database, not in whatever folder was current
        artifact_location = (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=artifact_location, tags=experiment_tags())
    except Exception:  # a parallel job created it first
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        _tag_experiment(client, experiment.experiment_id, experiment.tags)
        return experiment.experiment_id


def experiment_tags() -> dict[str, str]:
    """The tags every experiment the project logs to carries: its kind and the saved runs view."""
    return {KIND_TAG: KIND, VIEW_TAG_PREFIX + RUNS_VIEW_ID: runs_view()}


def _tag_experiment(client, experiment_id: str, tags: dict[str, str]) -> None:
    for key, value in experiment_tags().items():
        if not (tags.get(key) or "").strip():
            try:
                client.set_experiment_tag(experiment_id, key, value)
            except Exception as err:  # a parallel job setting the same tag; a tag never fails the run
                log.debug(f"experiment tag {key} not set: {err}")


def runs_view() -> str:
    """The saved runs view as the MLflow UI stores one (3.x): run name wide, then the headline metrics in order.

    Opened from the runs table's "Views" menu, or by `ui_link`. Its state is what the UI's own "Save as new
    view" writes (selected columns, their order and widths, the search facets); the UI fills in the rest.
    """
    metrics = [f"metrics.`{key}`" for key, _ in HEADLINE_METRICS]
    # wide enough for the whole header: the UI's default 100 px cut "2_accuracy/batched_null" to "2_accur..."
    widths = {"attributes.`Run Name`": 320, **{f"metrics.`{key}`": 40 + 7 * len(key) for key, _ in HEADLINE_METRICS}}
    state = {
        "searchFilter": "", "orderByKey": "attributes.start_time", "orderByAsc": False, "startTime": "ALL",
        "lifecycleFilter": "Active", "datasetsFilter": [], "modelVersionFilter": "All Runs",
        "selectedColumns": [*metrics, "attributes.`Dataset`"],
        "columnOrder": ["attributes.`Run Name`", "runDateAndNestInfo", *metrics, "duration", "attributes.`Dataset`"],
        "columnWidths": widths,
    }  # fmt: skip
    created_ms = 1_700_000_000_000  # fixed: the same view text whichever run wrote it
    record = {"name": RUNS_VIEW_NAME, "createdAt": created_ms, "updatedAt": created_ms, "state": json.dumps(state)}
    return json.dumps(record)


def ui_link(uri: str, experiment_id: str, ui_base: str = "http://127.0.0.1:5000") -> str:
    """The MLflow UI address of the experiment's runs table in the saved view, in the UI's model-training mode.

    A tracking server serves its own UI (`uri` itself); for a database store, `mlflow ui` on `ui_base`.
    """
    base = uri.rstrip("/") if urlparse(uri).scheme in ("http", "https") else ui_base
    return f"{base}/#/experiments/{experiment_id}/runs?viewStateShareKey={RUNS_VIEW_ID}&workflowType=machine_learning"


def browse_hint(uri: str, experiment_id: str) -> str:
    """How to see the runs: start `mlflow ui` on a database store (a tracking server serves its own), open `ui_link`."""
    link = ui_link(uri, experiment_id)
    if urlparse(uri).scheme in ("http", "https"):
        return f"open {link}"
    return f"mlflow ui --backend-store-uri {uri}, then open {link}"


def client_for(uri: str):
    """An MlflowClient for `uri`, after checking that its store answers (see `check_reachable`)."""
    check_reachable(uri)
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


SYSTEM_METRICS_INTERVAL_S = 2.0  # a 20 s run gets 10 points; MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it
SYSTEM_METRICS_STOP_S = 5.0  # how long closing a run waits for the sampler (a store that stopped answering)
_monitors: dict[str, object] = {}
_monitors_lock = threading.Lock()


def system_metrics_wanted(config: dict | None = None) -> bool:
    """True unless `tracking.system_metrics` is false or MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING says false."""
    setting = ((config or {}).get("tracking") or {}).get("system_metrics", True)
    env = os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "").strip().lower()
    return bool(setting) and env not in ("false", "0", "no", "off")


def start_system_metrics(uri: str, run_id: str, interval_s: float | None = None, pid: int | None = None) -> bool:
    """Sample CPU, memory, disk, network (a GPU's where there is one) and the run's process's memory into the run.

    MLflow's own sampler, as `mlflow.start_run(log_system_metrics=True)` starts it: the run page's "System
    metrics" tab charts `system/...`. `pid` is the process that runs the stages (default: this one; the
    tracking agent samples its parent). Returns False (with one warning) where it cannot run, e.g. without psutil.
    """
    try:
        monitor = _system_monitor_class(pid)(run_id, sampling_interval=interval_s or SYSTEM_METRICS_INTERVAL_S,
                                             tracking_uri=uri)  # fmt: skip
        monitor.start()
    except ImportError as err:
        log.warning(f"no system metrics for MLflow run {run_id} ({err}); pip install psutil")
        return False
    except Exception as err:  # the run is logged all the same, without the System metrics tab
        log.warning(f"no system metrics for MLflow run {run_id}: {_first_line(err)}")
        return False
    with _monitors_lock:
        _monitors[run_id] = monitor
    return True


def stop_system_metrics(run_id: str) -> None:
    """Stop the run's sampler, logging what it sampled since its last point; a no-op when none runs."""
    with _monitors_lock:
        monitor = _monitors.pop(run_id, None)
    if monitor is not None:
        monitor.finish()


def _system_monitor_class(pid: int | None = None):
    """MLflow's SystemMetricsMonitor with process `pid`'s (default: this one's) memory and CPU, and a bounded,
    lossless stop."""
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # its start/stop lines are noise here
    import psutil
    from mlflow.system_metrics.metrics.base_metrics_monitor import BaseMetricsMonitor
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    class ProcessMonitor(BaseMetricsMonitor):
        """The run's process's resident memory (MiB like `<stage>/peak_rss_mb`; the peak of a point's samples) and
        CPU use (% of one core: above 100 with several threads)."""

        def __init__(self):
            super().__init__()
            self._me = psutil.Process(pid)
            self._me.cpu_percent()  # the first call only starts psutil's interval

        def collect_metrics(self):
            self._metrics["process_rss_mb"].append(self._me.memory_info().rss / 2**20)
            self._metrics["process_cpu_percentage"].append(self._me.cpu_percent())

        def aggregate_metrics(self):
            rss, cpu = self._metrics.get("process_rss_mb"), self._metrics.get("process_cpu_percentage")
            if not rss:
                return {}
            return {"process_rss_mb": round(max(rss), 1), "process_cpu_percentage": round(sum(cpu) / len(cpu), 1)}

    class Monitor(SystemMetricsMonitor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.monitors.append(ProcessMonitor())

        def finish(self):
            # MLflow's finish() joins the sampler without a limit, and drops the samples taken since its last
            # point: a run shorter than one interval got none. Here the join is bounded (a sampler stuck in a
            # store's retries is left behind: it is a daemon thread) and the last samples become one more point.
            thread = self._process
            if thread is None:
                return
            self._shutdown_event.set()
            thread.join(SYSTEM_METRICS_STOP_S)
            self._process = None
            if thread.is_alive():
                log.warning(f"system metrics of MLflow run {self._run_id} stopped without their last point")
                return
            try:
                leftover = self.aggregate_metrics()
                if leftover:
                    self.publish_metrics(leftover)
                self.mlflow_logger.flush()
            except Exception as err:
                log.warning(f"could not log the last system metrics of MLflow run {self._run_id}: {err}")

    return Monitor


def start_run(
    uri: str,
    experiment: str,
    run_name: str,
    config: dict,
    output_dir: Path,
    parent_run_id: str | None = None,
    pid: int | None = None,
) -> str:
    """Open a RUNNING run with the flattened config as params; returns its id and notes it in the run folder.

    With `parent_run_id` the run is nested under a sweep's parent run. System metrics are sampled from here
    until `finish_run` (see `start_system_metrics`), with process `pid`'s (default: this one's) memory and CPU.
    """
    _write_dataset_file(output_dir, config)  # first: the folder keeps it even when the store is down
    client = client_for(uri)
    experiment_id = ensure_experiment(client, experiment, uri)
    tags = {FOLDER_TAG: str(Path(output_dir).resolve())}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    _log_params(client, run.info.run_id, config)
    _write_tracking_file(output_dir, uri, experiment, run_name, run.info.run_id, experiment_id)
    if system_metrics_wanted(config):
        interval_s = (config.get("tracking") or {}).get("system_metrics_interval_s")
        start_system_metrics(uri, run.info.run_id, interval_s, pid)
    return run.info.run_id


def _write_tracking_file(
    output_dir: Path, uri: str, experiment: str, run_name: str, run_id: str | None, experiment_id: str | None = None
) -> None:
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    record = {"uri": uri, "experiment": experiment, "run_name": run_name, "run_id": run_id}
    if experiment_id is not None:
        record["experiment_id"] = experiment_id
    (Path(output_dir) / TRACKING_FILE).write_text(json.dumps(record, indent=2))


def folder_browse_hint(output_dir: Path) -> str | None:
    """`browse_hint` for the run logged from `output_dir` (from its tracking.json), None when it was not logged."""
    file = Path(output_dir) / TRACKING_FILE
    noted = json.loads(file.read_text()) if file.is_file() else {}
    if not noted.get("run_id") or not noted.get("experiment_id"):
        return None
    return browse_hint(noted["uri"], noted["experiment_id"])


def dataset_record(config: dict) -> dict | None:
    """Name, digest, source and size of the questions a run with `config` evaluates; None when unreadable.

    The digest covers exactly the questions and answers used (the first `dataset.num_questions`), so runs
    on the same questions share it and any change to them shows.
    """
    from pipeline.data import dataset_file, load_items, select

    dataset = config.get("dataset") or {}
    try:
        path = dataset_file(dataset.get("path"), dataset.get("name")).resolve()
        items, _ = select(load_items(path), int(dataset.get("num_questions") or 32))
    except (PipelineError, ValueError, TypeError):  # the run itself reports a bad data set
        return None
    content = json.dumps([[item.question, item.answer] for item in items], ensure_ascii=False)
    digest = hashlib.sha256(content.encode()).hexdigest()[:8]
    return {"name": path.stem, "digest": digest, "source": str(path), "num_rows": len(items)}


def _write_dataset_file(output_dir: Path, config: dict) -> None:
    record = dataset_record(config)
    if record is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / DATASET_FILE).write_text(json.dumps(record, indent=2))


def note_intended_tracking(output_dir: Path, uri: str, experiment: str, run_name: str) -> None:
    """Record where the run should have been logged, for `pipeline.sync`, when the store was unreachable."""
    _write_tracking_file(output_dir, uri, experiment, run_name, None)


def _log_params(client, run_id: str, config: dict) -> None:
    from mlflow.entities import Param

    params = sorted(flatten(config).items())
    for begin in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=[Param(k, v) for k, v in params[begin : begin + 100]])


def _log_folder(client, run_id: str, output_dir: Path, config: dict | None = None) -> str:
    """Metrics, tags, artifacts, the data set input and the predictions table from a run folder.

    Returns the result status ('finished', 'killed', ...). Safe to repeat: nothing is logged twice.
    """
    from mlflow.entities import Metric, RunTag

    _log_dataset(client, run_id, output_dir, config or {})
    results_file = output_dir / RESULTS_FILE
    if not results_file.is_file():
        return "failed"
    results = json.loads(results_file.read_text())
    environment = results.get("environment", {})
    tags = {
        "device_name": environment.get("device_name", ""),
        "torch_version": environment.get("torch_version", ""),
        "transformers_version": environment.get("transformers_version", ""),
        "git_commit": environment.get("git_commit", ""),
        "dtype": results.get("dtype", ""),
        "attention": results.get("attention", ""),
        "device": results.get("device", ""),
        "result_status": results.get("status", ""),
        "cpu_kind": environment.get("cpu_kind", ""),
        **results.get("tags", {}),  # what the backend chose and why (e.g. the calibration)
    }
    metrics = [Metric(k, v, 0, 0) for k, v in mlflow_metrics(results).items()]
    for begin in range(0, len(metrics), 500):
        client.log_batch(run_id, metrics=metrics[begin : begin + 500])
    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
    for name in (RESULTS_FILE, PREDICTIONS_FILE, FAILURES_FILE):
        if (output_dir / name).is_file():
            client.log_artifact(run_id, str(output_dir / name))
    hydra_dir = output_dir / ".hydra"
    if hydra_dir.is_dir():
        client.log_artifacts(run_id, str(hydra_dir), ".hydra")
    _log_predictions_table(client, run_id, output_dir)
    return results.get("status", "failed")


def _log_dataset(client, run_id: str, output_dir: Path, config: dict) -> None:
    """The evaluation set as the run's dataset input (MLflow's log_input): name, digest, source file."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    file = output_dir / DATASET_FILE
    record = json.loads(file.read_text()) if file.is_file() else dataset_record(config)
    if record is None:
        return
    schema = {"mlflow_colspec": [{"type": "string", "name": "question", "required": True},
                                 {"type": "double", "name": "answer", "required": True}]}  # fmt: skip
    dataset = Dataset(
        name=record["name"],
        digest=record["digest"],
        source_type="local",
        source=json.dumps({"uri": record["source"]}),
        schema=json.dumps(schema),
        profile=json.dumps({"num_rows": record["num_rows"]}),
    )
    inputs = [DatasetInput(dataset, [InputTag("mlflow.data.context", "evaluation")])]
    try:
        client.log_inputs(run_id, inputs)
    except Exception as error:
        # the runs of a parallel sweep log the same data set at once: on a database store the second insert
        # of its row can fail on the unique key while the first commits; by now the row exists, so retry once
        if "unique" not in str(error).lower() and "duplicate" not in str(error).lower():
            raise
        time.sleep(0.5)
        client.log_inputs(run_id, inputs)


def predictions_table(predictions_csv: Path) -> dict[str, list]:
    """predictions.csv as typed columns (numbers as numbers, booleans as booleans), for MLflow's log_table."""
    convert = {"int": int, "float": float, "bool": lambda text: text == "True", "str": str}
    types = {f.name: convert.get(str(f.type), str) for f in dataclasses.fields(Prediction)}
    with open(predictions_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    columns = list(rows[0]) if rows else list(types)
    return {name: [types.get(name, str)(row[name]) for row in rows] for name in columns}


def _log_predictions_table(client, run_id: str, output_dir: Path) -> None:
    """predictions.csv and failures.csv (same columns, only the failed rows) as MLflow tables."""
    logged = {a.path for a in client.list_artifacts(run_id)}
    for csv_name, table in ((PREDICTIONS_FILE, PREDICTIONS_TABLE), (FAILURES_FILE, FAILURES_TABLE)):
        file = output_dir / csv_name
        # log_table appends to a table that exists: log it once, so a later sync adds no second copy of the rows
        if file.is_file() and table not in logged:
            columns = predictions_table(file)
            if any(columns.values()):  # a run without failures gets no empty table
                client.log_table(run_id, columns, table)


def finish_run(
    uri: str, run_id: str, output_dir: Path, config: dict, status: str | None = None, error: str | None = None
) -> None:
    """Log the run folder's results into the run and close it (status from the results unless given).

    A failed run also gets its error message as the `error` tag and its job log as an artifact. The run's
    system metrics stop first, so their last point lands before the run closes.
    """
    stop_system_metrics(run_id)
    client = client_for(uri)
    client.log_dict(run_id, config, "config.json")
    result_status = _log_folder(client, run_id, Path(output_dir), config)
    if error:
        client.set_tag(run_id, "error", error[:5000])
    for job_log in Path(output_dir).glob("*.log"):
        client.log_artifact(run_id, str(job_log))
    client.set_terminated(run_id, status or STATUS_BY_RESULT.get(result_status, "FAILED"))


def sync_folder(output_dir: Path, uri: str | None = None, experiment: str | None = None) -> tuple[str, bool]:
    """Log a saved run folder to MLflow once: into its existing run if there is one, else a new run.

    Returns (run id, created). Running it twice never makes a second run.
    """
    output_dir = Path(output_dir).resolve()
    if not (output_dir / RESULTS_FILE).is_file():
        raise PipelineError(f"{output_dir} holds no {RESULTS_FILE}; give a run folder under outputs/")
    noted = {}
    if (output_dir / TRACKING_FILE).is_file():
        noted = json.loads((output_dir / TRACKING_FILE).read_text())
    uri = uri or noted.get("uri")
    experiment = experiment or noted.get("experiment") or "unit-conversion"
    if not uri:
        raise PipelineError(f"no tracking URI noted in {output_dir}; pass --uri sqlite:///path/to/mlflow.db")
    client = client_for(uri)
    experiment_id = ensure_experiment(client, experiment, uri)
    existing = client.search_runs(
        [experiment_id], filter_string=f"tags.{FOLDER_TAG} = '{output_dir}'", max_results=1
    )  # the folder path names the run: no duplicates
    config = _folder_config(output_dir)
    if existing:
        run_id, created = existing[0].info.run_id, False
    else:
        run_name = noted.get("run_name") or output_dir.name
        run = client.create_run(experiment_id, run_name=run_name, tags={FOLDER_TAG: str(output_dir)})
        run_id, created = run.info.run_id, True
        _log_params(client, run_id, config)
        client.log_dict(run_id, config, "config.json")
    result_status = _log_folder(client, run_id, output_dir, config)
    if created or client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, STATUS_BY_RESULT.get(result_status, "FAILED"))
    return run_id, created


def _folder_config(output_dir: Path) -> dict:
    """The job's composed config, as Hydra saved it in .hydra/config.yaml."""
    from omegaconf import OmegaConf

    file = output_dir / ".hydra" / "config.yaml"
    if not file.is_file():
        return {}
    return OmegaConf.to_container(OmegaConf.load(file), resolve=False)
