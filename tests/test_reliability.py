"""Bad input gets a one-line error; results survive interrupts, out-of-memory and an unreachable store."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import shutil
import signal
import socket
import subprocess
import sys
import time

import mlflow
import pytest
import torch
from conftest import ROOT, run_app
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import GenerationConfig, ModelConfig
from pipeline.data import load_items
from pipeline.errors import PipelineError
from pipeline.generation import Generator
from pipeline.models import load_model
from pipeline.stages import StageInterrupted, run_batched, run_single
from pipeline.sync import main as sync_main

TINY = ["model=tiny", "prompt=raw", "generation.max_new_tokens=6"]


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["precision=fp8"], "choose one of: auto, bf16"),
        (["-m", "attention=sdpa,flash3"], "attention=flash3 is not an option"),
        (["generation.max_new_tokens=0"], "generation.max_new_tokens"),
        (["stages.micro_batch_size=0"], "stages.micro_batch_size"),
        (["dataset.num_questions=-1"], "dataset.num_questions"),
        (["dataset.path=/nonexistent/q.json"], "dataset file not found"),
        (["attention=flash_attention_2"], "attention=sdpa"),
        (["model=local", "model.path=/nonexistent/model"], "model.path"),
    ],
)
def test_bad_input_is_one_error_line_without_traceback(tmp_path, args, needle):
    if "flash_attention_2" in args[0] and torch.cuda.is_available():
        pytest.skip("checks the CPU refusal")
    result = run_app([*args, "tracking.enabled=false"] if args[0] != "-m" else args, tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr[-1000:]
    assert "Traceback" not in result.stderr
    errors = _error_lines(result.stderr)
    assert len(errors) == 1 and needle in errors[0], result.stderr[-1000:]


def test_a_file_that_is_not_a_model_is_one_error_line(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_text("<html>404 Not Found</html>")  # what a failed download leaves behind
    result = run_app(["model=local", f"model.path={fake}", "tracking.enabled=false"], tmp_path, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-1000:]
    assert _error_lines(result.stderr) == [
        f"error: model.path={fake} is not a GGUF file (it does not start with the GGUF magic bytes); "
        "download the .gguf file again or give a model folder"
    ]


@pytest.mark.parametrize(
    ("content", "needle"),
    [("{not json", "not valid JSON"), ('[["q", 1], ["only question"]]', "item 1"), ("[]", "empty")],
)
def test_bad_dataset_files_name_the_item(tmp_path, content, needle):
    path = tmp_path / "data.json"
    path.write_text(content)
    result = run_app([*TINY, f"dataset.path={path}", "tracking.enabled=false"], tmp_path, timeout=120)
    assert result.returncode == 2 and needle in _error_lines(result.stderr)[0]


def test_small_dataset_uses_what_there_is_and_says_so(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([["How many g in 2 kg?", 2000], {"question": "3 h in min?", "answer": 180}]))
    result = run_app([*TINY, f"dataset.path={path}", "tracking.enabled=false"], tmp_path)
    assert result.returncode == 0, result.stderr[-1000:]
    assert "fewer than dataset.num_questions=32; using all 2" in result.stderr + result.stdout


@settings(max_examples=60, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.floats() | st.text(max_size=20), lambda c: st.lists(c, max_size=4)))
def test_any_json_is_loaded_or_refused_cleanly(tmp_path_factory, value):
    path = tmp_path_factory.mktemp("json") / "data.json"
    path.write_text(json.dumps(value))
    try:
        items = load_items(path)
    except PipelineError:
        return
    assert all(isinstance(i.question, str) and math.isfinite(i.answer) for i in items)


class _FlakyGenerator:
    """A real generator that runs out of memory above `limit` prompts per call, or is interrupted on call `stop_at`."""

    def __init__(self, inner: Generator, limit: int = 10**9, stop_at: int = -1):
        self.inner, self.limit, self.stop_at, self.calls = inner, limit, stop_at, 0
        self.tokenizer = inner.tokenizer

    def batched_generate(self, prompts, max_new_tokens=None):
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        if len(prompts) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.inner.batched_generate(prompts, max_new_tokens)

    def generate(self, prompt, max_new_tokens=None):
        return self.batched_generate([prompt], max_new_tokens)[0]


def _tiny_setup(tiny_fp32, n=8):
    items = load_items()[:n]
    generator = Generator(tiny_fp32.model, tiny_fp32.tokenizer, GenerationConfig(max_new_tokens=4, stop_string=""))
    return items, [item.question for item in items], generator


def test_out_of_memory_halves_the_micro_batch_and_records_it(tiny_fp32):
    items, prompts, generator = _tiny_setup(tiny_fp32)
    with torch.inference_mode():
        expected = run_batched(generator, items, prompts, 0.05, 15.0, 8)
        stage = run_batched(_FlakyGenerator(generator, limit=2), items, prompts, 0.05, 15.0, 8)
    assert stage.oom_retries == 2 and stage.micro_batch_size == 2
    assert [p.output for p in stage.predictions] == [p.output for p in expected.predictions]


def test_interrupt_keeps_the_questions_done(tiny_fp32):
    items, prompts, generator = _tiny_setup(tiny_fp32)
    with torch.inference_mode(), pytest.raises(StageInterrupted) as caught:
        run_single(_FlakyGenerator(generator, stop_at=4), items, prompts, 0.05, 40.0)
    assert not caught.value.partial.complete and len(caught.value.partial.predictions) == 3
    with torch.inference_mode(), pytest.raises(StageInterrupted) as caught:
        run_batched(_FlakyGenerator(generator, stop_at=3), items, prompts, 0.05, 15.0, 2)
    assert [p.index for p in caught.value.partial.predictions] == [0, 1, 2, 3]


def test_an_interrupt_between_stages_saves_the_finished_stages_as_killed(tmp_path, monkeypatch):
    """Ctrl-C in the single stage's loss pass (after the stage, before the next): the run is killed, not running."""
    from pipeline import runner
    from pipeline.config import load_config

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "grade_stage", interrupted)
    cfg = load_config(["model=tiny", "prompt=raw", "generation.max_new_tokens=3", "dataset.num_questions=2"])
    with pytest.raises(KeyboardInterrupt):
        runner.run_pipeline(cfg, tmp_path, log=lambda message: None)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["status"] == "killed"
    assert list(saved["stages"]) == ["single"] and saved["stages"]["single"]["complete"]


