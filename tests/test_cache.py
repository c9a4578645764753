"""The caches stay bounded and a full disk costs only the cache.

A cache that kept every packed state (0.7 GB each, one per change to the engine's code) and every deleted
clone's model folder (1-2 GB each) grew to 23 GB on one machine, and CI there failed with a full disk: these
tests pin the pruning and the full-disk path that mend it."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from pipeline import engine_weights
from pipeline.engine_weights import load_tensors, prune_engine_folder, save_tensors
from pipeline.models import SOURCE_RECORD, _cache_folder, prune_orphans


def _file(folder: Path, name: str, age_s: float) -> Path:
    from safetensors.torch import save_file  # not save_tensors: that prunes

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    save_file({"x": torch.arange(4.0)}, str(path))
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))
    return path


def test_a_full_disk_leaves_no_partial_file_and_one_warning_naming_the_fix(tmp_path, monkeypatch, capsys):
    """The error class and message safetensors raised for ENOSPC on that CI machine, after a partial write."""
    import safetensors
    import safetensors.torch

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 1000)  # what a disk takes before it is full
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    folder = tmp_path / "engine"
    file = folder / "q4-0123.safetensors"
    assert save_tensors(file, {"x": torch.ones(3)}) is False
    assert not file.exists()
    assert list(folder.iterdir()) == []  # the temporary file is gone too
    err = capsys.readouterr().err
    assert f"could not write the cache entry {file}" in err and "No space left on device" in err
    assert "PIPELINE_CACHE_DIR" in err and len(err.strip().splitlines()) == 1


def test_a_cache_that_cannot_be_created_costs_only_the_cache(tmp_path, capsys):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    assert engine_weights.save_state(blocker / "q4-1.safetensors", {"x": torch.ones(2)}, _Config()) is False
    assert "could not write the cache entry" in capsys.readouterr().err


class _Config:
    def to_json_string(self) -> str:
        return "{}"


SHAPE = engine_weights.LlamaShape(
    vocab_size=8,
    hidden_size=4,
    intermediate_size=8,
    num_hidden_layers=1,
    num_attention_heads=1,
    num_key_value_heads=1,
    head_dim=4,
    max_position_embeddings=16,
    rms_norm_eps=1e-5,
    rope_parameters={},
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
    tie_word_embeddings=True,
)


def test_pruning_keeps_the_files_of_each_kind_used_last(tmp_path):
    folder = tmp_path / "engine"
    old_q4 = [_file(folder, f"q4-{i}.safetensors", 1000 + 100 * i) for i in range(5)]  # q4-0 is the newest
    q8 = _file(folder, "q8-0.safetensors", 5000)
    prefixes = [_file(folder, f"prefix-{i:02d}.safetensors", 100 * i) for i in range(10)]
    stale_tmp, live_tmp = folder / ".q4-9.safetensors.1.tmp", folder / ".q4-9.safetensors.2.tmp"
    stale_tmp.write_bytes(b"x")
    live_tmp.write_bytes(b"x")  # another process writing now
    os.utime(stale_tmp, (time.time() - 2 * engine_weights.STALE_TMP_S,) * 2)
    prune_engine_folder(folder, keep_states=10**6, keep_prefixes=10**6)
    assert not stale_tmp.exists() and live_tmp.exists()

    assert load_tensors(old_q4[4]) is not None  # the oldest q4 is used again: it counts as the newest
    save_tensors(folder / "q4-new.safetensors", {"x": torch.zeros(2)})
    left = sorted(p.name for p in folder.glob("*.safetensors"))
    assert [n for n in left if n.startswith("q4-")] == ["q4-4.safetensors", "q4-new.safetensors"]
    assert q8.exists()  # the only one of its kind
    assert [n for n in left if n.startswith("prefix-")] == [p.name for p in prefixes[: engine_weights.KEEP_PREFIXES]]


def test_a_loaded_packed_state_counts_as_used_and_survives_newer_ones(tmp_path):
    folder = tmp_path / "engine"
    first = folder / "fp32-a.safetensors"
    assert engine_weights.save_state(first, {"x": torch.ones(1)}, SHAPE)
    os.utime(first, (time.time() - 3000,) * 2)
    _file(folder, "fp32-b.safetensors", 2000)
    _file(folder, "fp32-c.safetensors", 1000)  # a, b, c: a is the one used longest ago
    config, state = engine_weights.load_state(first)
    assert config == SHAPE and torch.equal(state["x"], torch.ones(1))
    save_tensors(folder / "fp32-d.safetensors", {"x": torch.ones(1)})
    assert sorted(p.name for p in folder.glob("*.safetensors")) == ["fp32-a.safetensors", "fp32-d.safetensors"]


def test_the_folders_of_gone_or_changed_gguf_files_are_removed_and_no_other(tmp_path):
    cache = tmp_path / "cache"
    live, gone, changed = (tmp_path / f"{name}.gguf" for name in ("live", "gone", "changed"))
    for path in (live, gone, changed):
        path.write_bytes(b"GGUF" + path.name.encode())
    folders = {path.name: _cache_folder(path, cache) for path in (live, gone, changed)}
    for folder in folders.values():
        assert (folder / SOURCE_RECORD).is_file()
        (folder / "model").mkdir()
    unrecorded = cache / "made-before-records-0123456789ab"
    unrecorded.mkdir()
    (cache / "calibration").mkdir()
    gone.unlink()
    stamp = changed.stat().st_mtime_ns + 10**9
    os.utime(changed, ns=(stamp, stamp))

    removed = prune_orphans(cache)
    assert sorted(removed) == sorted([folders["gone.gguf"], folders["changed.gguf"]])
    assert folders["live.gguf"].is_dir() and unrecorded.is_dir() and (cache / "calibration").is_dir()
    assert _cache_folder(changed, cache) != folders["changed.gguf"]  # the changed file gets a new folder


def test_a_gguf_this_process_cannot_stat_for_another_reason_keeps_its_folder(tmp_path, monkeypatch):
    """Permission denied (another user's clone, a path another machine sees) is no proof the file is gone."""
    cache = tmp_path / "cache"
    gguf = tmp_path / "theirs.gguf"
    gguf.write_bytes(b"GGUF")
    folder = _cache_folder(gguf, cache)
    real = Path.stat

    def denied(self, *args, **kwargs):
        if self == gguf:
            raise PermissionError(13, "Permission denied")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", denied)
    assert prune_orphans(cache) == [] and folder.is_dir()


def test_temporary_folders_a_killed_write_left_are_removed_once_stale(tmp_path):
    from pipeline.models import STALE_TEMPORARY_S

    cache = tmp_path / "cache"
    gguf = tmp_path / "live.gguf"
    gguf.write_bytes(b"GGUF")
    folder = _cache_folder(gguf, cache)
    stale, writing, kept = folder / ".model-abc123", folder / ".tokenizer-def456", folder / "model"
    for entry in (stale, writing, kept):
        entry.mkdir()
        (entry / "part.safetensors").write_bytes(b"x" * 100)
    old = time.time() - 2 * STALE_TEMPORARY_S
    os.utime(stale, (old, old))
    os.utime(kept, (old, old))
    assert prune_orphans(cache) == [stale]
    assert writing.is_dir() and kept.is_dir() and folder.is_dir()


@pytest.mark.parametrize("damage", ["{not json", '{"path": 3}', ""])
def test_a_damaged_record_keeps_its_folder(tmp_path, damage):
    folder = tmp_path / "cache" / "x-0"
    folder.mkdir(parents=True)
    (folder / SOURCE_RECORD).write_text(damage)
    assert prune_orphans(tmp_path / "cache") == []
    assert folder.is_dir()


# ------------------------------------------------------------------ a disk that refuses the bytes, end to end


def _disk_refusing_writes_over(limit_kb: int, args: list[str], cwd: Path, cache: Path, timeout: int):
    """run.py with files limited to `limit_kb` (RLIMIT_FSIZE: a larger write fails with EFBIG, as a full disk
    fails with ENOSPC; CPython ignores SIGXFSZ) and an empty cache, as a user on a nearly full disk runs it."""
    import resource
    import subprocess
    import sys

    from conftest import ROOT

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_kb * 1024, limit_kb * 1024))

    env = {**os.environ, "PIPELINE_CACHE_DIR": str(cache), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args, "tracking.enabled=false", f"hydra.run.dir={cwd / 'run'}"],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env, preexec_fn=limit,
    )  # fmt: skip


