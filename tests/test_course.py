"""The course adapter (pipeline.course.BaseLLM) used the way the course's grader uses a homework, and
`experiment=course_grader` run end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import mlflow
import pytest
from conftest import ROOT, run_app

from pipeline.errors import PipelineError

TINY_OVERRIDES = "model=tiny precision=fp32 generation.max_new_tokens=4"

HOMEWORK = """
from pipeline.course import BaseLLM


class HomeworkLLM(BaseLLM):
    '''A student's model, as a homework package defines it.'''


def load() -> HomeworkLLM:
    return HomeworkLLM()
"""

# the course's two generation cases, as its grader runs them: a fresh model per case, the time counted from
# construction to the loss, which it computes with `.model` and `.tokenizer` and the mean-then-mask reduction
GRADER = """
import json, sys, time

import torch

from pipeline.data import load_items
from pipeline.grader import grader_loss


def course_loss(llm, questions, answers):
    texts = [q + a for q, a in zip(questions, answers)]
    inputs = llm.tokenizer(texts, return_tensors="pt", padding=True).to(llm.device)
    with torch.no_grad():
        logits = llm.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    loss = torch.nn.functional.cross_entropy(
        logits[..., :-1, :].reshape(-1, logits.shape[-1]), inputs["input_ids"][..., 1:].reshape(-1)
    )
    mask = inputs["attention_mask"][..., 1:]
    return float((loss * mask).sum() / mask.sum())


questions = [item.question for item in load_items()[:32]]
report = {}
for case in ("single", "batched"):
    start = time.perf_counter()
    from homework import HomeworkLLM, load

    llm = load()
    answers = [llm.generate(q) for q in questions] if case == "single" else llm.batched_generate(questions)
    loss = course_loss(llm, questions, answers)
    report[case] = {
        "case_s": time.perf_counter() - start,
        "construction_s": llm.construction_time_s,
        "outputs": answers,
        "loss": loss,
        "project_loss": grader_loss(llm.model, llm.tokenizer, [q + a for q, a in zip(questions, answers)]),
        "subclass": isinstance(llm, HomeworkLLM),
        "padding_side": llm.tokenizer.padding_side,
    }