def test_a_failure_after_a_stage_keeps_the_stage_marks_the_run_failed_and_says_where(tmp_path, monkeypatch):
    """The loss pass failing after the single stage (a full disk did this): the stage's results stay, the run
    is `failed` with its error rather than left `running`, and the log names the folder."""
    from pipeline import runner
    from pipeline.config import load_config

    def broken(*args, **kwargs):
        raise RuntimeError("the loss model would not load")

    monkeypatch.setattr(runner, "grade_stage", broken)
    cfg = load_config(["model=tiny", "prompt=raw", "generation.max_new_tokens=3", "dataset.num_questions=2"])
    lines: list[str] = []
    with pytest.raises(RuntimeError, match="would not load"):
        runner.run_pipeline(cfg, tmp_path, log=lines.append)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["status"] == "failed" and saved["error"] == "RuntimeError: the loss model would not load"
    assert list(saved["stages"]) == ["single"] and saved["stages"]["single"]["complete"]
    assert any("failed after the single stage" in line and str(tmp_path) in line for line in lines)


def test_a_failure_whose_last_save_fails_too_raises_the_failure_with_its_cause_and_logs_the_save(tmp_path, monkeypatch):
    from pipeline import runner
    from pipeline.config import load_config

    def broken(*args, **kwargs):
        try:
            raise OSError("the root cause")
        except OSError as cause:
            raise RuntimeError("the loss model would not load") from cause

    saves = []
    real = runner.save_results

    def save_once(result, output_dir):
        saves.append(result.status)
        if len(saves) > 1:
            raise PipelineError(f"could not write the results in {output_dir} (No space left on device)")
        real(result, output_dir)

    monkeypatch.setattr(runner, "grade_stage", broken)
    monkeypatch.setattr(runner, "save_results", save_once)
    cfg = load_config(["model=tiny", "prompt=raw", "generation.max_new_tokens=3", "dataset.num_questions=2"])
    lines: list[str] = []
    with pytest.raises(RuntimeError, match="would not load") as raised:
        runner.run_pipeline(cfg, tmp_path, log=lines.append)
    assert str(raised.value.__cause__) == "the root cause"
    assert saves == ["running", "failed"]
    assert any(line.startswith("error: could not write the results") for line in lines)
    assert not any("its results are saved" in line for line in lines)


