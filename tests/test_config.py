"""Every option of every config group composes; bad overrides fail with a message naming the key or fix."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
from conftest import CONF, run_app
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from pipeline.config import Config, GenerationConfig, PromptConfig, load_config
from pipeline.errors import PipelineError

GROUPS = {p.name: sorted(f.stem for f in p.glob("*.yaml")) for p in CONF.iterdir() if p.is_dir()}
OPTIONS = [(group, option) for group, options in sorted(GROUPS.items()) for option in options]
LOCAL_PATH = ["model.path=/tmp/some-model"]


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes(compose_cfg, group, option):
    extra = LOCAL_PATH if (group, option) == ("model", "local") else []
    cfg = compose_cfg([f"{group}={option}", *extra])
    config = OmegaConf.to_object(cfg)
    assert isinstance(config, Config)
    if group == "precision":
        assert config.precision.name == option
    if group == "attention":
        assert config.attention.implementation == option
    if group == "model":
        assert config.model.name == option


def test_all_groups_present():
    assert {
        "model",
        "precision",
        "attention",
        "generation",
        "runtime",
        "dataset",
        "prompt",
        "stages",
        "tracking",
        "experiment",
    } <= set(GROUPS)
    assert {"fp32", "bf16", "fp16", "auto"} <= set(GROUPS["precision"])
    assert {"eager", "sdpa", "flash_attention_2", "flex_attention"} <= set(GROUPS["attention"])
    assert {"smollm2-135m", "smollm2-360m", "local", "tiny"} <= set(GROUPS["model"])
    assert {"raw", "instruct", "cot"} <= set(GROUPS["prompt"])


def test_defaults_are_the_embedded_model_optimized(compose_cfg):
    config = OmegaConf.to_object(compose_cfg())
    assert config.model.source == "embedded"
    assert config.precision.name == "auto"
    assert config.generation.do_sample is False and config.generation.num_beams == 1
    assert config.generation.use_cache and config.prompt.style == "tool"
    assert config.generation.stop_string == "\n" and config.generation.max_new_tokens == 20  # the tool's one line
    cot = OmegaConf.to_object(compose_cfg(["prompt=cot"]))
    assert cot.generation.stop_string == "</answer>" and cot.generation.max_new_tokens == 48
    assert config.runtime.inference_mode and config.runtime.warmup
    assert config.dataset.num_questions == 32 and config.stages.micro_batch_size == 32


def differences(a, b, prefix: str = "") -> list[str]:
    """Every field where two configs differ, as 'group.key: a != b' (empty when equal)."""
    if dataclasses.is_dataclass(a) and type(a) is type(b):
        return [d for f in dataclasses.fields(a) for d in differences(getattr(a, f.name), getattr(b, f.name),
                                                                        f"{prefix}{f.name}.")]  # fmt: skip
    return [] if a == b else [f"{prefix[:-1]}: {a!r} != {b!r}"]


@pytest.mark.parametrize(
    "overrides",
    [[], ["prompt=cot", "precision=fp32"], ["experiment=seed_before"], ["model=tiny", "generation.max_new_tokens=7"]],
)
def test_load_config_is_what_run_py_composes(compose_cfg, overrides):
    assert differences(load_config(overrides), OmegaConf.to_object(compose_cfg(overrides))) == []


def test_python_defaults_are_the_yaml_defaults_but_for_the_prompt(compose_cfg):
    composed = compose_cfg()
    for group in dataclasses.fields(Config):
        if group.name not in ("prompt", "debug"):  # each group's dataclass holds its default option's values
            default = dataclasses.asdict(group.default_factory())
            assert OmegaConf.to_container(composed[group.name]) == default, group.name
    # so Config() differs from what run.py runs only in the prompt (its text lives in conf/prompt/tool.yaml)
    # and in what the prompt asks of generation
    changed = {d.split(":")[0] for d in differences(Config(), load_config())}
    assert changed and changed <= {f"prompt.{f.name}" for f in dataclasses.fields(PromptConfig)} | {
        "generation.max_new_tokens", "generation.stop_string"}  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "max_new_tokens", "stop_string"),
    [
        ([], 20, "\n"),  # the tool prompt's requests
        (["prompt=cot"], 48, "</answer>"),
        (["prompt=raw"], 48, "</answer>"),  # no request: the built-in defaults
        (["generation.max_new_tokens=30"], 30, "\n"),  # set on the command line: it wins
        (["prompt=tool", "generation.max_new_tokens=30"], 30, "\n"),  # in either order
        (["generation.max_new_tokens=30", "prompt=tool"], 30, "\n"),
        (["generation.stop_string=''"], 20, ""),  # never stop early, whatever the prompt asks
        (["experiment=seed_before"], 50, ""),  # a recipe's settings win too
    ],
)
def test_generation_settings_take_the_prompts_requests_where_unset(compose_cfg, overrides, max_new_tokens, stop_string):
    generation = OmegaConf.to_object(compose_cfg(overrides)).generation
    assert (generation.max_new_tokens, generation.stop_string) == (max_new_tokens, stop_string)


def test_generation_settings_from_python():
    tool = PromptConfig(style="tool", max_new_tokens=20, stop_string="\n")
    assert Config(prompt=tool).generation.max_new_tokens == 20
    assert Config(prompt=tool, generation=GenerationConfig(max_new_tokens=10)).generation.max_new_tokens == 10
    assert Config().generation.stop_string == "</answer>" and GenerationConfig().resolved().max_new_tokens == 48
    with pytest.raises(PipelineError, match="prompt.max_new_tokens"):
        PromptConfig(max_new_tokens=0)


def test_prompt_options_set_only_the_prompt_group(compose_cfg):
    keys = {f.name for f in dataclasses.fields(PromptConfig)}
    for file in sorted((CONF / "prompt").glob("*.yaml")):
        assert "@package" not in file.read_text(), file.name  # no writing into other groups' packages
        assert set(OmegaConf.load(file)) <= keys, file.name
    with pytest.raises(Exception, match="gguf_file"):  # the dead option is gone
        compose_cfg(["model.gguf_file=x.gguf"])


def test_seed_experiments_reproduce_the_original_recipes(compose_cfg):
    before = OmegaConf.to_object(compose_cfg(["experiment=seed_before"]))
    assert (before.precision.name, before.attention.implementation) == ("fp32", "eager")
    assert before.generation.max_new_tokens == 50
    assert not before.runtime.inference_mode and not before.runtime.warmup
    after = OmegaConf.to_object(compose_cfg(["experiment=seed_after"]))
    assert (after.precision.name, after.attention.implementation) == ("half", "sdpa")
    assert after.generation.max_new_tokens == 20
    assert after.runtime.inference_mode and after.runtime.warmup and after.runtime.cudnn_benchmark


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("generation.max_new_tokens=0", "generation.max_new_tokens"),
        ("dataset.num_questions=-3", "dataset.num_questions"),
        ("stages.micro_batch_size=0", "stages.micro_batch_size"),
        ("runtime.device=tpu", "runtime.device"),
        ("generation.top_p=1.5", "generation.top_p"),
    ],
)
def test_out_of_range_values_raise_pipeline_error(compose_cfg, override, message):
    with pytest.raises(PipelineError, match=message.replace(".", r"\.")):
        OmegaConf.to_object(compose_cfg([override]))


def test_typo_and_wrong_type_fail_at_compose(compose_cfg):
    with pytest.raises(Exception, match="max_new_tokns"):
        compose_cfg(["generation.max_new_tokns=5"])
    with pytest.raises(Exception, match="max_new_tokens"):
        compose_cfg(["generation.max_new_tokens=many"])


def test_cli_unknown_option_lists_valid_ones(tmp_path):
    result = run_app(["precision=fp8"], tmp_path, timeout=120)
    assert result.returncode != 0
    assert "fp8" in result.stderr and "bf16" in result.stderr and "fp32" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_out_of_range_is_one_line_without_traceback(tmp_path):
    result = run_app(["generation.max_new_tokens=0", "tracking.enabled=false"], tmp_path, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "generation.max_new_tokens" in errors[0]


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("generation.max_new_tokns=5", "generation.max_new_tokns: no such setting"),
        ("generation.max_new_tokens=many", "generation.max_new_tokens: Value 'many'"),
        ("stages.batched=maybe", "stages.batched"),
    ],
)
def test_cli_typo_and_wrong_type_are_one_line(tmp_path, override, needle):
    result = run_app([override], tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [line for line in result.stderr.strip().splitlines() if line]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0] and "Traceback" not in result.stderr


def test_a_passed_override_check_is_remembered_until_conf_or_the_overrides_change(tmp_path, monkeypatch):
    """run.py composes the config once more to turn Hydra's errors into one line; a check these overrides passed
    against this conf/ and schema is not composed again, a different override or an edited conf/ is."""
    import hydra

    import run

    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path / "cache"))
    composed = []
    real = hydra.compose

    def counting(*args, **kwargs):
        composed.append(kwargs.get("overrides"))
        return real(*args, **kwargs)

    monkeypatch.setattr(hydra, "compose", counting)
    GlobalHydra.instance().clear()
    assert run.check_overrides(["stages.batched=false"], conf) is None
    assert run.check_overrides(["stages.batched=false"], conf) is None
    assert len(composed) == 1
    assert "no such setting" in run.check_overrides(["stages.batchd=false"], conf)
    assert "no such setting" in run.check_overrides(["stages.batchd=false"], conf)  # failures are never remembered
    (conf / "stages" / "default.yaml").write_text((conf / "stages" / "default.yaml").read_text().replace(
        "batched: true", "batched: maybe"))  # fmt: skip
    assert "not a valid bool" in run.check_overrides(["stages.batched=false"], conf)  # checked again, and caught
    assert len(composed) == 4
    # an output folder of its own per run (the bench, scripts): one check serves every plain path
    shutil.copy(CONF / "stages" / "default.yaml", conf / "stages" / "default.yaml")
    assert run.check_overrides(["stages.single=false", "hydra.run.dir=/tmp/a/round0"], conf) is None
    assert run.check_overrides(["stages.single=false", "hydra.run.dir=outputs/b-1.x"], conf) is None
    assert len(composed) == 5
    assert run.check_overrides(["stages.single=false", "hydra.run.dir=${oops"], conf) is not None  # not a plain path
    assert run.check_overrides(["stages.single=true", "hydra.run.dir=/tmp/a"], conf) is None  # other overrides
    assert len(composed) == 7
    GlobalHydra.instance().clear()


def test_the_run_mode_is_remembered_per_overrides_and_conf(tmp_path, monkeypatch):
    """Hydra composes once just to read hydra.mode: run.py remembers it, so a second process with the same
    overrides and conf/ does not compose for it, and a conf/ that changes the mode is read again."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.types import RunMode

    import run

    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(Hydra, "get_mode", Hydra.get_mode)  # put back after the test: remember_run_mode replaces it
    composed = []
    compose = Hydra.compose_config

    def counting(self, *args, **kwargs):
        composed.append(kwargs.get("overrides"))
        return compose(self, *args, **kwargs)

    monkeypatch.setattr(Hydra, "compose_config", counting)
    GlobalHydra.instance().clear()
    app = Hydra.create_main_hydra2(task_name="run", config_search_path=create_config_search_path(str(conf)))
    args = ["stages.batched=false"]
    run.remember_run_mode(args, conf)
    assert app.get_mode("config", args) is None  # the shipped conf sets no mode
    assert app.get_mode("config", args) is None
    assert len(composed) == 1
    config = conf / "config.yaml"
    config.write_text(config.read_text().replace("hydra:\n", "hydra:\n  mode: MULTIRUN\n", 1))
    run.remember_run_mode(args, conf)  # the next process, after the edit
    assert app.get_mode("config", args) == RunMode.MULTIRUN
    assert app.get_mode("config", args) == RunMode.MULTIRUN
    assert len(composed) == 2
    wrapped = Hydra.get_mode
    run.remember_run_mode(["-m", *args], conf)  # Hydra's flags: left to Hydra
    assert Hydra.get_mode is wrapped
    GlobalHydra.instance().clear()
