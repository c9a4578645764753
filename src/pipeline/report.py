"""Compare runs: stage times, tokens/s, speed-up and accuracy change against a baseline, fidelity, Pareto fronts.

    python -m pipeline.report --experiment unit-conversion [--sweep PARENT_RUN_ID]
        [--baseline 'precision=fp32,attention=eager'] [--uri sqlite:///mlflow.db]

The same report is logged to a sweep's parent run when a multirun ends (see `pipeline.sweep`).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from dataclasses import dataclass, field
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
    # the null model's accuracy and the fidelity against fp32 (KLD per token, top-1), of the stage `accuracy` is from
    accuracy_null: float = math.nan
    kld: float = math.nan
    top1: float = math.nan
    metrics: dict[str, float] = field(default_factory=dict, repr=False)  # every metric of the run
    tags: dict[str, str] = field(default_factory=dict, repr=False)

    def stage(self, stage: str, name: str) -> float:
        """The run's `<stage>/<name>` metric, NaN when it has none."""
        return float(self.metrics.get(f"{stage}/{name}", math.nan))


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
    """One row per run, accuracy (and the null model's, and fidelity) from the batched stage, else the single."""
    rows = []
    for run in runs:
        scored = "single" if math.isnan(_metric(run, "batched/accuracy")) else "batched"
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
                accuracy=_metric(run, f"{scored}/accuracy"),
                grader_points=_stages_sum(run, "grader_points"),
                grader_max_points=_stages_sum(run, "grader_max_points"),
                accuracy_null=_metric(run, f"{scored}/accuracy_null"),
                kld=_metric(run, f"{scored}/kld_mean"),
                top1=_metric(run, f"{scored}/top1_agreement"),
                metrics=dict(run.metrics),
                tags=dict(run.tags),
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
               "speed-up batched", "accuracy", "Δ accuracy", "null acc.", "KLD", "top-1", "course points",
               "pareto"]  # fmt: skip
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
            _f(r.accuracy_null, ".3f"),
            _f(r.kld, ".4g"),
            _f(r.top1, ".3f"),
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
        "accuracy_null": [r.accuracy_null for r in rows],
        "kld_mean": [r.kld for r in rows],
        "top1_agreement": [r.top1 for r in rows],
        "pareto": [r.pareto for r in rows],
    }


STAGES = ("single", "batched")
# one look per run, the same in every panel; sizes shrink run after run so that runs at the same point
# show as rings inside rings instead of hiding each other
MARKERS = ("o", "s", "D", "^", "v", "P", "X", "*", "<", ">", "h", "p")
FIGURE_FILES = ("pareto.png", "speedup.png")


def figure_title(rows: list[Row], swept: str | None = None) -> str:
    """What a sweep ran on: its swept keys, the CPU (name and instruction set) and the data set with its size."""
    cpus = sorted({" ".join(filter(None, (r.tags.get("device_name"), _parenthesized(r.tags.get("cpu_kind")))))
                   for r in rows} - {""})  # fmt: skip
    datasets = sorted({_dataset(r) for r in rows} - {""})
    what = f"sweep over {swept}" if swept else f"{len(rows)} runs"
    return f"{what}: {', '.join(cpus) or 'CPU unknown'}; {', '.join(datasets) or 'data set unknown'}"


def _parenthesized(text: str | None) -> str:
    return f"({text})" if text else ""


def _dataset(row: Row) -> str:
    path = row.params.get("dataset.path")
    name = Path(path).stem if path and path != "None" else row.params.get("dataset.name", "")
    count = row.params.get("dataset.num_questions")
    return f"{name}, {count} questions" if name and count else name


def pareto_front(points: list[tuple[float, float]], maximize_y: bool) -> list[tuple[float, float]]:
    """The points no other point beats on both x (lower is better) and y, sorted by x."""
    sign = -1.0 if maximize_y else 1.0
    front = [
        (x, y)
        for x, y in points
        if not any(
            ox <= x and sign * oy <= sign * y and (ox < x or sign * oy < sign * y)
            for ox, oy in points
            if (ox, oy) != (x, y)
        )
    ]
    return sorted(set(front))


