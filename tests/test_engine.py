"""The decode engine on the tiny model: same logits and greedy tokens as transformers, whatever the batching."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.data import load_items
from pipeline.engine import Engine, StopTokens
from pipeline.models import load_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny():
    """A tiny random Llama with more layers than the session one, so rotary and GQA mistakes show."""
    cfg = ModelConfig(name="tiny", source="tiny", tiny_layers=3, tiny_heads=6, tiny_kv_heads=2, tiny_hidden_size=96)
    return load_model(cfg, CPU, torch.float32, "sdpa")


def _chat(tokenizer, question: str) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Convert units."}, {"role": "user", "content": question}],
        add_generation_prompt=True,
        tokenize=False,
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _reference(model, ids: list[int], budget: int, stopper: StopTokens) -> list[int]:
    """transformers' greedy decoding of one prompt, cut where the engine's stop rule says."""
    with torch.inference_mode():
        output = model.generate(
            torch.tensor([ids]), max_new_tokens=budget, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    generated = []
    for token in output[0, len(ids) :].tolist():
        generated.append(token)
        if stopper.stops(generated):
            break
    return generated


def test_engine_logits_equal_transformers(tiny):
    ids = _chat(tiny.tokenizer, "How many grams are in 6 kg?")
    with torch.inference_mode():
        expected = tiny.model(torch.tensor([ids])).logits[0]
        got = Engine(tiny.model, "fp32").logits(ids)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_engine_rejects_other_architectures(tiny):
    from pipeline.errors import PipelineError

    class NotLlama:
        config = type("C", (), {"model_type": "gpt2"})()

    with pytest.raises(PipelineError, match="backend=transformers"):
        Engine(NotLlama(), "fp32")


@pytest.mark.parametrize("slots", [1, 3, 8])
def test_continuous_batching_gives_each_prompt_its_own_greedy_tokens(tiny, slots):
    """Prompts of different lengths that stop at different steps: rows leave, others take their slots."""
    tokenizer = tiny.tokenizer
    prompts = [_chat(tokenizer, item.question) for item in load_items()[:7]]
    # stop on the tokens this random model switches to after its first few, so rows finish at different steps
    stopper = StopTokens(tokenizer, None, eos_ids=[])
    expected_full = [_reference(tiny.model, ids, 9, stopper) for ids in prompts]
    frequent = sorted({t for seq in expected_full for t in seq} - {seq[0] for seq in expected_full})
    stopper = StopTokens(tokenizer, None, eos_ids=frequent)
    expected = [_reference(tiny.model, ids, 9, stopper) for ids in prompts]
    assert len({len(seq) for seq in expected}) > 1, "the test needs rows that stop at different steps"
    engine = Engine(tiny.model, "fp32")
    shared = 0
    while all(ids[shared] == prompts[0][shared] for ids in prompts):
        shared += 1
    with torch.inference_mode():
        engine.set_prefix(prompts[0][:shared])
        got = engine.generate(prompts, 9, stopper, slots)
    assert [seq.generated for seq in got] == expected
    assert [seq.hit_budget for seq in got] == [len(seq) == 9 and seq[-1] not in frequent for seq in expected]


def test_prompts_without_the_shared_prefix_run_and_leave_it_intact(tiny):
    tokenizer = tiny.tokenizer
    with_prefix = [_chat(tokenizer, q) for q in ("How many grams are in 6 kg?", "Convert 3 km to m.")]
    without = tokenizer("6 kg in grams:", add_special_tokens=False)["input_ids"]
    stopper = StopTokens(tokenizer, None, eos_ids=[])
    expected = [_reference(tiny.model, ids, 5, stopper) for ids in [*with_prefix, without]]
    engine = Engine(tiny.model, "fp32")
    with torch.inference_mode():
        engine.set_prefix(with_prefix[0][:8])
        mixed = engine.generate([*with_prefix, without], 5, stopper, slots=2)
        again = engine.generate(with_prefix, 5, stopper, slots=2)  # the prefix in every slot is whole again
    assert [seq.generated for seq in mixed] == expected
    assert [seq.generated for seq in again] == expected[:2]


def test_the_fused_kernel_reads_the_prefix_from_its_one_copy_and_no_slot_holds_it(tiny):
    """The fused engine never copies the shared prefix into its slots (0.5 GB written at every start for 32 slots
    of SmolLM2) and never reads a position nothing wrote (its caches are allocated untouched): with NaN in
    every position of every slot, a continuously batched run (prompts without the prefix included, slots
    reused) gives transformers' own greedy tokens."""
    tokenizer = tiny.tokenizer
    questions = ("How many grams are in 6 kg?", "Convert 3 km to m.", "How many ml in 2 l?")
    with_prefix = [_chat(tokenizer, q) for q in questions]
    without = tokenizer("6 kg in grams:", add_special_tokens=False)["input_ids"]
    stopper = StopTokens(tokenizer, None, eos_ids=[])
    prompts = [with_prefix[0], without, *with_prefix[1:]]
    expected = [_reference(tiny.model, ids, 5, stopper) for ids in prompts]
    engine = Engine(tiny.model, "q8", max_kernel_rows=64)  # q8 weights in our kernel: transformers' values
    assert engine.fused
    width = 8
    with torch.inference_mode():
        engine._ensure(2, 128)
        caches = engine.k_cache + engine.v_cache
        for cache in caches:
            cache.fill_(float("nan"))
        engine._touch = lambda: None  # the zeros it writes past the prefix would hide a read of them
        engine.set_prefix(with_prefix[0][:width])
        assert engine.prefix_k[0].abs().sum() > 0
        for cache in caches:
            assert cache[1:, :, :width].isnan().all()  # slot 0 computed the prefix; no other got a copy
            cache[0, :, :width] = float("nan")  # the kernel reads the prefix from its one copy (prefix_kt, _v)
        generated = [seq.generated for seq in engine.generate(prompts, 5, stopper, slots=2)]
        assert all(a is b for a, b in zip(engine.k_cache + engine.v_cache, caches))  # no new cache
    assert generated == expected


