"""The engine's tokenizer without transformers (pipeline.light_tokenizer) against transformers' own class on the
same folder: every id, every shipped prompt, the chat template's renders to the byte, and what it hands on."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline import light_tokenizer
from pipeline import tokens as token_module
from pipeline.data import load_items
from pipeline.light_tokenizer import LightTokenizer
from pipeline.prompts import build_prompt
from pipeline.tokens import token_texts

ROOT = Path(__file__).resolve().parents[1]
STYLES = ("tool", "instruct", "cot", "raw")
TRICKY = [
    "", " ", "\n\n", "  two  spaces ", "<answer>6000</answer>", "3.5 µm in ft², 12 °F -> K", "<|im_end|>\n<|im_start|>",
    "x<|im_end|>y", "日本語 ümlaut naïve — “quotes”", "\t tab", "1/2 cup", "🙂 emoji", "a" * 300, "\u00a0nbsp",
    # where the light tokenizer splits a text at its added tokens and encodes the pieces apart
    "<|im_start|><|im_end|>", "<|im_start|>", "<|im_start", "im_end|>", "<|<|im_end|>|>", " <|im_end|> ",
    "<reponame><repo_name>x", "a\n<|endoftext|>\n\nb ", "<|im_end|>\n", "user\n<|im_end|><|im_end|>  \n",
]  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A copy of the embedded model's tokenizer folder (extracted once into the shared cache), in its own model
    folder, so that remembered renders land in this test's files."""
    from pipeline.models import _cache_folder, default_cache_dir, embedded_gguf, gguf_tokenizer

    gguf = embedded_gguf()
    gguf_tokenizer(gguf, default_cache_dir())
    target = tmp_path_factory.mktemp("model") / "tokenizer"
    shutil.copytree(_cache_folder(gguf, default_cache_dir()) / "tokenizer", target)
    return target


@pytest.fixture(scope="module")
def pair(folder):
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    return LightTokenizer(folder), TokenizersBackend.from_pretrained(str(folder))


def prompt_config(style: str):
    from pipeline.config import PromptConfig

    shipped = OmegaConf.load(ROOT / "conf" / "prompt" / f"{style}.yaml")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PromptConfig), shipped))


def shipped_prompts(tokenizer, count: int = 48) -> list[str]:
    questions = [item.question for name in ("unit_conversion", "unit_conversion_holdout")
                 for item in load_items(name=name)[:count]]  # fmt: skip
    return [build_prompt(q, prompt_config(style), tokenizer) for style in STYLES for q in questions]


def test_the_folder_is_one_the_light_tokenizer_serves(folder):
    assert light_tokenizer.usable(folder)


def test_sizes_special_tokens_and_every_token_string_equal_transformers(pair):
    light, hf = pair
    assert len(light) == len(hf) == 49152
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(light, name) == getattr(hf, name), name
        assert getattr(light, f"{name}_id") == getattr(hf, f"{name}_id"), name
    assert light.chat_template == hf.chat_template and light.padding_side == hf.padding_side
    ids = list(range(len(hf)))
    assert light.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)
    assert light.convert_ids_to_tokens(5) == hf.convert_ids_to_tokens(5)
    tokens = hf.convert_ids_to_tokens(ids[::97]) + ["no-such-token-here"]
    assert light.convert_tokens_to_ids(tokens) == hf.convert_tokens_to_ids(tokens)
    assert token_module._decoded(light) == token_module._decoded(hf)  # what the stop rules and the constraint read


@pytest.mark.parametrize("special", [False, True])
def test_encoding_and_decoding_equal_transformers(pair, special):
    light, hf = pair
    prompts = shipped_prompts(hf) + TRICKY
    for text in prompts:
        assert light.encode(text, add_special_tokens=special) == hf.encode(text, add_special_tokens=special), text
        assert light(text, add_special_tokens=special)["input_ids"] == hf(text, add_special_tokens=special)["input_ids"]
    batch = light(prompts, add_special_tokens=special)["input_ids"]
    assert batch == hf(prompts, add_special_tokens=special)["input_ids"]
    for index in range(len(hf)):  # every id alone, as the stop rules read them
        assert light.decode([index], skip_special_tokens=special) == hf.decode([index], skip_special_tokens=special)
    rng = random.Random(7)
    sequences = [hf.encode(p) for p in prompts[::5]] + [[rng.randrange(len(hf)) for _ in range(rng.randint(1, 24))]
                                                       for _ in range(400)]  # fmt: skip
    sequences += [[2, 1, *s, 0, 2] for s in sequences[:50]]  # special tokens inside
    for ids in sequences:
        assert light.decode(ids, skip_special_tokens=special) == hf.decode(ids, skip_special_tokens=special), ids
    decoded = light.batch_decode(sequences, skip_special_tokens=special)
    assert decoded == hf.batch_decode(sequences, skip_special_tokens=special)
    assert light.decode(7) == hf.decode(7)


