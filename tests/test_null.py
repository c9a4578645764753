"""The null model beside every accuracy: random weights of the run's architecture, the same config, cached."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from pipeline.config import load_config
from pipeline.data import load_items

TINY = ["model=tiny", "tracking.enabled=false"]


def test_model_random_is_the_real_architecture_with_random_seeded_weights():
    from pipeline.models import load_model

    cfg = load_config(["model=random"]).model
    assert cfg.random_weights and cfg.source == "embedded"
    first = load_model(cfg, torch.device("cpu"), torch.float32, "sdpa", seed=3)
    second = load_model(cfg, torch.device("cpu"), torch.float32, "sdpa", seed=3)
    other = load_model(cfg, torch.device("cpu"), torch.float32, "sdpa", seed=4)
    config = first.model.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)  # SmolLM2-135M's
    assert len(first.tokenizer) == 49152 and first.source_formats == {"layers": "random", "output": "random"}
    weight = first.model.model.layers[0].mlp.down_proj.weight
    assert torch.equal(weight, second.model.model.layers[0].mlp.down_proj.weight)
    assert not torch.equal(weight, other.model.model.layers[0].mlp.down_proj.weight)
    assert "random weights (seed 3)" in first.source


def test_model_null_names_the_option_to_use(tmp_path):
    from tests.conftest import run_app

    done = run_app(["model=null"], tmp_path, timeout=120)
    assert done.returncode == 2 and "model=random" in done.stderr, done.stderr[-500:]


def test_the_null_score_runs_the_same_config_with_random_weights_and_is_cached(tmp_path, monkeypatch):
    from pipeline import null

    cfg = load_config([*TINY, f"model.cache_dir={tmp_path}"])
    items = load_items()[:6]
    run = null.null_config(cfg)
    assert run.model.random_weights and run.prompt == cfg.prompt and run.generation == cfg.generation
    assert run.stages.batched and not run.stages.single and not run.stages.null_model
    first = null.null_score(cfg, items, tmp_path, log=lambda line: None)
    assert not first.cached and first.questions == 6 and 0 <= first.accuracy <= 1
    loads = []
    monkeypatch.setattr("pipeline.backends.load_backend", lambda *a, **k: loads.append(1))
    again = null.null_score(cfg, items, tmp_path, log=lambda line: None)
    assert (
        again.cached
        and loads == []
        and dataclasses.replace(again, cached=False, seconds=0) == dataclasses.replace(first, seconds=0)
    )
    # a different config or question set is another null score
    other = load_config([*TINY, "prompt.constrained=false"])
    assert null.null_key(other, items) != null.null_key(cfg, items)
    assert null.null_key(cfg, items[:5]) != null.null_key(cfg, items)
    assert null.null_key(cfg, items) == null.null_key(load_config([*TINY, "stages.single_budget_s=99"]), items)


def test_a_file_backend_runs_its_null_model_on_auto():
    from pipeline import null

    cfg = load_config(["backend=llamacpp", "tracking.enabled=false"])
    assert null.null_config(cfg).backend.name == "auto"


def test_every_run_reports_the_null_accuracy_beside_its_own(tmp_path):
    from pipeline.runner import run_pipeline

    cfg = load_config(
        [*TINY, f"model.cache_dir={tmp_path / 'cache'}", "dataset.num_questions=4", "stages.fidelity=false"]
    )
    lines: list[str] = []
    result = run_pipeline(cfg, tmp_path / "run", log=lines.append)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    for name in ("single", "batched"):
        assert 0 <= saved["stages"][name]["accuracy_null"] <= 1
        assert saved["metrics"][f"{name}/accuracy_null"] == result.stages[0].accuracy_null
    assert saved["null_questions"] == 4 and any(line.startswith("null model (random weights") for line in lines)


@pytest.mark.parametrize("allowed,expected", [([[5], [6], [7]], True), ([[5], [6, 8], [7]], False), (None, False)])
def test_forced_means_no_step_allowed_more_than_one_token(allowed, expected):
    from pipeline.stages import forced_by

    class Steps:
        def allowed(self, generated):
            if allowed is None:
                return None
            return allowed[len(generated)] if len(generated) < len(allowed) else []

    assert forced_by(Steps(), [5, 6, 7]) is expected
    assert forced_by(None, [5, 6, 7]) is False
