"""The services as real child processes (``python -m services <command>``), for the tests and the
benchmarks: start with settings in the environment, wait until ready, read /metrics and the log,
stop with SIGTERM (and a clean exit) or SIGKILL.

One class, :class:`ServiceProcess`, and two ways to make one:

- :func:`metrics_service` for ``ingest``, ``alerts`` and ``notify``: /readyz, /healthz and
  /metrics on a metrics port of 127.0.0.1, a free one at every start;
- :func:`api_service` for ``api``: on 127.0.0.1 and a free port chosen once.

Every life of a process appends its stdout and stderr to one log file (JSON logs by default in
both factories), so :meth:`ServiceProcess.records` sees all of them. Waits poll a condition
against a deadline and fail at once, with the log's tail, when the process exits.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

from lab.embedded import free_port

POLL_S = 0.05
METRICS_PORT = "PUMPWATCH_METRICS_PORT"


class ServiceError(RuntimeError):
    """A service exited, was not ready in time, or did not answer /metrics."""


class ServiceProcess:
    """``python -m services <command> <args>``; ``settings`` is added to this process's
    environment (and read at each start: a change applies from the next one).

    ``port``: where the process answers HTTP (/readyz, /healthz, /metrics); 0 for none. With
    ``port_setting`` (e.g. ``PUMPWATCH_METRICS_PORT``), each start takes a free port and passes
    it in that variable (``settings`` may still override it).
    """

    def __init__(
        self,
        command: str,
        settings: Mapping[str, str],
        log_path: Path,
        *,
        args: Sequence[str] = (),
        port: int = 0,
        port_setting: str | None = None,
    ) -> None:
        self.command = command
        self.settings = dict(settings)
        self.log_path = log_path
        self.args = tuple(args)
        self.port = port
        self.port_setting = port_setting
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        """time.time() of the last start."""
        self.starts = 0

    # -- lifecycle ----------------------------------------------------------------------------

    def environment(self) -> dict[str, str]:
        """The child's environment: this process's, the port, then ``settings``."""
        env = dict(os.environ)
        if self.port_setting is not None:
            env[self.port_setting] = str(self.port)
        env.update(self.settings)
        return env

    def start(self, *, wait_ready: bool = True, timeout_s: float = 60.0) -> Self:
        """Start a new life (appending to the log); by default wait for /readyz."""
        if self.alive:
            raise ServiceError(f"{self.command} is already running (pid {self.pid})")
        if self.port_setting is not None:
            self.port = free_port()
        with self.log_path.open("ab") as log:
            self.started_at = time.time()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "services", self.command, *self.args],
                env=self.environment(),
                stdout=log,
                stderr=log,
            )
        self.starts += 1
        if wait_ready:
            self.wait_ready(timeout_s)
        return self

    def wait_ready(self, timeout_s: float = 60.0, *, path: str = "/readyz") -> None:
        """Until ``path`` answers 200; raises if the process exits first or time runs out."""
        if not self.port:
            raise ValueError(f"{self.command} has no HTTP port to wait on")
        deadline = time.monotonic() + timeout_s
        while True:
            self.check()
            if self.get(path)[0] == 200:
                return
            if time.monotonic() > deadline:
                raise ServiceError(
                    f"{self.command} not ready after {timeout_s:.0f} s:\n{self.log()}"
                )
            time.sleep(POLL_S)

    def wait(self, timeout_s: float = 60.0) -> int:
        """Until the process exits by itself; its exit status."""
        return self._started().wait(timeout_s)

    def terminate(self, timeout_s: float = 60.0) -> int:
        """SIGTERM and wait; the exit status (0: a clean stop). Still running after
        ``timeout_s``, it is killed (status -9)."""
        proc = self._started()
        if proc.poll() is None:
            proc.terminate()
        try:
            return proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(30)

    def kill(self) -> None:
        """SIGKILL (no shutdown at all) and reap; nothing if it is not running."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """:meth:`terminate` if it runs (for clean-ups); the exit status, None if never
        started."""
        return None if self.proc is None else self.terminate(timeout_s)

    # -- state --------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        return self._started().pid

    @property
    def exit_text(self) -> str:
        """How the current life ended ("running" while it runs)."""
        if self.proc is None or self.proc.poll() is None:
            return "running"
        code = self.proc.returncode
        return f"killed by signal {-code}" if code < 0 else f"exit status {code}"

    def check(self) -> None:
        """Raise if the process has exited (or was never started)."""
        proc = self._started()
        if proc.poll() is not None:
            raise ServiceError(f"{self.command} exited with {proc.returncode}:\n{self.log()}")

    def _started(self) -> subprocess.Popen[bytes]:
        if self.proc is None:
            raise ServiceError(f"{self.command} was never started")
        return self.proc

    # -- HTTP ---------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str, *, timeout_s: float = 5.0) -> tuple[int, str]:
        """(status, body) of a GET on the process's port; (0, "") when nothing answers."""
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.port}{path}", timeout=timeout_s
            ) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError:
            return 0, ""

    def samples(self) -> dict[str, float] | None:
        """Every sample on /metrics, keyed by name with labels as printed (``name{a="b"}``);
        None if /metrics does not answer 200."""
        status, text = self.get("/metrics")
        return parse_samples(text) if status == 200 else None

    def metrics(self) -> dict[str, float]:
        """:meth:`samples`, raising if /metrics does not answer (a missed scrape is never read
        as zeros)."""
        status, text = self.get("/metrics")
        if status != 200:
            raise ServiceError(f"{self.command} /metrics answered {status}:\n{self.log()}")
        return parse_samples(text)

    def metric(self, name: str, **labels: str) -> float:
        """One sample of /metrics (0 when absent); labels in the order the service prints."""
        if labels:
            name += "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
        return self.metrics().get(name, 0.0)

    def wait_metric(self, name: str, value: float, timeout_s: float = 30.0, **labels: str) -> None:
        """Until the sample is at least ``value``."""
        self._wait_metric(name, labels, lambda found: found >= value, f">= {value}", timeout_s)

    def wait_metric_equal(
        self, name: str, value: float, timeout_s: float = 30.0, **labels: str
    ) -> None:
        """Until the sample is ``value``."""
        self._wait_metric(name, labels, lambda found: found == value, f"== {value}", timeout_s)

    def _wait_metric(
        self,
        name: str,
        labels: dict[str, str],
        good: Callable[[float], bool],
        wanted: str,
        timeout_s: float,
    ) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if good(self.metric(name, **labels)):
                return
            time.sleep(POLL_S)
        raise ServiceError(
            f"{name}{labels} is {self.metric(name, **labels)}, not {wanted}:\n{self.log()}"
        )

    # -- the log ------------------------------------------------------------------------------

    def log(self, tail: int = 6000) -> str:
        """The last ``tail`` characters of the log (all lives)."""
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-tail:]

    def records(self, event: str | None = None) -> list[dict[str, Any]]:
        """The JSON log records of all lives, optionally only one event's."""
        if not self.log_path.exists():
            return []
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and (event is None or record.get("event") == event):
                found.append(record)
        return found


def parse_samples(text: str) -> dict[str, float]:
    """Prometheus text exposition: each sample's value by its name with labels as printed."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                samples[key] = float(value)
    return samples


def metrics_service(command: str, settings: Mapping[str, str], log_path: Path) -> ServiceProcess:
    """``ingest``, ``alerts`` or ``notify``: JSON logs, /readyz, /healthz and /metrics on a free
    port of 127.0.0.1 (a new one at each start); ``settings`` come last."""
    defaults = {"PUMPWATCH_METRICS_HOST": "127.0.0.1", "PUMPWATCH_LOG_FORMAT": "json"}
    return ServiceProcess(command, defaults | dict(settings), log_path, port_setting=METRICS_PORT)


def api_service(settings: Mapping[str, str], log_path: Path) -> ServiceProcess:
    """``pumpwatch api`` on 127.0.0.1 and a free port (chosen once), JSON logs; ``settings``
    come last."""
    port = free_port()
    return ServiceProcess(
        "api",
        {"PUMPWATCH_LOG_FORMAT": "json", **settings},
        log_path,
        args=("--host", "127.0.0.1", "--port", str(port)),
        port=port,
    )