def test_a_tokenizer_whose_added_tokens_take_spaces_is_encoded_whole(folder, tmp_path):
    """An added token with lstrip/rstrip takes the spaces beside it, which a piece encoded apart would keep: there
    the light tokenizer does not split (nor under a normalizer, which sees the whole text)."""
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    target = tmp_path / "tokenizer"
    shutil.copytree(folder, target)
    spec = json.loads((target / "tokenizer.json").read_text())
    for token in spec["added_tokens"]:
        token["lstrip"] = token["rstrip"] = token["content"] == "<|im_end|>"
    (target / "tokenizer.json").write_text(json.dumps(spec))
    light, hf = LightTokenizer(target), TokenizersBackend.from_pretrained(str(target))
    assert light._splitter is None and LightTokenizer(folder)._splitter is not None
    for text in ["a <|im_end|> b", " <|im_end|>\n<|im_start|>user\nx", *TRICKY]:
        assert light.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False), text
    apart = [*hf.encode("a ", add_special_tokens=False), hf.convert_tokens_to_ids("<|im_end|>"),
             *hf.encode(" b", add_special_tokens=False)]  # fmt: skip
    assert hf.encode("a <|im_end|> b", add_special_tokens=False) != apart  # what splitting there would give


def test_pieces_are_encoded_once_and_their_ids_are_not_shared_out(folder):
    light = LightTokenizer(folder)
    prompts = shipped_prompts(light, 8)
    first = [light.encode(p, add_special_tokens=False) for p in prompts]
    kept = len(light._pieces)
    again = [light.encode(p, add_special_tokens=False) for p in prompts]
    assert again == first and len(light._pieces) == kept
    again[0].append(-1)  # a caller's list is its own: the remembered pieces stay as they were
    assert light.encode(prompts[0], add_special_tokens=False) == first[0]