def test_a_prompt_with_the_prefix_admitted_where_one_without_it_ran_gets_the_prefix_back(tiny):
    """One slot: a prompt without the shared prefix writes over the slot's copy of it; the prompt with the prefix
    admitted into that slot later in the same call must attend over the prefix, not over what was written there."""
    tokenizer = tiny.tokenizer
    with_prefix = _chat(tokenizer, "How many grams are in 6 kg?")
    without = tokenizer("Six kilograms in grams, please, and quickly:", add_special_tokens=False)["input_ids"]
    never = StopTokens(tokenizer, None, eos_ids=[])

    def hidden_states(prompts: list[list[int]], slots: int) -> dict[int, list[torch.Tensor]]:
        engine = Engine(tiny.model, "fp32")
        seen: dict[int, list[torch.Tensor]] = {}

        def observe(rows, hidden):
            for seq, h in zip(rows, hidden):
                seen.setdefault(seq.index, []).append(h.clone())

        with torch.inference_mode():
            engine.set_prefix(with_prefix[:12])
            engine.generate(prompts, 4, never, slots, observe=observe)
        return seen

    alone = hidden_states([with_prefix], 1)[0]
    after = hidden_states([without, with_prefix], 1)[1]  # the same slot, after the prompt without the prefix
    for got, want in zip(after, alone):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # rows moving down into a slot a prompt without the prefix used (continuous batching, 2 slots)
    moved = hidden_states([without, with_prefix, with_prefix], 2)
    for index in (1, 2):
        for got, want in zip(moved[index], alone):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "sizes,fmt,needle",
    [
        (dict(hidden_size=96, num_attention_heads=4, head_dim=16), "fp32", "differ from hidden_size"),
        (
            dict(hidden_size=80, num_attention_heads=5, num_key_value_heads=5, intermediate_size=160),
            "q4",
            "groups of 32",
        ),
        (dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=3), "fp32", "group evenly"),
    ],
)
def test_shapes_the_engine_cannot_run_are_unsupported_not_a_crash(tiny, sizes, fmt, needle):
    """backend=auto falls back to transformers on EngineUnsupported; any other error would stop the run."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from pipeline.engine import EngineUnsupported

    config = LlamaConfig(
        vocab_size=len(tiny.tokenizer), num_hidden_layers=1, max_position_embeddings=512,
        **{"intermediate_size": 128, "num_key_value_heads": 2, **sizes},
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(EngineUnsupported, match=needle):
        Engine(model, fmt)


@pytest.mark.parametrize("fmt", ["fp32", "q4"])
def test_jump_forward_gives_the_tokens_of_step_by_step_decoding(tiny, fmt):
    """Forced runs enter the cache in one multi-token step: the same tokens as one step each, the same distributions
    (up to summation order) where the model chooses, and fewer steps."""
    tokenizer = tiny.tokenizer
    prompts = [_chat(tokenizer, item.question) for item in load_items()[:6]]
    with torch.inference_mode():
        logits = Engine(tiny.model, "fp32").logits(prompts[0])[-1]
    ranked = logits.argsort(descending=True).tolist()

    class Form:
        """Choice, forced run of three, choice, forced run, end: like a form's number, arrow and units."""

        def __init__(self, shift: int):
            self.steps = [ranked[:3], [7 + shift], [8], [9], ranked[5:9], [10 + shift], [11], []]

        def allowed(self, generated):
            return self.steps[len(generated)] if len(generated) < len(self.steps) else []

    never = StopTokens(tokenizer, None, eos_ids=[])
    results = {}
    for jump in (False, True):
        engine = Engine(tiny.model, fmt, max_kernel_rows=4)
        engine.jump_forward = jump
        steps: list[list[torch.Tensor]] = [[] for _ in prompts]

        def observe(rows, hidden, steps=steps):
            for seq, h in zip(rows, hidden):
                choices = seq.constraint.allowed(seq.generated)
                if choices and len(choices) > 1:
                    steps[seq.index].append(h.clone())

        calls = []
        real_step = engine._decode_hidden
        engine._decode_hidden = lambda *a, calls=calls, real_step=real_step: calls.append(1) or real_step(*a)
        with torch.inference_mode():
            engine.set_prefix(prompts[0][:10])
            out = engine.generate(prompts, 12, never, 3, constraints=[Form(i) for i in range(6)], observe=observe)
        results[jump] = [s.generated for s in out], steps, len(calls)
    assert results[True][0] == results[False][0]
    assert all(len(g) == 7 for g in results[True][0])
    for with_jump, stepwise in zip(results[True][1], results[False][1]):
        assert len(with_jump) == len(stepwise) == 2
        for a, b in zip(with_jump, stepwise):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert results[True][2] < results[False][2]  # the forced runs took no one-token steps


