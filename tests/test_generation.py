"""Generation on the tiny model: batching does not change greedy output, stopping and token counts are right."""

from __future__ import annotations

import torch

from pipeline.config import GenerationConfig, PromptConfig
from pipeline.data import load_items
from pipeline.generation import Generator, StopAtText
from pipeline.prompts import build_prompt

COT = PromptConfig(style="cot", system="Convert units.", examples=[["How many g in 2 kg?", "<answer>2000</answer>"]])


def _prompts(tokenizer, n=6):
    return [build_prompt(item.question, COT, tokenizer) for item in load_items()[:n]]


def test_batched_greedy_equals_single_token_for_token(tiny_fp32):
    generator = Generator(tiny_fp32.model, tiny_fp32.tokenizer, GenerationConfig(max_new_tokens=12, stop_string=""))
    prompts = _prompts(tiny_fp32.tokenizer)
    with torch.inference_mode():
        batched = generator.batched_generate(prompts)
        single = [generator.generate(p) for p in prompts]
    assert len({len(tiny_fp32.tokenizer(p)["input_ids"]) for p in prompts}) > 1  # padding really happened
    assert [g.text for g in batched] == [g.text for g in single]
    assert [g.num_tokens for g in batched] == [g.num_tokens for g in single]
    assert all(0 < g.num_tokens <= 12 for g in batched)


def test_max_new_tokens_bounds_the_count(tiny_fp32):
    generator = Generator(tiny_fp32.model, tiny_fp32.tokenizer, GenerationConfig(max_new_tokens=3, stop_string=""))
    with torch.inference_mode():
        results = generator.batched_generate(_prompts(tiny_fp32.tokenizer, 3))
    assert all(g.num_tokens <= 3 for g in results)
    assert all(g.latency_s > 0 for g in results)


def test_stop_at_text_marks_the_row_when_the_tag_closes(tiny_fp32):
    tokenizer = tiny_fp32.tokenizer
    prompt = tokenizer("Q: 6 kg in g?", return_tensors="pt")["input_ids"]
    answer = tokenizer(" so <answer>6000</answer> more text", return_tensors="pt")["input_ids"]
    stop = StopAtText(tokenizer, "</answer>", [tokenizer.eos_token_id], prompt.shape[1])
    done_at = None
    for step in range(1, answer.shape[1] + 1):
        ids = torch.cat([prompt, answer[:, :step]], dim=1)
        if stop(ids, None)[0] and done_at is None:
            done_at = step
    text = tokenizer.decode(answer[0, :done_at])
    assert text.endswith("</answer>") and "more" not in text
    assert stop.finished_at[0] == done_at


def test_stop_at_text_counts_eos_rows(tiny_fp32):
    tokenizer = tiny_fp32.tokenizer
    eos = tokenizer.eos_token_id
    stop = StopAtText(tokenizer, "</answer>", [eos], prompt_len=2)
    ids = torch.tensor([[5, 6, 7, eos], [5, 6, 7, 8]])
    assert stop(ids, None).tolist() == [True, False]
    assert stop.finished_at == {0: 2}


def test_stop_string_is_applied_by_generate(tiny_fp32):
    """A stop string the random model emits early ends generation right after it."""
    generator = Generator(tiny_fp32.model, tiny_fp32.tokenizer, GenerationConfig(max_new_tokens=16, stop_string=""))
    prompt = _prompts(tiny_fp32.tokenizer, 1)[0]
    with torch.inference_mode():
        free = generator.generate(prompt)
        # stop at the text of the model's own 4th token: generation must end by then
        fourth = tiny_fp32.tokenizer.decode(tiny_fp32.tokenizer(free.text, add_special_tokens=False)["input_ids"][3])
        stopped = Generator(
            tiny_fp32.model,
            tiny_fp32.tokenizer,
            GenerationConfig(max_new_tokens=16, stop_string=fourth.strip() or fourth),
        ).generate(prompt)
    assert stopped.num_tokens <= 4 < free.num_tokens
    assert free.text.startswith(stopped.text)