def _no_partial_files(cache: Path) -> list[str]:
    """Temporary files (.NAME.PID.tmp) and folders (.model-XXXX, .tokenizer-XXXX) left behind."""
    return [str(p) for p in cache.rglob("*") if p.name.startswith(".")]


def test_a_disk_refusing_the_tokenizer_folder_still_runs_and_saves_every_result(tmp_path):
    """The tiny model's tokenizer folder (3.4 MB) does not fit under 1 MB: the run goes on from memory."""
    cache = tmp_path / "cache"
    done = _disk_refusing_writes_over(1024, ["model=tiny", "prompt=raw", "generation.max_new_tokens=4",
                                             "dataset.num_questions=3", "stages.null_model=false"],
                                      tmp_path, cache, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    warnings = [line for line in done.stderr.splitlines() if "could not write the cache entry" in line]
    assert warnings and all("PIPELINE_CACHE_DIR" in line for line in warnings)
    assert any("/tokenizer (" in line for line in warnings)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["status"] == "finished" and list(saved["stages"]) == ["single", "batched"]
    assert list(cache.glob("*/tokenizer")) == [] and list(cache.glob("*/source.json"))  # the model's folder
    assert _no_partial_files(cache) == []


@pytest.mark.slow
def test_a_disk_refusing_the_model_and_packed_weights_still_runs_the_default_and_grades_it(tmp_path):
    """The real default run under 100 MB files: the dequantized model (0.5 GB) and the packed state (0.7 GB)
    are not cached, the loss pass and fidelity run from memory, every stage and score is saved."""
    cache = tmp_path / "cache"
    done = _disk_refusing_writes_over(100 * 1024, [], tmp_path, cache, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    warnings = [line for line in done.stderr.splitlines() if "could not write the cache entry" in line]
    assert any("/model (" in line for line in warnings) and any("/engine/q4-" in line for line in warnings)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["status"] == "finished" and list(saved["stages"]) == ["single", "batched"]
    for stage in saved["stages"].values():
        assert stage["grader_points"] == stage["grader_points"]  # graded (not NaN)
        assert stage["top1_agreement"] > 0.9  # fidelity measured against the in-memory fp32 model
    assert _no_partial_files(cache) == []
    assert not list(cache.glob("*/model"))


def test_the_model_built_in_memory_is_the_one_the_cache_folder_gives(tmp_path, monkeypatch, capsys):
    """Where the model folder cannot be written, the in-memory model has the same weights, dtype, attention."""
    from pipeline.config import ModelConfig
    from pipeline.models import embedded_gguf, gguf_model

    gguf = embedded_gguf()
    cached = gguf_model(gguf, tmp_path / "ok", ModelConfig(), torch.bfloat16, "eager")
    import transformers

    def refuse(self, folder, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", refuse)
    in_memory = gguf_model(gguf, tmp_path / "full", ModelConfig(), torch.bfloat16, "eager")
    assert "could not write the cache entry" in capsys.readouterr().err
    assert list((tmp_path / "full").glob("*/model")) == []
    assert in_memory.dtype == cached.dtype == torch.bfloat16
    assert in_memory.config._attn_implementation == cached.config._attn_implementation == "eager"
    ours, theirs = in_memory.state_dict(), cached.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_write_error_that_is_no_disk_error_is_not_hidden(tmp_path):
    from pipeline.cache import CacheWriteError
    from pipeline.models import _atomic_save

    def broken(folder):
        raise ValueError("a bug in the writer")

    with pytest.raises(ValueError, match="a bug"):
        _atomic_save(tmp_path / "x", broken)

    def full(folder):
        (Path(folder) / "half").write_bytes(b"x")
        raise OSError(28, "No space left on device")

    with pytest.raises(CacheWriteError, match="PIPELINE_CACHE_DIR"):
        _atomic_save(tmp_path / "y", full)
    assert list(tmp_path.iterdir()) == []  # neither folder, nor a temporary sibling


def test_small_cache_files_on_a_full_disk_warn_and_leave_nothing(tmp_path, monkeypatch, capsys):
    from pipeline import cache

    real = Path.write_text

    def full(self, text, *args, **kwargs):
        real(self, text[:3])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    assert cache.write_text(tmp_path / "calibration" / "k.json", "{}" * 100) is False
    assert list((tmp_path / "calibration").iterdir()) == []
    assert "could not write the cache entry" in capsys.readouterr().err