def test_stop_tokens_decide_from_ids(tiny):
    tokenizer = tiny.tokenizer
    newline = StopTokens(tokenizer, "\n", eos_ids=[tokenizer.eos_token_id])
    line = tokenizer("6 kg -> grams\nmore", add_special_tokens=False)["input_ids"]
    cut = next(i for i in range(1, len(line) + 1) if newline.stops(line[:i]))
    assert "\n" in tokenizer.decode(line[:cut]) and "\n" not in tokenizer.decode(line[: cut - 1])
    assert newline.stops([tokenizer.eos_token_id])
    tag = StopTokens(tokenizer, "</answer>", eos_ids=[])
    text = tokenizer("<answer>6000</answer> and", add_special_tokens=False)["input_ids"]
    cut = next(i for i in range(1, len(text) + 1) if tag.stops(text[:i]))
    assert tokenizer.decode(text[:cut]).endswith("</answer>")
    assert not any(tag.stops(text[:i]) for i in range(1, cut))


def test_a_constraint_limits_each_step_to_its_allowed_tokens(tiny):
    """The model must follow the allowed path, picks greedily where two tokens are allowed, and stops at []."""
    tokenizer = tiny.tokenizer
    ids = _chat(tokenizer, "How many grams are in 6 kg?")
    with torch.inference_mode():
        logits = Engine(tiny.model, "fp32").logits(ids)[-1]
    a, b = 100, 200
    preferred = a if logits[a] > logits[b] else b

    class Path:
        def allowed(self, generated):
            steps = [[a, b], [7], [8]]
            return steps[len(generated)] if len(generated) < len(steps) else []

    engine = Engine(tiny.model, "fp32")
    with torch.inference_mode():
        never = StopTokens(tokenizer, None, [])
        free, constrained = engine.generate([ids, ids], 6, never, 2, constraints=[None, Path()])
    assert constrained.generated == [preferred, 7, 8] and not constrained.hit_budget
    assert len(free.generated) == 6 and free.hit_budget


@pytest.mark.parametrize("fmt", ["fp32", "q8", "q4"])
@pytest.mark.parametrize("kernel", [True, False])
def test_the_rows_a_constrained_step_scores_are_the_weights_columns(tiny, fmt, kernel, monkeypatch):
    """`Linear.rows` (the allowed tokens' rows, gathered from the packed form) holds exactly the values of
    `weight_t`'s columns, in the order asked, repeats included; a wrong row, order or unpacking fails here."""
    import pipeline.engine as engine_module

    if not kernel:
        monkeypatch.setattr(engine_module, "_fused_kernel_available", lambda: False)
    engine = Engine(tiny.model, fmt)
    ids = torch.tensor([7, 3, engine.lm_head.out_features - 1, 3, 0])
    for linear in (engine.lm_head, engine.layers[0].o, engine.layers[-1].gate_up):
        assert bool(linear.packed) == (kernel and fmt != "fp32")
        picked = ids % linear.out_features
        assert torch.equal(linear.rows(picked), linear.weight_t[:, picked].t())


