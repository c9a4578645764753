"""Constrained tool decoding through the stages, its config switch, and the failure table it reports."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from omegaconf import OmegaConf

from pipeline.config import Config, GenerationConfig, PromptConfig
from pipeline.data import Item
from pipeline.errors import PipelineError
from pipeline.generation import Generator
from pipeline.prompts import build_prompt
from pipeline.results import FAILURES_FILE, Generation, RunResult, finish_stage, save_results
from pipeline.runner import make_constraint_for, make_postprocess
from pipeline.stages import run_batched, run_single
from pipeline.summary import format_summary
from pipeline.tool import candidate_forms

ITEMS = [
    Item("How many grams are in 7 kg?", 7000.0, {"family": "mass", "template": "how_many"}),
    Item("Exercise 12: convert 3.5 ft to inches.", 42.0, {"family": "length", "template": "exercise"}),
    Item("Express 2 hours in minutes.", 120.0, {"family": "time", "template": "express"}),
]


def test_constrained_is_on_for_the_tool_prompt_and_a_setting(compose_cfg):
    default = OmegaConf.to_object(compose_cfg([])).prompt
    assert default.constrained and default.pin_source
    assert not OmegaConf.to_object(compose_cfg(["prompt.constrained=false"])).prompt.constrained
    assert not OmegaConf.to_object(compose_cfg(["prompt=cot"])).prompt.constrained
    with pytest.raises(PipelineError, match="prompt.constrained=true applies to prompt=tool"):
        PromptConfig(style="cot", constrained=True)
    tokenizer = object()
    assert make_constraint_for(PromptConfig(style="tool", constrained=False), tokenizer) is None
    assert make_constraint_for(PromptConfig(style="instruct"), tokenizer) is None


@pytest.mark.parametrize("stage", ["single", "batched"])
def test_both_stages_decode_only_the_questions_forms(tiny_fp32, compose_cfg, stage):
    """The tiny random model, constrained: every output is one of its question's forms, so all are answered."""
    cfg: Config = OmegaConf.to_object(compose_cfg(["model=tiny"]))
    tokenizer = tiny_fp32.tokenizer
    generator = Generator(tiny_fp32.model, tokenizer, GenerationConfig(max_new_tokens=24, stop_string="\n"))
    prompts = [build_prompt(item.question, cfg.prompt, tokenizer) for item in ITEMS]
    args = (generator, ITEMS, prompts, 0.05, 100.0)
    kwargs = dict(postprocess=make_postprocess(cfg.prompt), constraint_for=make_constraint_for(cfg.prompt, tokenizer))
    with torch.inference_mode():
        result = run_single(*args, **kwargs) if stage == "single" else run_batched(*args, 2, **kwargs)
    assert result.answer_rate == 1.0
    for item, prediction in zip(ITEMS, result.predictions):
        assert prediction.output.split("\n")[0] in candidate_forms(item.question)
        assert prediction.failure in ("", "wrong_conversion")  # the right number and units, maybe swapped
        assert (prediction.failure == "") == prediction.correct


