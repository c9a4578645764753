"""A run's MLflow work in a process of its own, so that importing MLflow is not on the way to a ready engine.

`import mlflow` and opening the store cost a default run 2-6 s (a new SQLite store most: MLflow creates its
tables), all before the model loaded. `run.py` now starts this agent first. It opens the run (params, status
RUNNING, system metrics) on the other core while the run's process imports torch and loads the model, and the
run's process waits for it only before its first stage, so that no stage is timed beside it. When the stages
are done, or the run fails or is interrupted, the run's process tells the agent how it ended and the agent logs
the folder and closes the MLflow run, as `tracking.finish_run` did in-process.

Protocol: one JSON line each way per step, over the agent's stdin and stdout.
- request: `{"uri", "experiment", "run_name", "config", "output_dir", "parent", "pid"}`;
  reply `{"run_id": ...}` or `{"error": ...}` (the intended store is noted in the folder for `pipeline.sync`).
- order: `{"status": null | "KILLED" | "FAILED", "error": null | str}`; reply `{"done": true}` or `{"error": ...}`.
If the run's process goes away without an order (killed outright), stdin ends and the agent closes the run as
KILLED from what the folder holds. The agent ignores SIGINT and SIGTERM: Ctrl-C in a terminal reaches the
whole process group, and the run's process, which handles it, is the one to say how the run ended.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

START_TIMEOUT_S = 180.0  # opening the run: MLflow's import and a new store's tables take seconds, a server more
FINISH_TIMEOUT_S = 600.0  # logging the folder: artifacts to a remote store can take minutes
ENDED_WITHOUT_ORDER = "the run's process ended without closing its MLflow run"


class AgentError(RuntimeError):
    """The agent could not do what it was asked: its message is the reason, in one line."""


class TrackingAgent:
    """The run's process's side: start the agent, wait for its run, tell it how the run ended."""

    def __init__(self, process: subprocess.Popen):
        self._process = process
        self._started: dict | None = None
        self.wait_s = 0.0  # how long the run's process waited for the run to open

    @classmethod
    def start(
        cls, uri: str, experiment: str, run_name: str, config: dict, output_dir: Path, parent: str | None = None
    ) -> TrackingAgent:
        source = str(Path(__file__).resolve().parents[1])  # the agent imports this checkout's pipeline
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")])))
        process = subprocess.Popen(
            [sys.executable, "-m", "pipeline.tracking_agent"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        request = {"uri": uri, "experiment": experiment, "run_name": run_name, "config": config,
                   "output_dir": str(output_dir), "parent": parent, "pid": os.getpid()}  # fmt: skip
        process.stdin.write(json.dumps(request) + "\n")
        process.stdin.flush()
        return cls(process)

    def run_id(self) -> str:
        """The opened run's id, waiting for it if need be; AgentError when the store could not open it."""
        if self._started is None:
            start = time.perf_counter()
            self._started = self._reply(START_TIMEOUT_S, "open the MLflow run")
            self.wait_s = time.perf_counter() - start
        if "run_id" not in self._started:
            raise AgentError(self._started.get("error") or "no run id")
        return self._started["run_id"]

    def finish(self, status: str | None = None, error: str | None = None) -> None:
        """Log the folder into the run and close it (status from the results unless given); AgentError on failure."""
        self.run_id()
        try:
            self._process.stdin.write(json.dumps({"status": status, "error": error}) + "\n")
            self._process.stdin.close()
        except OSError as err:  # the agent died: its reply says nothing more
            raise AgentError(f"the tracking agent ended early ({err})") from None
        reply = self._reply(FINISH_TIMEOUT_S, "log the run")
        self._process.wait(10)
        if not reply.get("done"):
            raise AgentError(reply.get("error") or "the run was not closed")

    def _reply(self, timeout_s: float, what: str) -> dict:
        ready, _, _ = select.select([self._process.stdout], [], [], timeout_s)
        if not ready:
            self._process.kill()
            return {"error": f"the tracking agent did not {what} within {timeout_s:.0f} s"}
        line = self._process.stdout.readline()
        if not line:
            code = self._process.wait(10)
            return {"error": f"the tracking agent ended (exit status {code}) before it could {what}"}
        return json.loads(line)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


_replies = None  # the run's process reads these; the agent's own stdout goes to stderr (MLflow's prints)


def _reply(message: dict) -> None:
    _replies.write(json.dumps(message) + "\n")
    _replies.flush()


def main() -> int:
    global _replies
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    line = sys.stdin.readline()
    if not line.strip():
        return 0  # the run's process went away before it asked anything
    request = json.loads(line)
    from pipeline import tracking

    output_dir = Path(request["output_dir"])
    uri, experiment, name, config = request["uri"], request["experiment"], request["run_name"], request["config"]
    try:
        run_id = tracking.start_run(uri, experiment, name, config, output_dir, request.get("parent"), request["pid"])
    except Exception as err:  # the run goes on; its results stay in the folder for pipeline.sync
        tracking.note_intended_tracking(output_dir, uri, experiment, name)
        _reply({"error": _first_line(err)})
        return 0
    _reply({"run_id": run_id})
    line = sys.stdin.readline()
    order = json.loads(line) if line.strip() else {"status": "KILLED", "error": ENDED_WITHOUT_ORDER}
    try:
        tracking.finish_run(uri, run_id, output_dir, config, order.get("status"), order.get("error"))
    except Exception as err:
        _reply({"error": _first_line(err)})
        return 0
    _reply({"done": True})
    return 0


if __name__ == "__main__":
    sys.exit(main())