def test_a_constrained_choice_among_many_tokens_is_the_best_scored_one(tiny):
    """Where many tokens are allowed, the one chosen is the argmax of the full logits over them (q4 layers,
    q8 head read through `Linear.rows`)."""
    tokenizer = tiny.tokenizer
    ids = _chat(tokenizer, "How many grams are in 6 kg?")
    engine = Engine(tiny.model, "q4")
    allowed = list(range(40, 400, 7))

    class Once:
        def allowed(self, generated):
            return allowed if not generated else []

    with torch.inference_mode():
        (free,) = engine.generate([ids], 1, StopTokens(tokenizer, None, []), 1)
        hidden = {}
        engine.generate(
            [ids], 1, StopTokens(tokenizer, None, []), 1, constraints=[Once()],
            observe=lambda rows, h: hidden.setdefault("h", h[0].clone()),
        )  # fmt: skip
        (constrained,) = engine.generate([ids], 2, StopTokens(tokenizer, None, []), 1, constraints=[Once()])
    scores = hidden["h"] @ engine.lm_head.weight_t
    assert constrained.generated == [allowed[int(scores[allowed].argmax())]]
    assert free.generated == [int(scores.argmax())]


@pytest.mark.parametrize(
    "fmt,kernel_rows,gemm",
    [("q4", 64, "fp32"), ("q8", 64, "fp32"), ("q4", 2, "fp32"), ("q4", 2, "bf16"), ("q4", 2, "bf16-plain")],
)
def test_fused_layer_kernel_equals_the_eager_layers(tiny, fmt, kernel_rows, gemm, monkeypatch):
    """The one-call-per-layer kernel (decode steps, prefills) against the eager path on the same weights.

    Prompts of different lengths and a shared prefix, 3 slots: the kernel's per-row slots and positions,
    its cache writes, causal prefill attention and GQA all show in the logits and the greedy tokens; the
    kernel reads the prefix's keys and values from its one shared copy, the eager path from each slot's. With
    2 kernel rows, prefills and 3-row steps take the GEMM inside the kernel (bf16: oneDNN on weights packed
    once, the eager path the same weights through torch.ops.mkldnn; bf16-plain: a plain bf16 matrix, as on a
    CPU where oneDNN's bf16 linear does not run), 2-row steps the q4 kernel.
    """
    from pipeline import kernels

    if not kernels.available():
        pytest.skip(f"the fused kernel needs the AVX2 extension: {kernels.unavailable_reason()}")
    _fused_equals_eager(tiny, fmt, kernel_rows, gemm, monkeypatch)


@pytest.mark.parametrize("gemm", ["bf16", "bf16-plain"])
def test_every_build_s_bf16_gemm_rows_equal_the_eager_layers(tiny, built, gemm, monkeypatch):
    """Each build (AVX2's scalar conversions too) writes the bf16 GEMM's input rows and reads its output rows
    itself: a wrong row, offset or rounding there shows against the eager layers (torch's own conversions)."""
    _fused_equals_eager(tiny, "q4", 2, gemm, monkeypatch)


def test_a_bf16_gemm_of_many_rows_split_over_the_threads_equals_the_eager_layers(tiny, monkeypatch):
    """From 128 rows (kSplitRows) a product on oneDNN-packed weights runs as one product per thread: 8 whole
    prompts in one prefill give each thread a part, whose rows must come back in order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rows = _fused_equals_eager(tiny, "q4", 2, "bf16", monkeypatch, count=8, prefix=False)
    finally:
        torch.set_num_threads(threads)
    assert rows >= 128  # the prefill of all 8 prompts at once: split in two


def _fused_equals_eager(tiny, fmt, kernel_rows, gemm, monkeypatch, count=5, prefix=True):
    """Runs `count` prompts in as many slots (3 at most with the prefix) on both paths; the first prefill's rows."""
    import pipeline.engine

    if gemm == "bf16-plain":
        monkeypatch.setattr(pipeline.engine, "onednn_bf16", lambda: False)
    tokenizer = tiny.tokenizer
    prompts = [_chat(tokenizer, item.question) for item in load_items()[:count]]
    stopper = StopTokens(tokenizer, None, eos_ids=[])
    slots = 3 if prefix else count
    shared = 0
    while all(ids[shared] == prompts[0][shared] for ids in prompts):
        shared += 1
    results = {}
    for fused in (True, False):
        dtype = torch.bfloat16 if gemm.startswith("bf16") else torch.float32
        engine = Engine(tiny.model, fmt, max_kernel_rows=kernel_rows, gemm_dtype=dtype)
        assert engine.fused
        if gemm.startswith("bf16"):  # the layout asked for is the one the kernel gets
            assert engine.layers[0].qkv.gemm_t.is_mkldnn == (gemm == "bf16" and pipeline.engine.onednn_bf16())
        engine.fused = fused
        with torch.inference_mode():
            engine.set_prefix(prompts[0][: shared - 4] if prefix else [])  # the kernel prefills the rest
            generated = [seq.generated for seq in engine.generate(prompts, 8, stopper, slots=slots)]
            step = engine.decode_one_token(torch.tensor([5, 9]), torch.tensor([shared + 3, shared + 1]))
        results[fused] = generated, step
    assert results[True][0] == results[False][0]
    torch.testing.assert_close(results[True][1], results[False][1], rtol=1e-4, atol=1e-4)
    return sum(len(ids) - (shared - 4 if prefix else 0) for ids in prompts[:slots])