def _render(folder: Path, styles=STYLES) -> str:
    """In a new process: the shipped prompts through the light tokenizer, and whether transformers was imported."""
    code = (
        f"import json, sys\nfrom pathlib import Path\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_light_tokenizer import shipped_prompts\nfrom pipeline.light_tokenizer import LightTokenizer\n"
        f"prompts = shipped_prompts(LightTokenizer(Path({str(folder)!r})))\n"
        "print(json.dumps([prompts, 'transformers' in sys.modules]))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


def test_chat_renders_are_transformers_own_and_a_second_process_needs_no_transformers(folder, pair):
    _, hf = pair
    shutil.rmtree(folder.parent / "chat", ignore_errors=True)
    theirs = shipped_prompts(hf)
    first, imported = json.loads(_render(folder))
    assert first == theirs and imported  # not remembered yet: transformers rendered them
    assert list((folder.parent / "chat").glob("*.json"))  # remembered when that process ended
    second, imported = json.loads(_render(folder))
    assert second == theirs and not imported


def test_a_changed_template_is_rendered_again(folder, tmp_path, pair):
    _, hf = pair
    copy = tmp_path / "model" / "tokenizer"
    shutil.copytree(folder, copy)
    shutil.copytree(folder.parent / "chat", tmp_path / "model" / "chat", dirs_exist_ok=True)
    template = copy / "chat_template.jinja"
    template.write_text(template.read_text().replace("<|im_start|>assistant", "<|im_start|>ASSISTANT"))
    light = LightTokenizer(copy)
    chat = [{"role": "user", "content": "How many g in 6 kg?"}]
    assert "ASSISTANT" in light.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert light.apply_chat_template(chat, tokenize=False) == hf.apply_chat_template(chat, tokenize=False)


def test_what_it_does_not_do_itself_goes_to_transformers_with_the_same_padding(folder, pair):
    _, hf = pair
    light = LightTokenizer(folder)
    light.padding_side = "left"  # set before transformers' class is loaded: it is handed on
    texts = ["How many grams are in 6 kg?", "hi"]
    batch = light(texts, return_tensors="pt", padding=True)
    hf.padding_side = "left"
    try:
        expected = hf(texts, return_tensors="pt", padding=True)
        assert batch["input_ids"].tolist() == expected["input_ids"].tolist()
        assert batch["attention_mask"][1, 0].item() == 0  # padded on the left
        light.padding_side = "right"  # and after
        assert light(texts, return_tensors="pt", padding=True)["attention_mask"][1, -1].item() == 0
    finally:
        hf.padding_side = "right"
    assert light.apply_chat_template([{"role": "user", "content": "x"}], tokenize=True) == hf.apply_chat_template(
        [{"role": "user", "content": "x"}], tokenize=True
    )
    assert light.vocab_size == hf.vocab_size  # an attribute it does not define


@pytest.mark.parametrize(
    "edit",
    [
        lambda c: c.update(add_bos_token=True),  # a setting it does not apply
        lambda c: c.update(clean_up_tokenization_spaces=True),
        lambda c: c.update(tokenizer_class="GPT2Tokenizer"),
        lambda c: c.update(
            eos_token={
                "__type": "AddedToken",
                "content": "<|im_end|>",
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
        ),  # fmt: skip
    ],
)
def test_a_folder_with_settings_it_does_not_apply_goes_to_transformers(folder, tmp_path, edit):
    from pipeline.models import _cache_folder, embedded_gguf, gguf_tokenizer

    gguf = embedded_gguf()
    target = _cache_folder(gguf, tmp_path) / "tokenizer"
    shutil.copytree(folder, target)
    config_file = target / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    assert type(gguf_tokenizer(gguf, tmp_path, light=True)) is LightTokenizer
    edit(config)
    config_file.write_text(json.dumps(config))
    assert not light_tokenizer.usable(target)
    assert type(gguf_tokenizer(gguf, tmp_path, light=True)) is not LightTokenizer


READY_PROBE = """
import json, sys
from pathlib import Path
sys.path.insert(0, {root!r})
import run  # the config schema
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from pipeline import runner

class Ready(Exception):
    pass

def probe(*args, **kwargs):
    out = prepare(*args, **kwargs)
    tags = args[0].info().tags
    raise Ready(json.dumps([type(args[0].tokenizer).__name__, "transformers" in sys.modules, tags["bf16_copies"]]))

prepare, runner.prepare_backend = runner.prepare_backend, probe
with initialize_config_dir({conf!r}, version_base="1.3"):
    cfg = OmegaConf.to_object(compose("config", overrides=["tracking.enabled=false"]))
try:
    runner.run_pipeline(cfg, Path({out!r}), log=lambda message: None)
except Ready as ready:
    print(ready)
"""


def test_the_default_run_is_ready_without_importing_transformers(tmp_path):
    """run_pipeline with the shipped default, up to the warmed engine, in two processes: the second (the
    prompts' renders remembered by the first) never imports transformers, 0.6-0.7 s of the ready time, and
    reads the bf16 copies the first made."""
    code = READY_PROBE.format(root=str(ROOT), conf=str(ROOT / "conf"), out=str(tmp_path / "run"))
    seen = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert done.returncode == 0, done.stderr[-2000:]
        seen.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert seen[1][:2] == ["LightTokenizer", False], seen
    # the bf16 GEMM's copies: made by a process that found none, read by the next (none where no bf16 GEMM runs)
    assert seen[1][2] in ("cached", "none") and (seen[1][2] == "none") == (seen[0][2] == "none"), seen


def test_token_texts_are_kept_for_the_next_process_and_follow_the_tokenizer_files(folder, tmp_path, monkeypatch):
    """Decoding every token took 70 ms of each start (the stop rules); a tokenizer read from a folder has them
    kept in the project's cache, named by its files: read back equal, decoded again when a file changes or the
    kept file is damaged, and never written into the tokenizer's own folder."""
    import json

    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path / "cache"))
    first = LightTokenizer(folder)
    texts = token_texts(first)
    assert texts == token_module._decoded(first) and len(texts) == 49152
    (kept,) = (tmp_path / "cache" / "texts").glob("*.json")
    assert json.loads(kept.read_text()) == texts and not (folder / "texts").exists()
    decoded: list[object] = []
    real = token_module._decoded
    monkeypatch.setattr(token_module, "_decoded", lambda t: decoded.append(t) or real(t))
    again = LightTokenizer(folder)  # a new tokenizer object, as in the next process
    assert token_texts(again) == texts and decoded == []
    kept.write_text("[1, 2")  # damaged: decoded again, and kept anew
    assert token_texts(LightTokenizer(folder)) == texts and len(decoded) == 1
    assert json.loads(kept.read_text()) == texts
    changed = tmp_path / "changed"
    shutil.copytree(folder, changed)
    config = json.loads((changed / "tokenizer_config.json").read_text())
    (changed / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 4096}))
    token_texts(LightTokenizer(changed))  # another file: another name, decoded for it
    assert len(decoded) == 2 and len(list((tmp_path / "cache" / "texts").glob("*.json"))) == 2
