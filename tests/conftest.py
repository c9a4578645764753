"""Fixtures that compose the project's real Hydra configs, as lightning-hydra-template does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
sys.path.insert(0, str(ROOT))

from run import register_configs  # noqa: E402

register_configs()  # the structured schema that conf/config.yaml names first in its defaults


@pytest.fixture
def compose_cfg():
    """compose_cfg(['precision=bf16']) -> DictConfig with hydra.* resolvable."""

    def _compose(overrides: list[str] | None = None):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides or [], return_hydra_config=True)
            HydraConfig().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]  # as @hydra.main passes it: without the hydra node
        return cfg

    yield _compose
    GlobalHydra.instance().clear()


def run_app(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python run.py ARGS` from `cwd` as a user would; outputs land under cwd."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.fixture(scope="session")
def tiny_fp32():
    """The tiny random Llama with the real tokenizer, in fp32 on the CPU."""
    import torch

    from pipeline.config import ModelConfig
    from pipeline.models import load_model

    return load_model(ModelConfig(name="tiny", source="tiny"), torch.device("cpu"), torch.float32, "sdpa")
