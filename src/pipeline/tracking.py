"""Logging a finished run to MLflow: params, metrics, tags and artifacts. The only module that imports mlflow."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.runner import PREDICTIONS_FILE, RESULTS_FILE, RunResult

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value


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


def _experiment_id(mlflow, name: str, uri: str) -> str:
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:///"):  # keep artifacts beside the database, not in whatever folder was current
        artifact_location = (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # a parallel job created it first
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def log_run(
    result: RunResult,
    config: dict,
    output_dir: Path,
    uri: str,
    experiment: str,
    run_name: str,
    hydra_dir: Path | None = None,
) -> str:
    """Log one run and return its MLflow run id."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    experiment_id = _experiment_id(mlflow, experiment, uri)
    tags = {
        "device_name": result.environment["device_name"],
        "torch_version": result.environment["torch_version"],
        "transformers_version": result.environment["transformers_version"],
        "git_commit": result.environment["git_commit"],
        "dtype": result.dtype,
        "attention": result.attention,
        "device": result.device,
    }
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags) as run:
        params = flatten(config)
        items = sorted(params.items())
        for begin in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            mlflow.log_params(dict(items[begin : begin + 100]))
        mlflow.log_metrics(result.metrics())
        mlflow.log_dict(config, "config.json")
        for name in (RESULTS_FILE, PREDICTIONS_FILE):
            if (output_dir / name).is_file():
                mlflow.log_artifact(str(output_dir / name))
        if hydra_dir is not None and hydra_dir.is_dir():
            mlflow.log_artifacts(str(hydra_dir), ".hydra")
        return run.info.run_id