@pytest.mark.parametrize("split", [True, False])
def test_fused_layer_with_int8_tiles_equals_the_eager_layers(tiny, built, split):
    """Prefills and steps of more than one row through the int8 tiles (two digits, or one) give the eager path's
    tokens and logits, which multiplies through the same tiles: the fused layer hands each product the right
    tiles, rows and limit. One-row steps stay on the q4 kernel. The AVX2 build has no tiles: asking for them is
    a clear error at construction, not a crash in the first step."""
    from pipeline.errors import PipelineError

    if built.name == "pipeline_avx2":
        with pytest.raises(PipelineError, match="need an AVX512 build"):
            Engine(tiny.model, "q4", max_kernel_rows=1, tiles=True)
        return
    tokenizer = tiny.tokenizer
    prompts = [_chat(tokenizer, item.question) for item in load_items()[:5]]
    stopper = StopTokens(tokenizer, None, eos_ids=[])
    results = {}
    for fused in (True, False):
        engine = Engine(tiny.model, "q4", max_kernel_rows=1, tiles=True)
        engine.set_tile_rows(64, split)
        engine.fused = fused
        with torch.inference_mode():
            engine.set_prefix(prompts[0][:20])
            generated = [seq.generated for seq in engine.generate(prompts, 8, stopper, slots=3)]
            step = engine.decode_one_token(torch.tensor([5, 9, 4]), torch.tensor([30, 26, 41]))
        results[fused] = generated, step
    fused_tokens, eager_tokens = (sum(results[f][0], []) for f in (True, False))
    if split:
        assert fused_tokens == eager_tokens
    else:  # one digit's rounding steps (below) can flip a near tie of this random model's tokens, and what follows
        agree = sum(a == b for a, b in zip(fused_tokens, eager_tokens)) / len(eager_tokens)
        assert results[True][0][0] == results[False][0][0] and agree >= 0.75, (agree, results)
    # the two paths' x differ in the last bits (summation order: the norms, attention), which moves a rounding of x
    # across its boundary now and then, a step of max|x| / 127 in that block with one digit, 127 times finer with
    # two (a wrong tile, row or limit is off by the logits' own scale)
    scale = float(results[False][1].abs().max())
    tolerance = 3e-2 * scale / (127 if split else 1)
    torch.testing.assert_close(results[True][1], results[False][1], rtol=1e-4, atol=tolerance)
    exact = Engine(tiny.model, "q4", max_kernel_rows=64)  # every product on the q4 kernel, fp32 activations
    with torch.inference_mode():
        exact.set_prefix(prompts[0][:20])
        exact.generate(prompts, 8, stopper, slots=3)
        reference = exact.decode_one_token(torch.tensor([5, 9, 4]), torch.tensor([30, 26, 41]))
    error = float((results[True][1] - reference).abs().max() / reference.abs().max())
    assert error < (2e-3 if split else 5e-2)
    assert error > 0 or not split  # the tiles ran: their rounding of x is visible
    q8 = Engine(tiny.model, "q8", max_kernel_rows=1)
    with pytest.raises(PipelineError, match="holds no int8 tiles"):
        q8.set_tile_rows(64)
    q8.tile_rows = 64  # past the check: q8 matrices have no tiles, and the kernel takes their GEMM instead
    with torch.inference_mode():
        q8.set_prefix(prompts[0][:20])
        assert len(q8.generate(prompts[:2], 3, stopper, slots=2)) == 2


@pytest.fixture(scope="module")
def wide_heads():
    """A random Llama with SmolLM2's head shape (head_dim 64, 3 query heads per key/value head)."""
    cfg = ModelConfig(name="tiny", source="tiny", tiny_layers=2, tiny_heads=3, tiny_kv_heads=1, tiny_hidden_size=192)
    return load_model(cfg, CPU, torch.float32, "sdpa")


