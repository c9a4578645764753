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

from pipeline import cpu  # noqa: E402
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


@pytest.fixture(scope="session")
def saved_tiny(tiny_fp32, tmp_path_factory):
    """The tiny model saved as a transformers folder, as `model=local model.path=FOLDER` takes it."""
    folder = tmp_path_factory.mktemp("tiny") / "model"
    tiny_fp32.model.save_pretrained(folder)
    tiny_fp32.tokenizer.save_pretrained(folder)
    return folder


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as_postgres(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root; CI runs as root, so run its tools as the postgres user."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@pytest.fixture(scope="session")
def postgres_uri():
    """A real PostgreSQL server on 127.0.0.1 with an empty `mlflow` database; stopped after the session."""
    import glob
    import shutil

    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not bins:
        pytest.skip("PostgreSQL server is not installed (apt-get install postgresql; .ci/run does)")
    import tempfile

    bin_dir = Path(bins[-1]).parent
    # pytest's own temporary folders are private to root: the postgres user needs a folder it can enter
    data = Path(tempfile.mkdtemp(prefix="pipeline-pg-"))
    if os.geteuid() == 0:
        shutil.chown(data, "postgres", "postgres")
    port = free_port()
    subprocess.run(_as_postgres([str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"]),
                   check=True, capture_output=True)  # fmt: skip
    options = f"-p {port} -h 127.0.0.1 -k {data}"
    subprocess.run(_as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(data / "log"),
                                 "-w", "start"]), check=True, capture_output=True)  # fmt: skip
    try:
        subprocess.run([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "mlflow"],
                       check=True, capture_output=True)  # fmt: skip
        yield f"postgresql://postgres@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run(_as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"]),
                       capture_output=True)  # fmt: skip
        shutil.rmtree(data, ignore_errors=True)


def start_mlflow_server(
    backend_uri: str, artifacts: Path | None, log_file: Path, command_name: str = "server"
) -> tuple[subprocess.Popen, str]:
    """`mlflow server` (or `mlflow ui`) on 127.0.0.1 over `backend_uri`; returns the process and URI once healthy."""
    import time
    import urllib.request

    port = free_port()
    command = [str(Path(sys.executable).parent / "mlflow"), command_name, "--backend-store-uri", backend_uri,
               "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    if artifacts is not None:
        command += ["--artifacts-destination", artifacts.as_uri(), "--workers", "1"]
    process = subprocess.Popen(command, stdout=open(log_file, "w"), stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {log_file.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    return process, uri
        except OSError:
            time.sleep(0.5)
    process.terminate()
    raise RuntimeError(f"mlflow server did not answer in 120 s: {log_file.read_text()[-2000:]}")


@pytest.fixture(params=cpu.KERNEL_ISAS)
def built(request, monkeypatch):
    """Each kernel build this CPU executes (PIPELINE_KERNEL_ISA selects it); the op namespace of that build.

    A build whose instructions this CPU lacks is skipped, saying which CPU it needs."""
    from pipeline import kernels

    isa = request.param
    missing = cpu.ISA_NEEDS[isa] - set(cpu.cpu_flags())
    if missing:
        pytest.skip(
            f"the {isa} kernel build needs a CPU with {' '.join(sorted(cpu.ISA_NEEDS[isa]))}; this one lacks "
            f"{' '.join(sorted(missing))} (CI on such a CPU runs it)"
        )
    monkeypatch.delenv(cpu.SIMULATE_ENV, raising=False)
    monkeypatch.delenv(cpu.KIND_ENV, raising=False)
    monkeypatch.setenv(cpu.ISA_ENV, isa)
    if not kernels.available():
        pytest.fail(
            f"the {isa} kernel build should run on this {cpu.detected_kind()} CPU: {kernels.unavailable_reason()}"
        )
    assert kernels.isa() == isa
    return kernels.ops()