def test_shared_prefix_cache_changes_nothing_but_speed(tiny_fp32):
    """Greedy outputs with the prefix KV cache equal those without, single and batched."""
    cfg = PromptConfig(style="cot", system="Convert units carefully. " * 6, examples=COT.examples)
    prompts = [build_prompt(item.question, cfg, tiny_fp32.tokenizer) for item in load_items()[:5]]
    plain = Generator(tiny_fp32.model, tiny_fp32.tokenizer, GenerationConfig(max_new_tokens=8, prefix_cache=False))
    cached = Generator(tiny_fp32.model, tiny_fp32.tokenizer, GenerationConfig(max_new_tokens=8))
    with torch.inference_mode():
        assert plain.set_shared_prefix(prompts) == 0.0 and not plain.prefix_ids
        assert cached.set_shared_prefix(prompts) > 0
        assert len(cached.prefix_ids) >= 30
        expected = plain.batched_generate(prompts)
        assert [g.text for g in cached.batched_generate(prompts)] == [g.text for g in expected]
        assert [cached.generate(p).text for p in prompts] == [g.text for g in expected]
        # a prompt without the prefix still works, without the cache
        assert cached.generate("How many g in 1 kg?").num_tokens > 0


def test_no_prefix_cache_for_prompts_that_share_little(tiny_fp32):
    generator = Generator(tiny_fp32.model, tiny_fp32.tokenizer, GenerationConfig(max_new_tokens=4))
    assert generator.set_shared_prefix(["How many g in 1 kg?", "Convert 3 h to min."]) == 0.0


def test_sampling_follows_the_seed_and_top_k_1_is_greedy(tiny_fp32):
    prompts = _prompts(tiny_fp32.tokenizer, 2)
    greedy = Generator(tiny_fp32.model, tiny_fp32.tokenizer, GenerationConfig(max_new_tokens=5, stop_string=""))
    sampled = Generator(
        tiny_fp32.model,
        tiny_fp32.tokenizer,
        GenerationConfig(max_new_tokens=5, stop_string="", do_sample=True, temperature=1.5, top_k=0, top_p=1.0),
    )
    top_1 = GenerationConfig(max_new_tokens=5, stop_string="", do_sample=True, top_k=1)
    only_best = Generator(tiny_fp32.model, tiny_fp32.tokenizer, top_1)
    with torch.inference_mode():
        expected = [g.text for g in greedy.batched_generate(prompts)]
        runs = []
        for seed in (0, 0, 1):
            torch.manual_seed(seed)
            runs.append([g.text for g in sampled.batched_generate(prompts)])
        torch.manual_seed(5)
        assert [g.text for g in only_best.batched_generate(prompts)] == expected  # one candidate: the argmax
    assert runs[0] == runs[1]  # same seed, same samples
    assert runs[0] != runs[2] and runs[0] != expected  # another seed, or greedy, differs


def test_beam_search_runs_single_and_batched_alike(tiny_fp32):
    prompts = _prompts(tiny_fp32.tokenizer, 3)
    three_beams = GenerationConfig(max_new_tokens=6, stop_string="", num_beams=3)
    beams = Generator(tiny_fp32.model, tiny_fp32.tokenizer, three_beams)
    greedy = Generator(tiny_fp32.model, tiny_fp32.tokenizer, GenerationConfig(max_new_tokens=6, stop_string=""))
    assert beams._generate_kwargs(None)["num_beams"] == 3
    assert beams.set_shared_prefix(prompts) == 0.0  # a shared prefix cache cannot follow reordered beams
    with torch.inference_mode():
        batched = beams.batched_generate(prompts)
        single = [beams.generate(p) for p in prompts]
        expected = [g.text for g in greedy.batched_generate(prompts)]
    assert [g.text for g in batched] == [g.text for g in single]
    assert all(0 < g.num_tokens <= 6 for g in batched)
    assert [g.text for g in batched] != expected  # three beams find other continuations than greedy here
