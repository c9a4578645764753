"""The course grader's loss, points and diagnosis (pipeline.grader), against an independent implementation."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.data import load_items
from pipeline.grader import CASES, FULL_POINTS_LOSS, ZERO_POINTS_LOSS, diagnose, grade_stage, grader_loss, grader_points
from pipeline.results import Prediction, StageResult

# 32 fixed texts of different lengths: the first 32 questions, each with an output as the course concatenates it
QUESTIONS = [item.question for item in load_items()[:32]]
OUTPUTS = [f"{i} {'kg ' * (i % 7)}-> g <answer>{i * 1000}</answer>" for i in range(32)]
TEXTS = [q + o for q, o in zip(QUESTIONS, OUTPUTS)]


def reference_loss(model, tokenizer, texts: list[str], side: str) -> float:
    """The course's rule written out by hand: each text tokenized alone, padded by hand, summed position by position."""
    rows = [tokenizer(text)["input_ids"] for text in texts]
    width = max(len(row) for row in rows)
    pad = tokenizer.pad_token_id
    ids, mask = [], []
    for row in rows:
        fill = width - len(row)
        ids.append([pad] * fill + row if side == "left" else row + [pad] * fill)
        mask.append([0] * fill + [1] * len(row) if side == "left" else [1] * len(row) + [0] * fill)
    ids_t = torch.tensor(ids)
    with torch.no_grad():
        logits = model(input_ids=ids_t, attention_mask=torch.tensor(mask)).logits
    total, count = 0.0, 0
    for b in range(len(rows)):
        log_probs = logits[b] - torch.logsumexp(logits[b], dim=-1, keepdim=True)
        for t in range(width - 1):  # every position predicts the next token, pads included
            total -= float(log_probs[t, ids[b][t + 1]])
            count += 1
    return total / count


@pytest.fixture(scope="module")
def side_losses(tiny_fp32) -> dict[str, float]:
    """The project's loss of TEXTS on the tiny fp32 model, padded on each side."""
    return {side: grader_loss(tiny_fp32.model, tiny_fp32.tokenizer, TEXTS, side) for side in ("right", "left")}


@pytest.mark.parametrize("side", ["right", "left"])
def test_loss_equals_an_independent_implementation(tiny_fp32, side_losses, side):
    model, tokenizer = tiny_fp32.model, tiny_fp32.tokenizer
    assert len({len(tokenizer(t)["input_ids"]) for t in TEXTS}) > 1  # lengths differ, so there is padding
    assert side_losses[side] == pytest.approx(reference_loss(model, tokenizer, TEXTS, side), abs=1e-4)
    assert tokenizer.padding_side == "right"  # restored after asking for another side


def test_loss_uses_the_tokenizers_own_side_and_left_differs_from_right(tiny_fp32, side_losses):
    model, tokenizer = tiny_fp32.model, tiny_fp32.tokenizer
    right, left = side_losses["right"], side_losses["left"]
    assert abs(left - right) > 1e-3
    assert grader_loss(model, tokenizer, TEXTS) == right  # the tokenizer pads on the right
    tokenizer.padding_side = "left"
    try:
        assert grader_loss(model, tokenizer, TEXTS) == left
    finally:
        tokenizer.padding_side = "right"


def test_points_are_linear_between_the_course_limits():
    assert (FULL_POINTS_LOSS, ZERO_POINTS_LOSS) == (6.2, 8.0)
    assert CASES == {"single": (40.0, 10.0), "batched": (15.0, 15.0)}
    assert grader_points(6.2, 10) == 10
    assert grader_points(3.0, 10) == 10
    assert grader_points(8.0, 15) == 0
    assert grader_points(12.2, 15) == 0
    assert grader_points(7.1, 10) == pytest.approx(5.0)
    assert grader_points(6.245, 15) == pytest.approx(15 * 1.755 / 1.8)
    assert grader_points(math.nan, 10) == 0


BASE = dict(
    loss=6.0,
    loss_other_side=12.0,
    padding_side="right",
    points=10.0,
    max_points=10.0,
    case_time_s=20.0,
    limit_s=40.0,
    construction_s=5.0,
    num_outputs=32,
    num_hit_budget=0,
    num_missing_tag=0,
    max_new_tokens=20,
    prompt_style="tool",
)