def pareto_figure(rows: list[Row], title: str):
    """Stage time against accuracy and against KLD, one panel per stage and measure, with each Pareto front.

    Runs are told apart by marker and colour and named in one legend below the panels (labels at the points
    overlapped wherever runs landed close together). The null model's accuracy is a dashed line.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    done = [r for r in rows if r.status == "FINISHED"]
    colors = plt.get_cmap("tab10").colors
    looks = {r.run_id: (MARKERS[i % len(MARKERS)], colors[i % len(colors)], 150 - 90 * i / max(len(done) - 1, 1))
             for i, r in enumerate(done)}  # fmt: skip
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), squeeze=False)
    measures = (("accuracy", "accuracy", True), ("kld_mean", "KL divergence to fp32, mean per token", False))
    shown_null = shown_front = False
    for row_index, (metric, label, maximize) in enumerate(measures):
        for col, stage in enumerate(STAGES):
            ax = axes[row_index][col]
            points = [(r, r.stage(stage, "wall_time_s"), r.stage(stage, metric)) for r in done]
            points = [(r, x, y) for r, x, y in points if math.isfinite(x) and math.isfinite(y)]
            ax.set_title(f"{stage} stage", fontsize=10)
            ax.set_xlabel(f"{stage} stage time, s")
            ax.set_ylabel(label)
            if not points:
                what = "fidelity" if metric == "kld_mean" else "accuracy"
                ax.text(0.5, 0.5, f"no {what} measured in this stage", ha="center", va="center",
                        transform=ax.transAxes, color="gray")  # fmt: skip
                ax.set_xticks([])
                ax.set_yticks([])
                continue
            for r, x, y in points:
                marker, color, size = looks[r.run_id]
                ax.scatter([x], [y], s=size, marker=marker, facecolors="none", edgecolors=[color], linewidths=1.6)
            front = pareto_front([(x, y) for _, x, y in points], maximize)
            if len(front) > 1:
                ax.step([x for x, _ in front], [y for _, y in front], where="post", color="gray", lw=1, zorder=0)
                shown_front = True
            if metric == "accuracy":
                ax.set_ylim(-0.05, 1.05)
                nulls = [v for v in (r.stage(stage, "accuracy_null") for r, _, _ in points) if math.isfinite(v)]
                if nulls:
                    ax.axhline(sum(nulls) / len(nulls), color="gray", ls="--", lw=1)
                    shown_null = True
            else:
                ax.set_ylim(bottom=0)
            ax.margins(x=0.15)
            ax.grid(alpha=0.3)
    handles = []
    for r in done:
        marker, color, _ = looks[r.run_id]
        handles.append(Line2D([], [], ls="", marker=marker, markerfacecolor="none", markeredgecolor=color,
                              markeredgewidth=1.6, markersize=8, label=r.name))  # fmt: skip
    if shown_front:
        handles.append(Line2D([], [], color="gray", lw=1, label="Pareto front (no run is faster and better)"))
    if shown_null:
        handles.append(Line2D([], [], color="gray", ls="--", lw=1, label="null model (random weights), mean"))
    columns = min(len(handles), 3) or 1
    legend_rows = math.ceil(len(handles) / columns)
    fig.suptitle(title, fontsize=11)
    bottom = min(0.03 + 0.028 * legend_rows, 0.5)  # room for the legend below the panels
    fig.tight_layout(rect=(0, bottom, 1, 0.95))
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=columns, fontsize=8, frameon=False)
    return fig


def speedup_figure(rows: list[Row], title: str):
    """Speed-up of each stage over the baseline run, one pair of bars per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r.status == "FINISHED"]
    fig, ax = plt.subplots(figsize=(8, 4.8))
    positions = range(len(done))
    ax.bar([p - 0.2 for p in positions], [r.speedup_single for r in done], width=0.4, label="single stage")
    ax.bar([p + 0.2 for p in positions], [r.speedup_batched for r in done], width=0.4, label="batched stage")
    ax.set_xticks(list(positions), [r.name for r in done], rotation=25, ha="right", fontsize=7)
    ax.set_ylabel("speed-up over the baseline run")
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def figures(rows: list[Row], folder: Path, swept: str | None = None) -> list[Path]:
    """The Pareto figure (time against accuracy and KLD, both stages) and the speed-up bars; PNG files in `folder`."""
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    title = figure_title(rows, swept)
    paths = []
    for name, build in zip(FIGURE_FILES, (pareto_figure, speedup_figure)):
        fig = build(rows, title)
        fig.savefig(folder / name, dpi=110)
        plt.close(fig)
        paths.append(folder / name)
    return paths


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
