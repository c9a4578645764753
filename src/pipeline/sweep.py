"""Hydra callback that groups a multirun in MLflow: one parent run per sweep, each job a nested child.

When the sweep ends, the parent gets the comparison (an MLflow table, text and CSV) and two figures, and
the table is printed. The parent run id travels to the jobs through `parent_run.json` in the sweep
folder, so it works with any launcher (basic, joblib, submitit), in or out of process.
"""

from __future__ import annotations

import csv
import json
import logging
import tempfile
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

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


class MlflowSweepCallback(Callback):
    """Opens the sweep's parent run before any job starts and logs the comparison when all have ended."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        if not config.tracking.enabled:
            return
        from pipeline import tracking

        uri = config.tracking.uri or tracking.default_uri(Path.cwd())
        overrides = list(config.hydra.overrides.task)
        try:
            client = tracking.client_for(uri)
            experiment_id = tracking.ensure_experiment(client, config.tracking.experiment, uri)
            run = client.create_run(
                experiment_id, run_name="sweep: " + " ".join(overrides), tags={"pipeline.sweep": "parent"}
            )
            client.log_param(run.info.run_id, "sweep.overrides", " ".join(overrides)[:6000])
        except Exception as err:  # jobs still run and keep their results in their folders
            log.warning(f"no MLflow parent run for this sweep: {err}")
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        swept = [o.split("=", 1)[0].lstrip("+~") for o in overrides if _is_sweep(o)]
        record = {"uri": uri, "experiment": config.tracking.experiment, "run_id": run.info.run_id, "swept": swept}
        (sweep_dir / PARENT_FILE).write_text(json.dumps(record))

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if not config.tracking.enabled:
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        if not (sweep_dir / PARENT_FILE).is_file():
            return
        noted = json.loads((sweep_dir / PARENT_FILE).read_text())
        from pipeline import report, tracking

        client = tracking.client_for(noted["uri"])
        run_id = noted["run_id"]
        try:
            runs = report.load_runs(noted["uri"], noted["experiment"], sweep=run_id)
            rows, base = report.compare(report.rows_from_runs(runs), config.tracking.get("baseline"))
            text = report.table(rows, base)
            print(f"\nsweep comparison (MLflow parent run {run_id}):\n{text}", flush=True)
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
                for figure in report.figures(rows, Path(tmp)):
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
