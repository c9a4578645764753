"""Hydra entry point: compose the config, run the pipeline, log to MLflow, print the summary.

python run.py precision=bf16 attention=sdpa
python run.py -m precision=fp32,bf16 attention=eager,sdpa
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))  # run from a checkout without installing

from pipeline.config import Config  # noqa: E402
from pipeline.errors import PipelineError  # noqa: E402

log = logging.getLogger("pipeline")


def register_configs() -> None:
    """The structured schema every YAML file of conf/ is checked against."""
    ConfigStore.instance().store(name="config_schema", node=Config)


register_configs()


def run_name(swept: list[str] | None = None) -> str:
    """The job's command-line overrides, e.g. 'precision=bf16,attention=sdpa', or 'defaults'.

    In a sweep only the swept keys name the job; what every job shares is in the parent run.
    """
    overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("tracking.")]
    if swept:
        overrides = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in swept] or overrides
    return ",".join(overrides) or "defaults"


def _terminate_as_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def run(cfg: DictConfig) -> int:
    """Run one configured job; returns the exit status (0, or 3 when results could not be logged)."""
    from pipeline.summary import format_summary

    config: Config = OmegaConf.to_object(cfg)  # runs each dataclass's checks
    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    launch_dir = Path(hydra.utils.get_original_cwd())
    config_dict = OmegaConf.to_container(cfg, resolve=True)
    config_dict["generation"] = dataclasses.asdict(config.generation)  # as used: the prompt's requests filled in
    signal.signal(signal.SIGTERM, _terminate_as_interrupt)  # SIGTERM ends the run like Ctrl-C: results kept

    agent = None
    tracking_error: Exception | None = None
    run_id: str | None = None
    if config.tracking.enabled:
        from pipeline import tracking
        from pipeline.tracking_agent import TrackingAgent

        uri = config.tracking.uri or tracking.default_uri(launch_dir)
        parent, swept = None, []
        if hydra_cfg.mode == RunMode.MULTIRUN:
            from pipeline.sweep import sweep_info

            parent, swept = sweep_info(hydra_cfg.sweep.dir, uri)
        name = config.tracking.run_name or run_name(swept)
        # noted first, so that pipeline.sync finds the store whatever becomes of the agent; the agent's run
        # id replaces the note. The agent opens the run while torch imports and the model loads.
        tracking.note_intended_tracking(output_dir, uri, config.tracking.experiment, name)
        agent = TrackingAgent.start(uri, config.tracking.experiment, name, config_dict, output_dir, parent)
    from pipeline.runner import run_pipeline  # after the agent's start: torch's import overlaps MLflow's

    def opened() -> None:
        """Wait for the agent's run; called before the first stage, so that no stage is timed beside MLflow."""
        nonlocal run_id, tracking_error
        if agent is None or run_id is not None or tracking_error is not None:
            return
        try:
            run_id = agent.run_id()
        except Exception as err:  # the run goes on; its results stay in the folder for pipeline.sync
            tracking_error = err
            log.warning(f"MLflow is unavailable ({_first_line(err)}); running on, results go to {output_dir}")
            return
        if agent.wait_s >= 0.05:
            log.info(f"waited {agent.wait_s:.1f} s for MLflow to open the run")

    def close_run(status: str | None = None, error: str | None = None) -> Exception | None:
        opened()
        if run_id is None:
            return None
        try:
            agent.finish(status, error)
        except Exception as err:
            return err
        return None

    try:
        result = run_pipeline(config, output_dir, log=log.info, before_stages=opened)
    except KeyboardInterrupt:
        close_run("KILLED")
        print(f"interrupted: the stages done so far are saved in {output_dir}", file=sys.stderr)
        if run_id:
            print(f"MLflow run {run_id} is marked KILLED", file=sys.stderr)
        raise SystemExit(130) from None
    except BaseException as err:
        close_run("FAILED", f"{type(err).__name__}: {err}")
        raise
    print(format_summary(result), flush=True)
    print(f"results saved in {output_dir}")

    if agent is not None:
        tracking_error = tracking_error or close_run()
        if tracking_error is None:
            print(f"logged to MLflow run {run_id} in experiment '{config.tracking.experiment}'")
            from pipeline.tracking import folder_browse_hint

            print(f"browse runs: {folder_browse_hint(output_dir) or f'mlflow ui --backend-store-uri {uri}'}")
        else:
            print(
                f"error: could not log to MLflow ({_first_line(tracking_error)}); "
                f"the results are safe in {output_dir}\n"
                f"log them once the store is back: python -m pipeline.sync {output_dir}",
                file=sys.stderr,
            )
            return 3
    return 0


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    sweeping = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        status = run(cfg)
    except Exception as err:
        if cfg.get("debug") or not (sweeping or isinstance(err, PipelineError)):
            raise
        # in a sweep a failed job is logged (MLflow run FAILED, with its error) and the sweep goes on
        print(f"error: {err}" if isinstance(err, PipelineError) else f"error: job failed: {err!r}", file=sys.stderr)
        if not sweeping:
            sys.exit(2)
        return
    if status and not sweeping:  # a sweep goes on to its next job
        sys.exit(status)


