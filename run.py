"""Hydra entry point: compose the config, run the pipeline, log to MLflow, print the summary.

python run.py precision=bf16 attention=sdpa
python run.py -m precision=fp32,bf16 attention=eager,sdpa
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))  # run from a checkout without installing

from pipeline.config import Config  # noqa: E402
from pipeline.errors import PipelineError  # noqa: E402

log = logging.getLogger("pipeline")


def register_configs() -> None:
    """The structured schema every YAML file of conf/ is checked against."""
    ConfigStore.instance().store(name="config_schema", node=Config)


register_configs()


def run_name() -> str:
    """The job's command-line overrides, e.g. 'precision=bf16,attention=sdpa', or 'defaults'."""
    overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("tracking.")]
    return ",".join(overrides) or "defaults"


def run(cfg: DictConfig) -> dict[str, float]:
    """Run one configured job; returns its metrics."""
    from pipeline.runner import run_pipeline
    from pipeline.summary import format_summary

    config: Config = OmegaConf.to_object(cfg)  # runs each dataclass's checks
    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    launch_dir = Path(hydra.utils.get_original_cwd())

    result = run_pipeline(config, output_dir, log=log.info)
    print(format_summary(result), flush=True)
    print(f"results saved in {output_dir}")

    if config.tracking.enabled:
        from pipeline.tracking import default_uri, log_run

        uri = config.tracking.uri or default_uri(launch_dir)
        run_id = log_run(
            result,
            OmegaConf.to_container(cfg, resolve=True),
            output_dir,
            uri,
            config.tracking.experiment,
            config.tracking.run_name or run_name(),
            output_dir / hydra_cfg.output_subdir if hydra_cfg.output_subdir else None,
        )
        print(f"logged to MLflow run {run_id} in experiment '{config.tracking.experiment}'")
        print(f"browse runs: mlflow ui --backend-store-uri {uri}")
    return result.metrics()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except PipelineError as err:
        if cfg.get("debug"):
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
