"""The MLflow UI in a real headless Chromium shows a sweep's parent, its children, accuracy and the data set."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import mlflow
import pytest
from conftest import ROOT, run_app, start_mlflow_server

CHROMIUM = "/usr/bin/chromium"
# flags that keep Chromium from reaching out to the network, which this machine refuses
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
SCREENSHOTS = ROOT / "outputs" / "test-artifacts"


@pytest.mark.slow
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed (.ci/run installs it)")
@pytest.mark.skipif(importlib.util.find_spec("playwright") is None, reason="playwright is not installed (dev extra)")
def test_mlflow_ui_shows_the_sweep_its_children_and_accuracy(tmp_path):
    from playwright.sync_api import sync_playwright

    result = run_app(["-m", "model=tiny", "prompt=raw", "dataset.num_questions=2", "generation.max_new_tokens=3",
                      "precision=fp32,bf16"], tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    db_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=db_uri)
    experiment = client.get_experiment_by_name("unit-conversion")
    child = next(r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("mlflow.parentRunId"))

    process, uri = start_mlflow_server(db_uri, None, tmp_path / "ui.log", command_name="ui")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.goto(f"{uri}/#/experiments/{experiment.experiment_id}/runs")
            page.get_by_text("unit-conversion").first.wait_for(timeout=60000)
            parent_row = page.locator("[role=row]", has_text="sweep:").first
            parent_row.wait_for(timeout=60000)
            parent_row.locator("button").first.click()  # expand the parent to list its children
            for name in ("precision=fp32", "precision=bf16"):
                page.get_by_text(name, exact=True).first.wait_for(timeout=30000)
            page.screenshot(path=str(SCREENSHOTS / "mlflow_ui_sweep.png"))

            page.goto(f"{uri}/#/experiments/{experiment.experiment_id}/runs/{child.info.run_id}")
            page.get_by_text("batched/accuracy", exact=True).first.wait_for(timeout=60000)
            # the evaluation set, logged with log_input, is listed among the run's datasets by name
            page.get_by_text("unit_conversion").first.wait_for(timeout=30000)
            page.screenshot(path=str(SCREENSHOTS / "mlflow_ui_child_run.png"))
            browser.close()
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert (SCREENSHOTS / "mlflow_ui_sweep.png").stat().st_size > 10_000
    shutil.copy(SCREENSHOTS / "mlflow_ui_sweep.png", tmp_path / "kept.png")