def check_group_options(args: list[str], conf_dir: Path = Path(__file__).resolve().parent / "conf") -> str | None:
    """A one-line error for `group=option` overrides naming an option that does not exist, else None.

    Hydra's own message for this spans a dozen lines; this one names the valid options.
    """
    for arg in args:
        group, sep, value = arg.lstrip("+~").partition("=")
        folder = conf_dir / group
        if group == "model" and "null" in value.split(","):
            return "model=null: Hydra reads null as 'no option'; the null model (random weights) is model=random"
        if not sep or "/" in group or not folder.is_dir() or value == "null":
            continue
        options = sorted(f.stem for f in folder.glob("*.yaml"))
        for option in value.split(","):  # multirun sweeps list several
            if option and option not in options:
                return f"{group}={option} is not an option; choose one of: {', '.join(options)}"
    return None


# output folders: any plain path is as valid as another, so one check (and one mode) serves them all (the bench and
# scripts give every run its own folder, and paid the check and Hydra's mode composition, 0.2-0.3 s, every time)
_ANY_FOLDER = ("hydra.run.dir", "hydra.sweep.dir", "hydra.sweep.subdir")
_PLAIN_PATH = re.compile(r"[\w./@:+-]*")


def _checked_marker(args: list[str], conf_dir: Path) -> Path:
    """Where a passed check of these overrides against this conf/ and schema is remembered."""
    import hashlib

    from pipeline.config import default_cache_dir

    def key(arg: str) -> str:
        name, _, value = arg.partition("=")
        return f"{name}=<folder>" if name.lstrip("+~") in _ANY_FOLDER and _PLAIN_PATH.fullmatch(value) else arg

    digest = hashlib.sha1(json.dumps([[key(a) for a in args], hydra.__version__]).encode())
    schema = Path(__file__).resolve().parent / "src" / "pipeline" / "config.py"
    for file in [*sorted(conf_dir.rglob("*")), schema]:
        if file.is_file():
            digest.update(str(file).encode() + b"\0" + file.read_bytes())
    return default_cache_dir() / "checked" / digest.hexdigest()[:16]


def check_overrides(args: list[str], conf_dir: Path = Path(__file__).resolve().parent / "conf") -> str | None:
    """Compose the config as the run will, and turn a misspelled key or a wrong type into one line (else None).

    Sweeps and Hydra's own flags are left to Hydra. A check passed before with the same overrides, conf/ and
    schema is not composed again (a third of a second of a warm process's ready time).
    """
    if any(a.startswith("-") for a in args):
        return None
    marker = _checked_marker(args, conf_dir)
    if marker.is_file():
        return None
    from hydra import compose, initialize_config_dir
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            compose(config_name="config", overrides=args, return_hydra_config=True)
    except Exception as err:
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, OmegaConfBaseException):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            return _first_line(err)
        key = getattr(cause, "full_key", None) or ""
        reason = _first_line(cause)
        if "not in" in reason or "not in struct" in reason:
            return f"{key}: no such setting ({reason}); check the spelling, the keys are in conf/"
        return f"{key}: {reason}" if key else reason
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    except OSError:  # a read-only cache only costs the next run this check again
        pass
    return None


def remember_run_mode(args: list[str], conf_dir: Path = Path(__file__).resolve().parent / "conf") -> None:
    """Hydra composes the whole config once only to read `hydra.mode`, then again to run (0.2 s of a warm
    process's ready time). The mode these overrides give with this conf/ and schema is remembered beside the
    passed override check, and Hydra is handed it from there. Hydra's own flags (-m, --cfg, ...) are left to it.
    """
    if any(a.startswith("-") for a in args):
        return
    try:
        from hydra._internal.hydra import Hydra

        composing = getattr(Hydra.get_mode, "composing", Hydra.get_mode)  # Hydra's own, once replaced
    except (ImportError, AttributeError):  # another Hydra than 1.3's: it composes twice, as it would
        return
    file = _checked_marker(args, conf_dir).with_suffix(".mode")

    def get_mode(self, config_name, overrides):
        try:
            name = file.read_text()
            return None if name == "none" else RunMode[name]
        except (OSError, KeyError):  # not remembered yet, or unreadable: Hydra composes as it would
            pass
        mode = composing(self, config_name, overrides)
        from pipeline import cache

        cache.write_text(file, "none" if mode is None else mode.name, quiet=True)
        return mode

    get_mode.composing = composing
    Hydra.get_mode = get_mode


def check_cpu_kind() -> str | None:
    """A forced CPU kind this CPU cannot run, as one line (else None)."""
    from pipeline import cpu

    try:
        cpu.current()
    except PipelineError as err:
        return str(err)
    return None


if __name__ == "__main__":
    problem = check_cpu_kind() or check_group_options(sys.argv[1:]) or check_overrides(sys.argv[1:])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    remember_run_mode(sys.argv[1:])
    main()