report["answer"] = llm.answer(*questions[:3])
json.dump(report, sys.stdout)
"""


def test_homework_package_is_scored_as_the_course_grader_does(tmp_path):
    (tmp_path / "homework").mkdir()
    (tmp_path / "homework" / "__init__.py").write_text(textwrap.dedent(HOMEWORK))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT / "src")]),
        "PIPELINE_OVERRIDES": TINY_OVERRIDES,
    }
    done = subprocess.run(
        [sys.executable, "-c", GRADER], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    for case in ("single", "batched"):
        graded = report[case]
        assert graded["subclass"] and graded["padding_side"] == "right"
        assert len(graded["outputs"]) == 32 and all(isinstance(text, str) for text in graded["outputs"])
        assert graded["case_s"] > graded["construction_s"] > 0  # load and warm-up are in the case
        # the course's own reduction and the project's grader agree; a random model scores about ln(vocabulary)
        assert graded["loss"] == pytest.approx(graded["project_loss"], abs=1e-4)
        assert 9 < graded["loss"] < 12
    # one batch or 32 single calls: the same greedy outputs
    assert report["single"]["outputs"] == report["batched"]["outputs"]
    assert len(report["answer"]) == 3 and all(isinstance(a, float) for a in report["answer"])


def test_bad_overrides_are_one_error_naming_the_variable(monkeypatch):
    from pipeline.course import OVERRIDES_ENV, compose_config

    monkeypatch.setenv(OVERRIDES_ENV, "precision=fp8")
    with pytest.raises(
        PipelineError, match=f"precision=fp8 is not an option; choose one of: .*fp32.*; fix {OVERRIDES_ENV}"
    ):
        compose_config()
    monkeypatch.setenv(OVERRIDES_ENV, "generation.max_new_tokns=5")
    with pytest.raises(PipelineError, match="generation.max_new_tokns: Key 'max_new_tokns' not in 'GenerationConfig'"):
        compose_config()
    monkeypatch.setenv(OVERRIDES_ENV, "generation.max_new_tokens=0")
    with pytest.raises(PipelineError, match="must be a positive number"):
        compose_config()


def test_overrides_from_the_environment_win_over_the_subclass(monkeypatch):
    from pipeline.course import OVERRIDES_ENV, compose_config

    monkeypatch.setenv(OVERRIDES_ENV, "precision=bf16 model=tiny")
    cfg = compose_config(["precision=fp32", "generation.max_new_tokens=7"])
    assert cfg.precision.name == "bf16" and cfg.model.source == "tiny" and cfg.generation.max_new_tokens == 7
    monkeypatch.delenv(OVERRIDES_ENV)
    assert compose_config().model.name == "smollm2-135m"  # no arguments: the project's defaults


def test_course_grader_experiment_is_the_courses_two_cases(compose_cfg):
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_object(compose_cfg(["experiment=course_grader", "precision=bf16"]))
    assert cfg.dataset.num_questions == 32 and cfg.dataset.path is None and cfg.precision.name == "bf16"
    stages = cfg.stages
    assert stages.single and stages.batched and stages.micro_batch_size == 32
    assert (stages.single_budget_s, stages.batched_budget_s) == (40, 15)
    assert stages.grader_loss and stages.fresh_model_per_stage


def test_course_grader_experiment_sweep_prints_and_saves_points_and_times(tmp_path):
    # 8 questions instead of the experiment's 32 keep the test short; the path is the same
    args = ["-m", "experiment=course_grader", "model=tiny", "generation.max_new_tokens=4", "dataset.num_questions=8",
            "precision=fp32,bf16"]  # fmt: skip
    result = run_app(args, tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = result.stdout + result.stderr
    assert printed.count("single case (course grader): 0.00 of 10 points") == 2
    assert printed.count("batched case (course grader): 0.00 of 15 points") == 2
    assert "fresh model for the next stage" in printed
    assert "course points" in printed and "0.0/25" in printed  # the sweep's comparison table
    assert "loss_right" in result.stdout and "points" in result.stdout and "case_s" in result.stdout
    folders = sorted((tmp_path / "outputs" / "multirun").glob("*/*/*/results.json"))
    assert len(folders) == 2
    for file in folders:
        saved = json.loads(file.read_text())
        for name, (limit_s, max_points) in {"single": (40, 10), "batched": (15, 15)}.items():
            stage = saved["stages"][name]
            assert stage["num_questions"] == 8 and stage["budget_s"] == limit_s
            assert stage["grader_max_points"] == max_points and stage["grader_points"] == 0
            assert stage["grader_padding_side"] == "right" and stage["grader_loss_model"]
            assert not math.isnan(stage["grader_loss"]) and not math.isnan(stage["grader_loss_other_side"])
            assert stage["grader_case_time_s"] > stage["wall_time_s"] and stage["grader_diagnosis"]
        # the batched case loaded its own model: its case counts that load, not the first one's
        assert saved["stages"]["batched"]["grader_case_time_s"] > saved["stages"]["batched"]["wall_time_s"]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["unit-conversion"])
    runs = runs[runs["tags.pipeline.sweep"] != "parent"]
    assert len(runs) == 2
    assert runs["metrics.single/grader_points"].notna().all() and runs["metrics.batched/grader_case_time_s"].gt(0).all()
    assert (
        runs["metrics.batched/grader_loss"].notna().all()
        and runs["metrics.single/grader_within_limit"].isin([0, 1]).all()
    )


@pytest.mark.slow
def test_adapter_on_the_embedded_model_keeps_the_loss_below_zero_points(monkeypatch):
    from pipeline.course import OVERRIDES_ENV, BaseLLM
    from pipeline.data import load_items
    from pipeline.grader import ZERO_POINTS_LOSS, grader_loss
    from pipeline.runner import make_constraint_for

    monkeypatch.delenv(OVERRIDES_ENV, raising=False)
    llm = BaseLLM(["runtime.warmup=false"])  # the default config but for the warm-up, which only costs time here
    questions = [item.question for item in load_items()[:32]]
    outputs = llm.batched_generate(questions)
    assert sum("<answer>" in text for text in outputs) >= 28
    # decoded under the default tool prompt's constraint, as run.py's stages are: every token of each form is one
    # the constraint allowed at its step
    constraint_for = make_constraint_for(llm.cfg.prompt, llm.tokenizer)
    constrained = 0
    for question, text in zip(questions, outputs):
        constraint = constraint_for(question)
        if constraint is None:
            continue
        ids = llm.tokenizer(text.split("\n")[0] + "\n", add_special_tokens=False)["input_ids"]
        assert all(ids[t] in constraint.allowed(ids[:t]) for t in range(len(ids))), text
        constrained += 1
    assert constrained >= 28
    assert llm.generate(questions[0]) == outputs[0]
    texts = [q + a for q, a in zip(questions, outputs)]
    assert llm.tokenizer.padding_side == "right"
    assert grader_loss(llm.model, llm.tokenizer, texts) < ZERO_POINTS_LOSS
