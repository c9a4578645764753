"""Compare runs: stage times, tokens/s, speed-up and accuracy change against a baseline, Pareto front.

    python -m pipeline.report --experiment unit-conversion [--sweep PARENT_RUN_ID]
        [--baseline 'precision=fp32,attention=eager'] [--uri sqlite:///mlflow.db]

The same report is logged to a sweep's parent run when a multirun ends (see `pipeline.sweep`).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.summary import format_table


@dataclass
class Row:
    run_id: str
    name: str
    status: str
    params: dict
    single_s: float
    batched_s: float
    single_tokens_per_s: float
    batched_tokens_per_s: float
    accuracy: float
    speedup_single: float = math.nan
    speedup_batched: float = math.nan
    accuracy_change: float = math.nan
    pareto: bool = False
    # the course grader's points of both stages together, and of how many (see pipeline.grader)
    grader_points: float = math.nan
    grader_max_points: float = math.nan


@dataclass
class StoredRun:
    """What the report reads of an MLflow run; the same whether it came from SQLite directly or from MLflow."""

    run_id: str
    status: str
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]


def _metric(run: StoredRun, key: str) -> float:
    return float(run.metrics.get(key, math.nan))


def rows_from_runs(runs: list[StoredRun]) -> list[Row]:
    """One row per run, accuracy from the batched stage, else the single."""
    rows = []
    for run in runs:
        accuracy = _metric(run, "batched/accuracy")
        if math.isnan(accuracy):
            accuracy = _metric(run, "single/accuracy")
        rows.append(
            Row(
                run_id=run.run_id,
                name=run.tags.get("mlflow.runName", run.run_id[:8]),
                status=run.status,
                params=dict(run.params),
                single_s=_metric(run, "single/wall_time_s"),
                batched_s=_metric(run, "batched/wall_time_s"),
                single_tokens_per_s=_metric(run, "single/tokens_per_s"),
                batched_tokens_per_s=_metric(run, "batched/tokens_per_s"),
                accuracy=accuracy,
                grader_points=_stages_sum(run, "grader_points"),
                grader_max_points=_stages_sum(run, "grader_max_points"),
            )
        )
    return rows


def _stages_sum(run: StoredRun, name: str) -> float:
    """A stage metric summed over the stages that have it; NaN when none does."""
    values = [v for v in (_metric(run, f"{stage}/{name}") for stage in ("single", "batched")) if not math.isnan(v)]
    return sum(values) if values else math.nan


def matches(row: Row, baseline: str) -> bool:
    """True when every `key=value` of `baseline` is in the run's name or params (group names map to params)."""
    wanted = [part.strip() for part in baseline.split(",") if part.strip()]
    names = set(row.name.split(","))
    for item in wanted:
        key, _, value = item.partition("=")
        param_values = {v for k, v in row.params.items() if k == key or k.startswith(f"{key}.")}
        if item not in names and value not in param_values:
            return False
    return True


def compare(rows: list[Row], baseline: str | None = None) -> tuple[list[Row], Row | None]:
    """Fill speed-ups and accuracy changes against the baseline row (the first row when none is named)."""
    finished = [r for r in rows if r.status == "FINISHED"]
    base = (
        next((r for r in finished if matches(r, baseline)), None) if baseline else (finished[0] if finished else None)
    )
    if baseline and base is None:
        raise PipelineError(f"no finished run matches --baseline '{baseline}'; runs: {', '.join(r.name for r in rows)}")
    for row in rows:
        if base is not None:
            row.speedup_single = base.single_s / row.single_s if row.single_s else math.nan
            row.speedup_batched = base.batched_s / row.batched_s if row.batched_s else math.nan
            row.accuracy_change = row.accuracy - base.accuracy
    mark_pareto(finished)
    return rows, base


def _latency(row: Row) -> float:
    return row.single_s if not math.isnan(row.single_s) else row.batched_s