@pytest.mark.parametrize("width", [45, 64])
def test_attention_over_the_shared_prefix_in_blocks_equals_the_eager_layers(wide_heads, width, built):
    """Rows that read the shared prefix attend in blocks of queries (the keys transposed and padded to 32, register
    tiles of 6 and 4 queries, 16 or 8 keys wide by build): prefills of 5-23 rows, steps of 2-7 rows and rows
    without the prefix beside them give the eager layers' tokens and logits. A prefix width off the 32-key
    blocks and query counts off the tiles catch a wrong tail, head_dim 64 the 64-wide value tiles. Each kernel
    build this CPU runs (`built`), so the 8-wide AVX2 tiles are checked on an AVX512 CPU too."""
    generator = torch.Generator().manual_seed(width)
    prefix = torch.randint(100, 5000, (width,), generator=generator).tolist()
    lengths = [5, 23, 9, 14, 7, 11, 18, 6]
    prompts = [prefix + torch.randint(100, 5000, (n,), generator=generator).tolist() for n in lengths]
    prompts.insert(3, torch.randint(100, 5000, (12,), generator=generator).tolist())  # a prompt without the prefix
    stopper = StopTokens(wide_heads.tokenizer, None, eos_ids=[])
    results = {}
    for fused in (True, False):
        engine = Engine(wide_heads.model, "q8", max_kernel_rows=64)  # the fused layer's own products throughout
        assert engine.fused and engine._ops.name == built.name  # the build under test
        engine.fused = fused
        with torch.inference_mode():
            engine.set_prefix(prefix)
            generated = [seq.generated for seq in engine.generate(prompts, 6, stopper, slots=7)]
            step = engine.decode_one_token(
                torch.tensor([5, 9, 11, 13, 17, 19, 23]), torch.tensor([width + i * 3 for i in range(7)])
            )
            assert sum(engine.prefix_ok[:7]) >= 2  # the step's rows include several that read the prefix
            # a slot that last ran the prompt without the prefix holds only that prompt's positions: this made-up
            # step reads past them there (the eager path's stale copy of the prefix, the fused path's zeros)
            sharing = [slot for slot in range(7) if engine.prefix_ok[slot]]
        results[fused] = generated, step[sharing]
    assert results[True][0] == results[False][0]
    torch.testing.assert_close(results[True][1], results[False][1], rtol=1e-4, atol=1e-4)


def test_token_texts_are_what_decode_gives(tiny):
    from pipeline.tokens import token_texts

    texts = token_texts(tiny.tokenizer)
    assert len(texts) == len(tiny.tokenizer)
    sample = list(range(0, len(texts), 97)) + [tiny.tokenizer.eos_token_id]
    assert [texts[i] for i in sample] == tiny.tokenizer.batch_decode([[i] for i in sample])
    assert token_texts(tiny.tokenizer) is texts  # once per tokenizer