def test_no_diagnosis_at_full_points_inside_the_limit():
    assert diagnose(**BASE) == ""


def test_diagnosis_names_each_cause_and_its_fix():
    left = diagnose(**{**BASE, "loss": 12.2, "loss_other_side": 6.245, "padding_side": "left", "points": 0.0})
    assert "pads on the left" in left and "tokenizer.padding_side = 'right'" in left and "12.200" in left
    cut = diagnose(**{**BASE, "loss": 7.0, "points": 5.6, "num_hit_budget": 3})
    assert (
        "3 of 32 outputs were cut at generation.max_new_tokens=20" in cut and "raise generation.max_new_tokens" in cut
    )
    assert "pads on" not in cut  # the other side is worse here
    untagged = diagnose(**{**BASE, "loss": 7.0, "points": 5.6, "num_missing_tag": 32, "prompt_style": "raw"})
    assert "32 of 32 outputs have no <answer> tag" in untagged and "prompt=tool" in untagged
    slow = diagnose(**{**BASE, "points": 0.0, "case_time_s": 47.8, "construction_s": 2.6})
    assert "47.8 s with model construction counted (2.6 s of it), over the 40 s limit" in slow
    assert "generation.max_new_tokens" in slow and "runtime.warmup=false" in slow
    unexplained = diagnose(**{**BASE, "loss": 7.0, "points": 5.6})
    assert "loss 7.000 is above 6.2" in unexplained
    both = diagnose(**{**BASE, "points": 0.0, "case_time_s": 50.0, "num_hit_budget": 1})
    assert "; " in both and "cut at" in both and "over the 40 s limit" in both


def _stage(name: str, outputs: list[str], wall_time_s: float, budget_s: float, num_cut: int = 0) -> StageResult:
    """A finished stage whose outputs are `outputs` for the first questions; the first `num_cut` hit the budget."""
    predictions = [
        Prediction(name, i, q, 1.0, o, math.nan, False, 0.1, 5, "", i < num_cut)
        for i, (q, o) in enumerate(zip(QUESTIONS, outputs))
    ]
    return StageResult(
        name=name, wall_time_s=wall_time_s, generated_tokens=5 * len(outputs), tokens_per_s=1.0, accuracy=0.0,
        answer_rate=1.0, num_questions=len(outputs), budget_s=budget_s, within_budget=True,
        within_budget_with_load=True, latency_p50_s=0.1, latency_p90_s=0.1, latency_max_s=0.1,
        num_hit_budget=num_cut, predictions=predictions,
    )  # fmt: skip


class _LossBackend:
    def __init__(self, loaded):
        self.loaded = loaded

    def loss_model(self):
        return self.loaded.model, self.loaded.tokenizer, "the tiny model"


def test_grade_stage_fills_the_stage_and_counts_the_loss_pass(tiny_fp32, side_losses):
    stage = _stage("batched", OUTPUTS, wall_time_s=1.5, budget_s=15.0, num_cut=2)
    grade_stage(stage, _LossBackend(tiny_fp32), construction_s=4.0, max_new_tokens=20, prompt_style="tool")
    assert stage.grader_loss == pytest.approx(side_losses["right"]) and stage.grader_padding_side == "right"
    assert stage.grader_loss_other_side == pytest.approx(side_losses["left"])
    assert stage.grader_max_points == 15 and stage.grader_points == 0  # a random model's loss is about ln(49152)
    assert stage.grader_case_time_s > 4.0 + 1.5 and stage.grader_within_limit
    assert stage.grader_loss_model == "the tiny model"
    assert "2 of 32 outputs were cut" in stage.grader_diagnosis
    metrics = stage.metrics()
    assert {"batched/grader_loss", "batched/grader_points", "batched/grader_case_time_s"} <= set(metrics)
    assert "batched/grader_diagnosis" not in metrics  # text goes to results.json only


def test_a_case_over_its_limit_scores_nothing(tiny_fp32):
    stage = _stage("single", OUTPUTS[:4], wall_time_s=39.0, budget_s=40.0)
    grade_stage(stage, _LossBackend(tiny_fp32), construction_s=3.0, max_new_tokens=20)
    assert not stage.grader_within_limit and stage.grader_points == 0 and stage.grader_max_points == 10
    assert "over the 40 s limit" in stage.grader_diagnosis