def mark_pareto(rows: list[Row]) -> None:
    """Mark runs no other run beats on both latency and accuracy (at least as good in both, better in one)."""
    for row in rows:
        row.pareto = not any(
            _latency(other) <= _latency(row)
            and other.accuracy >= row.accuracy
            and (_latency(other) < _latency(row) or other.accuracy > row.accuracy)
            for other in rows
            if other is not row
        )


def _f(value: float, fmt: str) -> str:
    return "-" if value is None or math.isnan(value) else format(value, fmt)


def table(rows: list[Row], base: Row | None) -> str:
    """The comparison as a fixed-width text table (also valid to read as plain text in MLflow)."""
    headers = ["run", "status", "single_s", "batched_s", "single tok/s", "batched tok/s", "speed-up single",
               "speed-up batched", "accuracy", "Δ accuracy", "course points", "pareto"]  # fmt: skip
    body = [
        [
            r.name + (" (baseline)" if r is base else ""),
            r.status,
            _f(r.single_s, ".2f"),
            _f(r.batched_s, ".2f"),
            _f(r.single_tokens_per_s, ".1f"),
            _f(r.batched_tokens_per_s, ".1f"),
            _f(r.speedup_single, ".2f") + "x",
            _f(r.speedup_batched, ".2f") + "x",
            _f(r.accuracy, ".3f"),
            _f(r.accuracy_change, "+.3f"),
            _f(r.grader_points, ".1f") + ("" if math.isnan(r.grader_max_points) else f"/{r.grader_max_points:.0f}"),
            "*" if r.pareto else "",
        ]  # fmt: skip
        for r in rows
    ]
    return format_table(headers, body)


def columns(rows: list[Row], base: Row | None) -> dict[str, list]:
    """The comparison as named columns of plain values: the sweep's CSV file and its MLflow table."""
    return {
        "run": [r.name for r in rows],
        "baseline": [r is base for r in rows],
        "status": [r.status for r in rows],
        "single_s": [r.single_s for r in rows],
        "batched_s": [r.batched_s for r in rows],
        "single_tokens_per_s": [r.single_tokens_per_s for r in rows],
        "batched_tokens_per_s": [r.batched_tokens_per_s for r in rows],
        "speedup_single": [r.speedup_single for r in rows],
        "speedup_batched": [r.speedup_batched for r in rows],
        "accuracy": [r.accuracy for r in rows],
        "accuracy_change": [r.accuracy_change for r in rows],
        "pareto": [r.pareto for r in rows],
    }