@pytest.mark.parametrize(
    "rope",
    [
        None,  # the default RoPE: computed by the engine itself
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },  # fmt: skip
        {"rope_type": "linear", "factor": 2.0},
    ],
)
def test_rotary_tables_are_transformers_own(rope):
    """The engine's cos/sin tables, bit for bit those of transformers' LlamaRotaryEmbedding, for the default RoPE it
    computes without importing transformers' Llama module and for scaled ones it takes from there."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    def llama(**kwargs):
        return LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                           rope_theta=100000.0, **kwargs)  # fmt: skip

    config = llama() if rope is None else llama(rope_scaling={**rope, "rope_theta": 100000.0})
    reference = LlamaRotaryEmbedding(config=config)
    cos, sin = reference(torch.zeros(1, 1, 64), torch.arange(300).unsqueeze(0))
    engine = Engine(LlamaForCausalLMFromConfig(config), "fp32")
    got_cos, got_sin = engine._rotary_tables(300)
    assert (engine._rotary is None) == (rope is None)
    assert torch.equal(got_cos, cos[0, :, :8]) and torch.equal(got_sin, sin[0, :, :8])
    if rope is not None:  # a scaled RoPE really differs from the default one: the test would see it ignored
        plain = LlamaRotaryEmbedding(config=llama())
        assert not torch.equal(plain(torch.zeros(1, 1, 64), torch.arange(300).unsqueeze(0))[0], cos)


def LlamaForCausalLMFromConfig(config):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def test_cached_bf16_copies_give_the_same_packed_weights_and_tokens(tiny, monkeypatch):
    """The backend keeps the bf16 GEMM's copies (rounded, transposed) beside the packed state: an engine given
    them packs the same oneDNN weights and decodes the same tokens, without rounding or transposing again; a
    copy of the wrong shape (a damaged or foreign file) is made again rather than packed."""
    import pipeline.engine
    from pipeline.engine import state_from_model

    if not pipeline.engine.onednn_bf16():
        pytest.skip("oneDNN's bf16 linear does not run on this CPU: the copies are neither made nor used")
    state = state_from_model(tiny.model, "q4")
    made = Engine(config=tiny.model.config, state=state, fmt="q4", max_kernel_rows=2, gemm_dtype=torch.bfloat16)
    copies = made.bf16_copies()
    assert len(copies) == 4 * len(made.layers) + 1 and all(c.dtype == torch.bfloat16 for c in copies.values())
    copies["layers.0.o.bf16"] = copies["layers.0.o.bf16"][:, 1:]  # wrong shape: made again
    rounded = []
    real = pipeline.engine.bf16_plain
    monkeypatch.setattr(pipeline.engine, "bf16_plain", lambda w: rounded.append(w.shape) or real(w))
    given = Engine(config=tiny.model.config, state={**state, **copies}, fmt="q4", max_kernel_rows=2,
                   gemm_dtype=torch.bfloat16)  # fmt: skip
    assert rounded == [made.layers[0].o.weight_t.shape]
    names = pipeline.engine.MATRICES
    pairs = [(getattr(a, n), getattr(b, n)) for a, b in zip(made.layers, given.layers) for n in names]
    for a, b in [*pairs, (made.lm_head, given.lm_head)]:
        assert torch.equal(a.gemm_t.to_dense(), b.gemm_t.to_dense())
    tokenizer = tiny.tokenizer
    prompts = [_chat(tokenizer, item.question) for item in load_items()[:4]]
    stopper = StopTokens(tokenizer, None, eos_ids=[])
    with torch.inference_mode():
        tokens = [[s.generated for s in e.generate(prompts, 6, stopper, slots=4)] for e in (made, given)]
    assert tokens[0] == tokens[1]


def test_the_warm_up_passes_every_row_limit_without_running_the_batched_stage_prefill():
    """The warm-up prefills a few tokens of each prompt past the shared prefix: more rows than the kernel's and the
    tiles' limits (GEMM's first call stays out of the stages), far fewer than the batched stage's whole prefill,
    which it computed before (2.4 s of every warm start on AVX2)."""
    from pipeline.backends import load_backend
    from pipeline.config import load_config
    from pipeline.data import load_items
    from pipeline.prompts import build_prompt

    cfg = load_config(["model=tiny", "backend=engine", "tracking.enabled=false"])
    generator, _ = load_backend(cfg, lambda line: None)
    items = load_items(cfg.dataset.path, cfg.dataset.name)[:64]
    prompts = [build_prompt(item.question, cfg.prompt, generator.tokenizer) for item in items]
    generator.set_shared_prefix(prompts)
    engine = generator.engine
    engine.set_kernel_rows(16)  # as a calibration gives it (the tiny model's fp32 weights run no kernel)
    engine.steps.clear()
    generator.warm_up(prompts)
    rows = [int(key) for key in engine.steps if not key.startswith("head:")]
    limit = max(engine.max_kernel_rows, engine.tile_rows if engine.tile_rows < (1 << 62) else 0)
    batch = sorted(prompts, key=len, reverse=True)[: min(generator.slots, engine.max_kernel_rows + 1)]
    stage_prefill = sum(len(generator.encode(p)) - len(generator.prefix_ids) for p in batch)
    assert limit == 16 and len(batch) == 17
    assert max(rows) > limit, (engine.steps, limit)  # a product past the kernel: GEMM warmed
    assert max(rows) < stage_prefill / 4, (engine.steps, stage_prefill)  # not the stage's prefill (300+ rows)


def test_where_the_tiles_measured_faster_for_one_row_they_decode_and_give_the_kernel_s_answers(monkeypatch):
    """A calibration whose tiles beat our kernel at one row (an AMX Xeon: 4.6 against 6.3 ms a step) sends one-row
    steps to the tiles: the kernel's limit is 0, the lm_head (q8, no tiles) stays on our kernel, the log and the
    tags say so. precision.activations=fp32 keeps the kernel; without an AVX512 build nothing changes. The tokens
    are those of the kernel's path: the tiles' two int8 digits (15 bits) do not change a greedy choice here."""
    from pipeline import kernels
    from pipeline.backends import load_backend
    from pipeline.calibrate import Calibration
    from pipeline.config import load_config

    def times(one: float, thirty_two: float) -> dict[str, float]:
        return {str(r): one + (thirty_two - one) * (r - 1) / 31 for r in (1, 4, 8, 32)}

    step_ms = {
        "engine:fp32": times(80, 120), "engine:q4": times(8, 70), "engine:q8": times(9, 70),
        "engine:gemm": times(100, 100), "engine:gemm_bf16": times(30, 40) | {"128": 90.0},
        "engine:tiles": {"1": 5.0, "4": 5.0, "8": 8.0, "32": 25.0, "128": 110.0},
    }  # fmt: skip
    monkeypatch.setattr("pipeline.calibrate.calibrate", lambda *a, **k: Calibration(step_ms, "test cpu", 0.0))
    if not kernels.available():
        pytest.skip(f"no kernel of ours here: {kernels.unavailable_reason()}")
    tiles_here = kernels.gemm_i8_available()
    answers, lines = {}, {}
    items = load_items()[:6]
    for activations in ("auto", "fp32"):
        cfg = load_config(["model=tiny", "backend=engine", "precision=q4", f"precision.activations={activations}"])
        logged: list[str] = []
        backend, _ = load_backend(cfg, logged.append)
        engine, tags = backend.engine, backend.info().tags
        lines[activations] = next(line for line in logged if line.startswith("engine:"))
        takes_row = activations == "auto" and tiles_here
        assert (engine.max_kernel_rows == 0) == takes_row, (activations, engine.max_kernel_rows)
        assert engine.lm_head.max_kernel_rows >= 1  # the head's q8 weights have no tiles
        assert (tags["activations"] == "int8x2") == takes_row
        assert tags["engine_kernel_rows"] == str(engine.max_kernel_rows)
        assert (engine.tile_rows > 0) == tiles_here
        engine.steps.clear()
        answers[activations] = [backend.generate(item.question, max_new_tokens=6).token_ids for item in items]
        assert engine.steps["1"] > 0  # one-row steps ran
    if tiles_here:
        assert "from one row" in lines["auto"] and "the lm_head on our kernel" in lines["auto"], lines["auto"]
    assert "from one row" not in lines["fp32"], lines["fp32"]
    assert answers["auto"] == answers["fp32"]


def test_attention_over_the_shared_prefix_on_amx_tiles_is_fp32_s_within_bf16_and_only_for_24_rows_or_more():
    """On AMX (CPU kind amx, kernel given the tiles by Linux), prefills and steps of 24+ rows that read the shared
    prefix attend to it on bf16 tiles: hidden states within bf16's rounding of the fp32 path's, and not the same
    bits (the tiles ran). A prefill of fewer rows keeps the fp32 path's bits. Where the tiles do not run (every
    other kind, a simulated one, no kernel), asking for them is a clear error that names the fix."""
    from pipeline import kernels
    from pipeline.errors import PipelineError

    if not kernels.available():
        pytest.skip(f"no kernel of ours here: {kernels.unavailable_reason()}")
    cfg = ModelConfig(name="tiny", source="tiny", tiny_layers=2, tiny_heads=6, tiny_kv_heads=2, tiny_hidden_size=384)
    tiny64 = load_model(cfg, CPU, torch.float32, "sdpa")  # heads of 64 dimensions, as SmolLM2's
    engine = Engine(tiny64.model, "q4", max_kernel_rows=4, gemm_dtype=torch.bfloat16)
    if not kernels.amx_attention():
        with pytest.raises(PipelineError, match="AMX CPU.*precision.prefix_attention=fp32"):
            engine.set_bf16_attention(True)
        assert not engine.bf16_attention and not engine.prefix_kb
        return
    prompts = [_chat(tiny64.tokenizer, item.question) for item in load_items()[:30]]
    shared = 0
    while all(ids[shared] == prompts[0][shared] for ids in prompts):
        shared += 1
    stopper = StopTokens(tiny64.tokenizer, None, eos_ids=[])

    def first_hidden(on: bool, slots: int) -> torch.Tensor:
        engine.set_bf16_attention(on)
        seen: list[torch.Tensor] = []
        with torch.inference_mode():
            engine.set_prefix(prompts[0][:shared])
            engine.generate(prompts[:slots], 1, stopper, slots, observe=lambda rows, h: seen.append(h.clone()))
        assert bool(engine.prefix_kb) == on
        return seen[0]

    many_fp32, many_amx = first_hidden(False, 30), first_hidden(True, 30)  # a prefill of 30 prompts' own tokens
    assert not torch.equal(many_fp32, many_amx)
    torch.testing.assert_close(many_amx, many_fp32, rtol=0, atol=1.5e-2 * many_fp32.abs().max().item())
    assert (many_amx - many_fp32).abs().mean() < 1e-2 * many_fp32.abs().mean()
    few = len(prompts[0]) - shared
    assert few < 24
    assert torch.equal(first_hidden(True, 1), first_hidden(False, 1))  # one prompt's prefill: fp32
