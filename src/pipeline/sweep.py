"""Hydra callback that groups a multirun in MLflow: one parent run per sweep, each job a nested child.

When the sweep ends, the parent gets the comparison (an MLflow table, text and CSV) and two figures, and
the table is printed with the MLflow UI address that opens it. The parent run id travels to the jobs
through `parent_run.json` in the sweep folder, so it works with any launcher (basic, joblib, submitit), in
or out of process. The parent is named by what the sweep varies (`sweep: precision=fp32,bf16`); every
override is its `sweep.overrides` param. While the sweep runs, the parent samples system metrics too.
"""

from __future__ import annotations

import csv
import json
import logging
import tempfile
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

PARENT_FILE = "parent_run.json"
log = logging.getLogger(__name__)


def _is_sweep(override: str) -> bool:
    value = override.split("=", 1)[1] if "=" in override else ""
    return "," in value or value.startswith(("range(", "choice(", "glob(", "interval("))


def sweep_info(sweep_dir: str | Path, uri: str) -> tuple[str | None, list[str]]:
    """The parent run id of the sweep that owns `sweep_dir` (when it logs to the same store) and its swept keys."""
    file = Path(sweep_dir) / PARENT_FILE
    if not file.is_file():
        return None, []
    noted = json.loads(file.read_text())
    return (noted["run_id"], noted.get("swept", [])) if noted.get("uri") == uri else (None, [])


def parent_name(overrides: list[str]) -> str:
    """The parent's run name: the overrides it sweeps (the jobs share the others), e.g. 'sweep: precision=fp32,bf16'."""
    swept = [o for o in overrides if _is_sweep(o)] or overrides
    name = "sweep: " + " ".join(swept)
    return name if len(name) <= 80 else name[:79] + "…"


class MlflowSweepCallback(Callback):
    """Opens the sweep's parent run before any job starts and logs the comparison when all have ended."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        if not config.tracking.enabled:
            return
        from pipeline import tracking

        uri = config.tracking.uri or tracking.default_uri(Path.cwd())
        overrides = list(config.hydra.overrides.task)
        swept_overrides = [o for o in overrides if _is_sweep(o)]
        try:
            client = tracking.client_for(uri)
            experiment_id = tracking.ensure_experiment(client, config.tracking.experiment, uri)
            run = client.create_run(experiment_id, run_name=parent_name(overrides), tags={"pipeline.sweep": "parent"})
            client.log_param(run.info.run_id, "sweep.overrides", " ".join(overrides)[:6000])
        except Exception as err:  # jobs still run and keep their results in their folders
            log.warning(f"no MLflow parent run for this sweep: {err}")
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        swept = [o.split("=", 1)[0].lstrip("+~") for o in swept_overrides]
        record = {"uri": uri, "experiment": config.tracking.experiment, "run_id": run.info.run_id, "swept": swept,
                  "experiment_id": experiment_id}  # fmt: skip
        (sweep_dir / PARENT_FILE).write_text(json.dumps(record))
        tracking_config = OmegaConf.to_container(config.tracking, resolve=True)
        if tracking.system_metrics_wanted({"tracking": tracking_config}):
            tracking.start_system_metrics(uri, run.info.run_id, tracking_config.get("system_metrics_interval_s"))

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if not config.tracking.enabled:
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        if not (sweep_dir / PARENT_FILE).is_file():
            return
        noted = json.loads((sweep_dir / PARENT_FILE).read_text())
        from pipeline import report, tracking

        run_id = noted["run_id"]
        tracking.stop_system_metrics(run_id)
        client = tracking.client_for(noted["uri"])
        try:
            runs = report.load_runs(noted["uri"], noted["experiment"], sweep=run_id)
            rows, base = report.compare(report.rows_from_runs(runs), config.tracking.get("baseline"))
            text = report.table(rows, base)
            print(f"\nsweep comparison (MLflow parent run {run_id}):\n{text}", flush=True)
            if noted.get("experiment_id"):
                print(f"browse the runs: {tracking.browse_hint(noted['uri'], noted['experiment_id'])}", flush=True)
            client.log_text(run_id, text, "comparison.txt")
            columns = report.columns(rows, base)
            client.log_table(run_id, columns, "comparison.json")  # shown as a table in the MLflow UI
            with tempfile.TemporaryDirectory() as tmp:
                table_csv = Path(tmp) / "comparison.csv"
                with open(table_csv, "w", newline="") as handle:
                    writer = csv.writer(handle)
                    writer.writerow(columns)
                    writer.writerows(zip(*columns.values()))
                client.log_artifact(run_id, str(table_csv))
                for figure in report.figures(rows, Path(tmp), ", ".join(noted.get("swept", [])) or None):
                    client.log_artifact(run_id, str(figure))
            for name in ("multirun.yaml",):
                if (sweep_dir / name).is_file():
                    client.log_artifact(run_id, str(sweep_dir / name))
            client.set_tag(run_id, "jobs", str(len(rows)))
            client.set_tag(run_id, "jobs_failed", str(sum(r.status == "FAILED" for r in rows)))
            client.set_terminated(run_id, "FINISHED")
        except Exception as err:
            log.warning(f"could not write the sweep comparison to MLflow: {err}")
            client.set_terminated(run_id, "FAILED")