def test_a_run_folder_the_disk_will_not_write_is_one_error_naming_it_and_the_fix(tmp_path):
    from pipeline import runner
    from pipeline.config import load_config

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    cfg = load_config(["model=tiny", "prompt=raw", "generation.max_new_tokens=3", "dataset.num_questions=2"])
    with pytest.raises(PipelineError, match="could not write the results in .*hydra.run.dir="):
        runner.run_pipeline(cfg, blocker / "run", log=lambda line: None)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _runs(db):
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    return mlflow.search_runs(experiment_names=["unit-conversion"])


STORES_DOWN = {
    "http": lambda: f"http://127.0.0.1:{_closed_port()}",
    "postgresql": lambda: f"postgresql://mlflow@127.0.0.1:{_closed_port()}/mlflow",
    "mysql-without-driver": lambda: "mysql://mlflow@127.0.0.1/mlflow",
}


@pytest.mark.parametrize("store", list(STORES_DOWN))
def test_unreachable_store_keeps_results_and_sync_logs_them_once(tmp_path, store):
    if store == "mysql-without-driver" and importlib.util.find_spec("MySQLdb") is not None:
        pytest.skip("the MySQL driver is installed here")
    run_dir = tmp_path / "run"
    uri = STORES_DOWN[store]()
    args = [*TINY, "dataset.num_questions=2", "runtime.warmup=false", f"tracking.uri={uri}",
            "tracking.run_name=kept-offline", f"hydra.run.dir={run_dir}"]  # fmt: skip
    start = time.perf_counter()
    result = run_app(args, tmp_path, timeout=240)  # without the check, MLflow retries a database for an hour
    assert result.returncode == 3, result.stderr[-1500:]
    assert time.perf_counter() - start < 120
    assert "MLflow is unavailable" in result.stdout + result.stderr
    assert "error: could not log to MLflow" in result.stderr
    assert f"python -m pipeline.sync {run_dir}" in result.stderr
    assert json.loads((run_dir / "results.json").read_text())["status"] == "finished"
    assert json.loads((run_dir / "tracking.json").read_text())["uri"] == uri

    if store != "http":
        return  # from here on the folder is synced the same way whatever store was down
    db = tmp_path / "later.db"
    for _ in range(2):
        assert sync_main([str(run_dir), "--uri", f"sqlite:///{db}"]) == 0
    runs = _runs(db)
    assert len(runs) == 1 and runs.iloc[0]["status"] == "FINISHED"
    assert runs.iloc[0]["tags.mlflow.runName"] == "kept-offline"  # tracking.run_name
    assert runs.iloc[0]["metrics.batched/num_questions"] == 2 and runs.iloc[0]["params.precision.name"] == "auto"
    # the dataset input and the predictions table come from the folder too, once however often it is synced
    client = mlflow.MlflowClient()
    (dataset_input,) = client.get_run(runs.iloc[0]["run_id"]).inputs.dataset_inputs
    assert dataset_input.dataset.name == "unit_conversion"
    table = client.load_table(runs.iloc[0]["experiment_id"], "predictions.json", run_ids=[runs.iloc[0]["run_id"]])
    assert len(table) == 4


def _run_past_single_stage(tmp_path, stdout):
    """Start a run whose batched stage takes seconds, and return (process, run folder, results.json) once its
    single stage is saved (or the process ended, or 240 s passed: the callers check which)."""
    run_dir = tmp_path / "run"
    # transformers, one prompt per batch: a batched stage of seconds
    command = [
        sys.executable, str(ROOT / "run.py"), *TINY, "backend=transformers", "dataset.num_questions=480",
        "stages.micro_batch_size=1", "stages.grader_loss=false", "stages.fidelity=false", "stages.null_model=false",
        "runtime.warmup=false", f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    process = subprocess.Popen(command, cwd=tmp_path, stdout=stdout, stderr=subprocess.PIPE, text=True)
    results = run_dir / "results.json"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if results.is_file() and "single" in json.loads(results.read_text())["stages"]:
            break
        time.sleep(0.2)
    return process, run_dir, results


@pytest.mark.slow
def test_sigterm_mid_batched_stage_keeps_single_results_and_marks_the_run_killed(tmp_path):
    process, run_dir, results = _run_past_single_stage(tmp_path, subprocess.PIPE)
    time.sleep(0.5)  # into the batched stage (480 one-prompt batches: seconds)
    assert process.poll() is None, "the run ended before it could be interrupted"
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-1500:]

    saved = json.loads(results.read_text())
    assert saved["status"] == "killed"
    assert saved["stages"]["single"]["complete"] and saved["stages"]["single"]["num_questions"] == 480
    assert not saved["stages"]["batched"]["complete"] and saved["stages"]["batched"]["num_questions"] < 480
    lines = (run_dir / "predictions.csv").read_text().count("\nsingle,")
    assert lines == 480

    db = tmp_path / "mlflow.db"
    runs = _runs(db)
    assert len(runs) == 1 and runs.iloc[0]["status"] == "KILLED"
    assert runs.iloc[0]["metrics.single/accuracy"] >= 0
    for _ in range(2):
        assert sync_main([str(run_dir)]) == 0
    runs = _runs(db)
    assert len(runs) == 1 and runs.iloc[0]["status"] == "KILLED"