def figures(rows: list[Row], folder: Path) -> list[Path]:
    """Latency versus accuracy with the Pareto front, and speed-up bars; PNG files in `folder`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    done = [r for r in rows if r.status == "FINISHED"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([_latency(r) for r in done], [r.accuracy for r in done], color="tab:blue")
    for r in done:
        ax.annotate(r.name, (_latency(r), r.accuracy), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front = sorted((r for r in done if r.pareto), key=_latency)
    ax.plot([_latency(r) for r in front], [r.accuracy for r in front], "r-o", label="Pareto front")
    ax.set_xlabel("stage time, s (single stage; batched where no single)")
    ax.set_ylabel("accuracy")
    ax.legend()
    fig.tight_layout()
    pareto_png = folder / "latency_vs_accuracy.png"
    fig.savefig(pareto_png, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = [r.name for r in done]
    positions = range(len(done))
    ax.bar([p - 0.2 for p in positions], [r.speedup_single for r in done], width=0.4, label="single")
    ax.bar([p + 0.2 for p in positions], [r.speedup_batched for r in done], width=0.4, label="batched")
    ax.set_xticks(list(positions), names, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("speed-up over baseline")
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.legend()
    fig.tight_layout()
    bars_png = folder / "speedup.png"
    fig.savefig(bars_png, dpi=110)
    plt.close(fig)
    return [pareto_png, bars_png]


def load_runs(uri: str, experiment: str, sweep: str | None = None) -> list[StoredRun]:
    """The runs of an experiment (children of `sweep` when given, else every run but sweep parents), oldest first.

    A SQLite store is read with plain SQL, which answers in a fraction of a second; importing MLflow alone
    takes seconds. Any other store, or a SQLite file whose tables look different, goes through MLflow.
    """
    runs = _runs_from_sqlite(uri, experiment, sweep) if uri.startswith("sqlite:///") else None
    if runs is None:
        runs = _runs_from_mlflow(uri, experiment, sweep)
    if not sweep:
        runs = [r for r in runs if r.tags.get("pipeline.sweep") != "parent"]
    return runs


def _no_experiment(uri: str, experiment: str) -> PipelineError:
    return PipelineError(f"no experiment '{experiment}' in {uri}; check --experiment and --uri")


def _runs_from_mlflow(uri: str, experiment: str, sweep: str | None) -> list[StoredRun]:
    from pipeline.tracking import client_for

    client = client_for(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise _no_experiment(uri, experiment)
    query = f"tags.mlflow.parentRunId = '{sweep}'" if sweep else ""
    runs = client.search_runs([found.experiment_id], filter_string=query, max_results=5000, order_by=["start_time ASC"])
    return [
        StoredRun(r.info.run_id, r.info.status, dict(r.data.params), dict(r.data.metrics), dict(r.data.tags))
        for r in runs
    ]


def _runs_from_sqlite(uri: str, experiment: str, sweep: str | None) -> list[StoredRun] | None:
    """MLflow's own tables (experiments, runs, params, latest_metrics, tags) read directly; None if they differ."""
    import sqlite3

    path = Path(uri[len("sqlite:///") :])
    if not path.is_file():
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as db:
            found = db.execute(
                "SELECT experiment_id FROM experiments WHERE name = ? AND lifecycle_stage = 'active' "
                "ORDER BY experiment_id LIMIT 1",
                (experiment,),
            ).fetchone()
            if found is None:
                raise _no_experiment(uri, experiment)
            runs = db.execute(
                "SELECT run_uuid, status FROM runs WHERE experiment_id = ? AND lifecycle_stage = 'active' "
                "ORDER BY start_time, run_uuid",
                found,
            ).fetchall()
            by_id = {run_id: StoredRun(run_id, status, {}, {}, {}) for run_id, status in runs}
            tables = [("params", "value", "params"), ("tags", "value", "tags"),
                      ("latest_metrics", "CASE WHEN is_nan THEN NULL ELSE value END", "metrics")]  # fmt: skip
            for table, value, field_name in tables:
                query = f"SELECT t.run_uuid, t.key, {value} FROM {table} t JOIN runs r ON r.run_uuid = t.run_uuid "
                for run_id, key, v in db.execute(query + "WHERE r.experiment_id = ?", found):
                    if run_id in by_id:
                        v = (math.nan if v is None else float(v)) if field_name == "metrics" else v
                        getattr(by_id[run_id], field_name)[key] = v
    except sqlite3.Error:
        return None
    runs = list(by_id.values())
    if sweep:
        runs = [r for r in runs if r.tags.get("mlflow.parentRunId") == sweep]
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compare runs of an experiment or of one sweep")
    parser.add_argument("--experiment", default="unit-conversion")
    parser.add_argument("--sweep", help="parent run id of a sweep: compare its children only")
    parser.add_argument("--baseline", help="key=value pairs naming the baseline run, e.g. 'precision=fp32'")
    parser.add_argument("--uri", default=f"sqlite:///{Path.cwd() / 'mlflow.db'}")
    parser.add_argument("--figures", type=Path, help="folder to write the two figures into")
    args = parser.parse_args(argv)
    try:
        runs = load_runs(args.uri, args.experiment, args.sweep)
        if not runs:
            raise PipelineError(f"no runs to compare in experiment '{args.experiment}'")
        rows, base = compare(rows_from_runs(runs), args.baseline)
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(table(rows, base))
    if args.figures:
        for path in figures(rows, args.figures):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