def test_failures_are_classed_counted_and_saved_beside_the_predictions(tmp_path):
    postprocess = make_postprocess(PromptConfig(style="tool"))
    outputs = ["7 kg -> grams", "1 ft -> inches", "I do not know"]
    generations = [Generation(text, 5, 1.0, 0.1) for text in outputs]
    processed = [postprocess(g.text, item.question) for g, item in zip(generations, ITEMS)]
    stage = finish_stage("batched", ITEMS, generations, processed, 3.0, 0.05, 15.0, 0.0, 3)
    assert [p.failure for p in stage.predictions] == ["", "quantity_not_in_question", "no_form"]
    assert stage.failures == {"no_form": 1, "quantity_not_in_question": 1}
    assert stage.accuracy_by_template == {"exercise": 0.0, "express": 0.0, "how_many": 1.0}
    metrics = stage.metrics()
    assert metrics["batched/failures/no_form"] == 1 and metrics["batched/failures/quantity_not_in_question"] == 1
    assert metrics["batched/accuracy_by_template/how_many"] == 1.0 and metrics["batched/accuracy/mass"] == 1.0

    result = RunResult("fp32", "fp32", 0, "cpu", "sdpa", "tiny", 0.0, 0.0, 3, {"device_name": "x"}, stages=[stage])
    assert "batched failures: no_form 1, quantity_not_in_question 1" in format_summary(result)
    save_results(result, tmp_path)
    with open(tmp_path / FAILURES_FILE, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["index"], r["failure"]) for r in rows] == [("1", "quantity_not_in_question"), ("2", "no_form")]
    saved = json.loads((tmp_path / "results.json").read_text())["stages"]["batched"]
    assert saved["failures"] == stage.failures and saved["accuracy_by_template"]["how_many"] == 1.0


def test_other_prompts_get_the_generic_classes():
    postprocess = make_postprocess(PromptConfig(style="instruct"))
    generations = [Generation("<answer>7000</answer>", 3, 1.0), Generation("<answer>9</answer>", 3, 1.0),
                   Generation("no tag", 3, 1.0)]  # fmt: skip
    processed = [postprocess(g.text, item.question) for g, item in zip(generations, ITEMS)]
    stage = finish_stage("single", ITEMS, generations, processed, 3.0, 0.05, 15.0, 0.0, 1)
    assert [p.failure for p in stage.predictions] == ["", "wrong_answer", "no_answer"]


def test_the_failure_table_is_logged_to_mlflow_once(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from pipeline.tracking import FAILURES_TABLE, default_uri, finish_run, start_run

    postprocess = make_postprocess(PromptConfig(style="tool"))
    generations = [Generation(text, 5, 1.0, 0.1) for text in ["7 kg -> grams", "x", "2 hours -> minutes"]]
    processed = [postprocess(g.text, item.question) for g, item in zip(generations, ITEMS)]
    stage = finish_stage("batched", ITEMS, generations, processed, 3.0, 0.05, 15.0, 0.0, 3)
    result = RunResult("fp32", "fp32", 0, "cpu", "sdpa", "tiny", 0.0, 0.0, 3, {}, stages=[stage], status="finished")
    folder = tmp_path / "run"
    save_results(result, folder)
    uri = default_uri(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # load_table searches the runs of the global store
    config = {"dataset": {"num_questions": 3}}
    run_id = start_run(uri, "failures", "test", config, folder)
    finish_run(uri, run_id, folder, config)
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    table = client.load_table(run.info.experiment_id, FAILURES_TABLE, run_ids=[run_id])
    assert list(table["failure"]) == ["no_form"] and list(table["index"]) == [1]
    assert run.data.metrics["batched/failures/no_form"] == 1.0
    finish_run(uri, run_id, folder, config)  # a second close (as sync does) adds no second copy of the rows
    assert len(client.load_table(run.info.experiment_id, FAILURES_TABLE, run_ids=[run_id])) == 1


@pytest.mark.slow
def test_the_real_model_answers_the_independent_set_constrained(tmp_path):
    """End to end on the embedded model and the default backend: every answer given, most of them right."""
    from pipeline.config import load_config
    from pipeline.runner import run_pipeline

    overrides = ["dataset=unit_conversion_holdout", "dataset.num_questions=32", "stages.single=false"]
    cfg = load_config([*overrides, "stages.grader_loss=false", "tracking.enabled=false"])
    (stage,) = run_pipeline(cfg, tmp_path, log=lambda line: None).stages
    assert stage.answer_rate == 1.0 and stage.accuracy >= 0.85, stage.failures
    assert set(stage.failures) <= {"wrong_conversion"}  # the question's number and units, at worst swapped
    assert (tmp_path / FAILURES_FILE).is_file() and stage.accuracy_by_template