@pytest.mark.slow
def test_a_run_process_killed_outright_leaves_a_killed_mlflow_run_not_a_running_one(tmp_path):
    """SIGKILL gives the run's process no chance to close its MLflow run; its tracking agent, left without an
    order, closes it as KILLED from what the folder holds (in-process tracking left it RUNNING for good)."""
    from pipeline.tracking_agent import ENDED_WITHOUT_ORDER

    process, _, _ = _run_past_single_stage(tmp_path, subprocess.DEVNULL)
    assert process.poll() is None, "the run ended before it could be killed"
    process.kill()
    process.wait(30)
    db = tmp_path / "mlflow.db"
    deadline = time.time() + 120
    while time.time() < deadline and _runs(db).iloc[0]["status"] == "RUNNING":
        time.sleep(0.5)
    run = _runs(db).iloc[0]
    assert run["status"] == "KILLED" and run["tags.error"] == ENDED_WITHOUT_ORDER
    assert run["metrics.single/num_questions"] == 480  # the folder's finished stage, logged by the agent


def test_trust_remote_code_only_when_asked(saved_tiny, tmp_path):
    """A model folder that ships its own Python runs none of it unless model.trust_remote_code=true."""
    folder, ran = tmp_path / "custom", tmp_path / "ran.txt"
    shutil.copytree(saved_tiny, folder)
    (folder / "custom_model.py").write_text(
        f"from pathlib import Path\nPath({str(ran)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'custom_llama'\n\n"
        "class CustomModel(LlamaForCausalLM):\n    config_class = CustomConfig\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "custom_llama"
    config["auto_map"] = {"AutoConfig": "custom_model.CustomConfig", "AutoModelForCausalLM": "custom_model.CustomModel"}
    (folder / "config.json").write_text(json.dumps(config))
    cfg = ModelConfig(name="local", source="local", path=str(folder))
    with pytest.raises(PipelineError, match="runs Python code of its own.*model.trust_remote_code=true"):
        load_model(cfg, torch.device("cpu"), torch.float32, "sdpa")
    assert not ran.exists()
    trusted = load_model(dataclasses.replace(cfg, trust_remote_code=True), torch.device("cpu"), torch.float32, "sdpa")
    assert ran.exists() and type(trusted.model).__name__ == "CustomModel"


def test_fp16_on_cpu_warns_with_the_faster_alternative(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU warning")
    result = run_app([*TINY, "precision=fp16", "dataset.num_questions=2", "tracking.enabled=false"], tmp_path)
    assert result.returncode == 0, result.stderr[-1000:]
    assert "fp16 on this CPU is emulated and slow in batches; precision=bf16 or auto is faster here" in (
        result.stdout + result.stderr
    )


def test_sigkill_in_a_stages_loss_pass_keeps_that_stages_answers(tmp_path):
    """A stage is written to the run folder as soon as its questions are done: a run killed outright (no handler
    runs on SIGKILL) in the loss pass that follows still leaves every answer of that stage."""
    run_dir = tmp_path / "run"
    command = [
        sys.executable, str(ROOT / "run.py"), *TINY, "dataset.num_questions=400", "stages.batched=false",
        "stages.grader_questions=null", "stages.fidelity=false", "stages.null_model=false", "runtime.warmup=false",
        f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = run_dir / "run.log"
    deadline = time.time() + 600
    while time.time() < deadline and process.poll() is None:
        # logged right after the stage is saved, before its loss pass of 13 batches on each padding side
        if log.is_file() and "single stage:" in log.read_text():
            process.kill()
            break
        time.sleep(0.02)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    saved = json.loads((run_dir / "results.json").read_text())
    single = saved["stages"]["single"]
    assert single["complete"] and single["num_questions"] == 400 and saved["status"] == "running"
    assert math.isnan(single["grader_loss"]), "killed after the loss pass: the test must kill during it"
    assert (run_dir / "predictions.csv").read_text().count("\nsingle,") == 400
