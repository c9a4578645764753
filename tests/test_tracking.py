"""The tracking store check: every store scheme fails in seconds when it is down or its driver is missing."""

from __future__ import annotations

import importlib.util
import time

import pytest
from conftest import free_port

from pipeline.errors import PipelineError
from pipeline.tracking import check_reachable, client_for, flatten


def _fails_fast(uri: str, needle: str) -> str:
    start = time.perf_counter()
    with pytest.raises(PipelineError, match=needle) as caught:
        client_for(uri)
    assert time.perf_counter() - start < 10
    return str(caught.value)


def test_database_server_that_is_down_fails_in_seconds():
    message = _fails_fast(f"postgresql://user:secret@127.0.0.1:{free_port()}/mlflow", "is unreachable")
    assert "secret" not in message and "user:***@127.0.0.1" in message


def test_http_server_that_is_down_fails_in_seconds():
    _fails_fast(f"http://127.0.0.1:{free_port()}", "is unreachable")


@pytest.mark.parametrize(
    ("uri", "module", "package"),
    [
        ("mysql://u@127.0.0.1/mlflow", "MySQLdb", "mysqlclient"),
        ("mssql+pymssql://u@127.0.0.1/mlflow", "pymssql", "pymssql"),
    ],
)
def test_missing_database_driver_names_the_package(uri, module, package):
    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed here")
    _fails_fast(uri, f"driver, which is not installed .*; pip install {package}")


def test_unknown_driver_is_refused():
    _fails_fast("mysql+nosuchdriver://u@127.0.0.1/mlflow", "is not a database URL MLflow can use")


def test_sqlite_under_a_file_or_in_a_non_database_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    _fails_fast(f"sqlite:///{tmp_path / 'file' / 'sub' / 'mlflow.db'}", "is not a writable folder")
    (tmp_path / "notes.db").write_text("not a database at all")
    _fails_fast(f"sqlite:///{tmp_path / 'notes.db'}", "is not an SQLite database")


def test_usable_sqlite_paths_pass(tmp_path):
    check_reachable(f"sqlite:///{tmp_path / 'new' / 'folders' / 'mlflow.db'}")  # MLflow makes the folders
    (tmp_path / "empty.db").write_bytes(b"")
    check_reachable(f"sqlite:///{tmp_path / 'empty.db'}")
    check_reachable("sqlite://")  # in memory


def test_a_live_postgresql_store_passes(postgres_uri):
    check_reachable(postgres_uri)
    _fails_fast(postgres_uri.rsplit("/", 1)[0] + "/no_such_database", "refuses the connection")


def test_flatten_turns_nested_config_into_dotted_params():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": "1", "a.c": "[1, 2]", "d": "None"}
