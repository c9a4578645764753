"""The course grader's score of a generation case: a quality loss, points, and the case time with load counted.

The rule: tokenize the texts `question + output` (plain concatenation) together with the model's own
tokenizer, `padding=True`, on whatever side that tokenizer pads; run the model with the attention
mask; take the mean next-token cross-entropy over every position of the padded batch, pads included
(the course masks a loss that is already a mean, which leaves the plain mean). A loss of 6.2 or less
gets full points, 8.0 or more none, linearly in between; a case over its time limit scores nothing.
"""

from __future__ import annotations

import math
import time

import torch

from pipeline.results import StageResult

# the course's two cases: (time limit in seconds for the whole case, points)
CASES = {"single": (40.0, 10.0), "batched": (15.0, 15.0)}
FULL_POINTS_LOSS = 6.2  # at or below: full points
ZERO_POINTS_LOSS = 8.0  # at or above: no points
ANSWER_TAG = "<answer>"


COURSE_BATCH = 32  # the course computes its loss over one batch of 32 outputs


def grader_loss(
    model, tokenizer, texts: list[str], padding_side: str | None = None, chunk: int = COURSE_BATCH
) -> float:
    """The course's loss of `texts` (question + output each): mean next-token cross-entropy over the padded batch.

    Up to `chunk` texts are one padded batch, exactly the course's rule; more are taken `chunk` at a time and
    their positions averaged together, so memory stays that of one batch. `padding_side` None pads on the
    tokenizer's own side, as the course does; the tokenizer's side is restored afterwards either way.
    """
    total, count = 0.0, 0
    for begin in range(0, len(texts), chunk):
        loss_sum, positions = _loss_sum(model, tokenizer, texts[begin : begin + chunk], padding_side)
        total, count = total + loss_sum, count + positions
    return total / count if count else float("nan")


def _loss_sum(model, tokenizer, texts: list[str], padding_side: str | None) -> tuple[float, int]:
    saved = tokenizer.padding_side
    if padding_side is not None:
        tokenizer.padding_side = padding_side
    try:
        batch = tokenizer(texts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = saved
    device = next(model.parameters()).device
    input_ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    with torch.inference_mode():
        logits = model(input_ids=input_ids, attention_mask=mask).logits
        # the course's reduction (a mean over every position, pads included); the logits stay in the model's
        # own dtype, as the course leaves them
        targets = input_ids[:, 1:].reshape(-1)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets)
    return float(loss) * targets.numel(), targets.numel()


def grader_points(loss: float, max_points: float) -> float:
    """Points of a loss: all at FULL_POINTS_LOSS or less, none at ZERO_POINTS_LOSS or more, linear between."""
    if math.isnan(loss):
        return 0.0
    fraction = (ZERO_POINTS_LOSS - loss) / (ZERO_POINTS_LOSS - FULL_POINTS_LOSS)
    return max_points * min(1.0, max(0.0, fraction))


def other_side(side: str) -> str:
    """The padding side that is not `side`."""
    return "left" if side == "right" else "right"


def diagnose(
    *,
    loss: float,
    loss_other_side: float,
    padding_side: str,
    points: float,
    max_points: float,
    case_time_s: float,
    limit_s: float,
    construction_s: float,
    num_outputs: int,
    num_hit_budget: int,
    num_missing_tag: int,
    max_new_tokens: int,
    prompt_style: str = "",
) -> str:
    """One line naming why points were lost and the knob that fixes each cause; empty when none were lost."""
    if points >= max_points and case_time_s <= limit_s:
        return ""
    causes = []
    other = other_side(padding_side)
    if grader_points(loss_other_side, max_points) > grader_points(loss, max_points) + 0.01 * max_points:
        causes.append(
            f"the tokenizer pads on the {padding_side} (loss {loss:.3f}; {loss_other_side:.3f} padded on the "
            f"{other}): set tokenizer.padding_side = '{other}' once generation is done, the grader pads with it"
        )
    if num_hit_budget:
        causes.append(
            f"{num_hit_budget} of {num_outputs} outputs were cut at generation.max_new_tokens={max_new_tokens}: "
            "raise generation.max_new_tokens"
        )
    if num_missing_tag:
        fix = (
            "the tool prompt adds one only where the model's rewrite QUANTITY SOURCE -> TARGET parses; "
            "a stronger model= rewrites better"
            if prompt_style == "tool"
            else "use prompt=tool or prompt=instruct, which end outputs with one"
        )
        causes.append(f"{num_missing_tag} of {num_outputs} outputs have no {ANSWER_TAG} tag: {fix}")
    if case_time_s > limit_s:
        causes.append(
            f"the case took {case_time_s:.1f} s with model construction counted ({construction_s:.1f} s of it), over "
            f"the {limit_s:.0f} s limit: lower generation.max_new_tokens, find a faster backend= and precision= "
            "with a sweep (run.py -m experiment=course_grader precision=fp32,int8), or set runtime.warmup=false "
            "(the course counts the warm-up)"
        )
    if not causes:
        causes.append(
            f"loss {loss:.3f} is above {FULL_POINTS_LOSS} with no cause above: the model finds question + output "
            "unlikely text; the model and prompt= decide the outputs"
        )
    return "; ".join(causes)


