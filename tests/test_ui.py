"""The MLflow UI as a user meets it, in a real headless Chromium against a real `mlflow ui` over a sweep's store.

From the UI's root to the experiment's runs table, the saved view that leads with the headline metrics,
a child run's system-metric charts, its data set and metrics, and the sweep parent's figures. Screenshots
are kept in outputs/test-artifacts/ (README's two come from here).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import mlflow
import pytest
from conftest import ROOT, run_app, start_mlflow_server

from pipeline.tracking import HEADLINE_METRICS, KIND, KIND_TAG, RUNS_VIEW_NAME

CHROMIUM = "/usr/bin/chromium"
# flags that keep Chromium from reaching out to the network, which this machine refuses
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
SCREENSHOTS = ROOT / "outputs" / "test-artifacts"
WAIT_MS = 60_000  # the first page of a fresh `mlflow ui` on a busy machine
# the runs table's header cells (ag-grid renders the ones in view): column id and width in pixels
HEADER_CELLS = """Array.from(document.querySelectorAll('.ag-header-cell[col-id]'))
    .map(e => [e.getAttribute('col-id'), e.getBoundingClientRect().width])"""


def _shot(page, name: str) -> Path:
    path = SCREENSHOTS / name
    page.screenshot(path=str(path))
    assert path.stat().st_size > 10_000, f"{name} looks blank"
    return path


def _close_assistant(page) -> None:
    """MLflow 3.x opens an assistant panel beside every page; closing it gives the tables their width."""
    close = page.get_by_role("button", name="Close", exact=True)
    if close.count():
        close.first.click()


@pytest.mark.slow
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed (.ci/run installs it)")
@pytest.mark.skipif(importlib.util.find_spec("playwright") is None, reason="playwright is not installed (dev extra)")
def test_the_mlflow_ui_opens_on_the_runs_table_with_the_numbers_that_matter(tmp_path, monkeypatch):
    from playwright.sync_api import sync_playwright

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")  # tiny runs last seconds
    result = run_app(["-m", "model=tiny", "dataset.num_questions=4", "precision=fp32,bf16", "attention=eager,sdpa"],
                     tmp_path, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    db_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=db_uri)
    experiment = client.get_experiment_by_name("unit-conversion")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("pipeline.sweep") == "parent")
    child = next(r for r in runs if r.data.tags.get("mlflow.parentRunId"))
    headline = [key for key, _ in HEADLINE_METRICS if key in child.data.metrics]
    assert headline[:2] == ["1_time/batched_s", "1_time/single_s"] and "2_accuracy/batched" in headline

    process, uri = start_mlflow_server(db_uri, None, tmp_path / "ui.log", command_name="ui")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_context(viewport={"width": 1800, "height": 1000}).new_page()  # empty localStorage

            # the UI's root, as `mlflow ui` prints it; the experiment tag is what the UI gets with the experiment
            page.goto(uri)
            page.get_by_text("unit-conversion", exact=True).first.wait_for(timeout=WAIT_MS)
            got = page.evaluate(f"fetch('ajax-api/2.0/mlflow/experiments/get?experiment_id={experiment.experiment_id}')"
                                ".then(r => r.json())")  # fmt: skip
            tags = {t["key"]: t["value"] for t in got["experiment"].get("tags", [])}
            assert tags.get(KIND_TAG) == KIND, "the experiment is not tagged as model development"
            # MLflow 3.9+ decides GenAI or model-training pages by its sidebar switch (README: flip it once);
            # earlier UIs by the tag above
            switch = page.get_by_text("Model training", exact=True)
            if switch.count():
                switch.first.click()
            page.get_by_text("unit-conversion", exact=True).first.click()

            # the first thing shown: the runs table, not the empty GenAI overview
            page.wait_for_url("**/runs**", timeout=WAIT_MS)
            parent_row = page.locator("[role=row]", has_text="sweep:").first
            parent_row.wait_for(timeout=WAIT_MS)
            assert page.get_by_text("No data available for the selected time range").count() == 0
            _close_assistant(page)
            _shot(page, "mlflow_ui_experiment_opened.png")

            # the saved view: run names in full, then the headline metrics in their order
            page.get_by_test_id("saved-views-trigger").click()
            page.get_by_text(RUNS_VIEW_NAME, exact=True).first.click()
            page.wait_for_url("**viewStateShareKey=**", timeout=WAIT_MS)
            parent_row = page.locator("[role=row]", has_text="sweep:").first
            parent_row.wait_for(timeout=WAIT_MS)
            parent_row.locator("button").first.click()  # expand the parent to list its children
            for name in ("precision=fp32,attention=eager", "precision=bf16,attention=sdpa"):
                page.get_by_text(name, exact=True).first.wait_for(timeout=WAIT_MS)  # whole names, not cut
            page.get_by_text(headline[0], exact=True).first.wait_for(timeout=WAIT_MS)
            columns = page.evaluate(HEADER_CELLS)
            ids = [column for column, _ in columns]
            assert ids.index("attributes.`Run Name`") < ids.index(f"metrics.`{headline[0]}`")
            shown = [c[len("metrics.`") : -1] for c in ids if c.startswith("metrics.")]  # the ones in the viewport
            assert len(shown) >= 3 and shown == headline[: len(shown)], shown
            assert dict(columns)["attributes.`Run Name`"] >= 300
            _shot(page, "mlflow_ui_runs_table.png")

            # a child run: its data set, its headline metrics, and charts in its System metrics tab
            page.goto(f"{uri}/#/experiments/{experiment.experiment_id}/runs/{child.info.run_id}")
            page.get_by_text(headline[0], exact=True).first.wait_for(timeout=WAIT_MS)
            page.get_by_text("unit_conversion").first.wait_for(timeout=WAIT_MS)  # logged with log_input
            page.get_by_role("tab", name="System metrics").click()
            for chart in ("cpu_utilization_percentage", "system_memory_usage_megabytes", "process_rss_mb"):
                page.get_by_text(chart, exact=True).first.wait_for(timeout=WAIT_MS)
            page.locator(".js-plotly-plot").nth(4).wait_for(timeout=WAIT_MS)  # drawn charts, not empty cards
            _shot(page, "mlflow_ui_system_metrics.png")

            # the sweep parent: its figures among its artifacts, the Pareto figure shown
            page.goto(f"{uri}/#/experiments/{experiment.experiment_id}/runs/{parent.info.run_id}/artifacts")
            for artifact in ("comparison.json", "speedup.png", "pareto.png"):
                page.get_by_text(artifact, exact=True).first.wait_for(timeout=WAIT_MS)
            page.set_viewport_size({"width": 1800, "height": 1150})  # the whole figure, legend included
            page.get_by_text("pareto.png", exact=True).first.click()
            page.wait_for_function(
                "Array.from(document.images).some(i => i.src.startsWith('blob:') && i.naturalWidth > 1000)",
                timeout=WAIT_MS,
            )
            _shot(page, "mlflow_ui_sweep_figure.png")
            browser.close()
    finally:
        process.terminate()
        process.wait(timeout=30)
    (SCREENSHOTS / "mlflow_ui_test.json").write_text(json.dumps({"headline": headline, "columns": ids}, indent=2))