def grade_stage(
    stage: StageResult,
    backend,
    construction_s: float,
    max_new_tokens: int,
    prompt_style: str = "",
    questions: int | None = COURSE_BATCH,
) -> None:
    """Fill `stage`'s grader fields from its outputs: loss on both padding sides, points, case time, diagnosis.

    `backend` gives the loss model (its own model, or fp32 transformers where it has no torch model);
    `construction_s` is model load, shared prefix and warm-up. The loss pass on the tokenizer's own side
    is timed and counted in the case, as the course counts it; the pass on the other side is not. The loss
    covers the stage's first `questions` outputs (the course grades 32; None: all, in chunks of 32).
    """
    limit_s, max_points = stage.budget_s, CASES[stage.name][1]
    graded = stage.predictions[:questions]
    texts = [p.question + p.output for p in graded]
    start = time.perf_counter()
    model, tokenizer, description = backend.loss_model()
    loss = grader_loss(model, tokenizer, texts)
    loss_pass_s = time.perf_counter() - start
    side = tokenizer.padding_side
    stage.grader_loss_other_side = grader_loss(model, tokenizer, texts, other_side(side))
    stage.grader_loss, stage.grader_padding_side, stage.grader_loss_model = loss, side, description
    stage.grader_case_time_s = construction_s + stage.wall_time_s + loss_pass_s
    stage.grader_within_limit = stage.grader_case_time_s <= limit_s
    stage.grader_max_points = max_points
    # a case over its time limit is stopped by the course and scores nothing
    stage.grader_points = grader_points(loss, max_points) if stage.grader_within_limit else 0.0
    stage.grader_diagnosis = diagnose(
        loss=loss,
        loss_other_side=stage.grader_loss_other_side,
        padding_side=side,
        points=stage.grader_points,
        max_points=max_points,
        case_time_s=stage.grader_case_time_s,
        limit_s=limit_s,
        construction_s=construction_s,
        num_outputs=len(texts),
        num_hit_budget=sum(p.hit_budget for p in graded),
        num_missing_tag=sum(ANSWER_TAG not in p.output for p in graded),
        max_new_tokens=max_new_tokens,
        prompt_style=prompt_style,
    )


def grader_lines(stage: StageResult) -> list[str]:
    """What a run prints for a graded stage: points, loss on both sides, case time; then the diagnosis if any."""
    if math.isnan(stage.grader_max_points):
        return []
    side = stage.grader_padding_side
    lines = [
        f"{stage.name} case (course grader): {stage.grader_points:.2f} of {stage.grader_max_points:.0f} points, "
        f"loss {stage.grader_loss:.3f} padded on the {side} ({stage.grader_loss_other_side:.3f} on the "
        f"{other_side(side)}), {stage.grader_case_time_s:.2f} s of {stage.budget_s:.0f} s with load counted; "
        f"loss by {stage.grader_loss_model}"
    ]
    if stage.grader_diagnosis:
        lines.append(f"{stage.name} case diagnosis: {stage.grader_diagnosis}")
    return lines
