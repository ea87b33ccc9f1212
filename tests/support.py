"""Test helpers: message factories, the ingest service as a real process, database reads."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from lab.embedded import EmbeddedBroker, free_port


def telemetry(
    *,
    serial: str = "NGP204519H",
    msg_id: str | None = None,
    seq: int | None = 0,
    recorded_at: datetime | None = None,
    volume_ml: float = 17.42,
    source_id: str = "HUB-7731",
    **overrides: Any,
) -> dict[str, Any]:
    """A valid telemetry message; keyword overrides replace top-level fields."""
    message: dict[str, Any] = {
        "v": 1,
        "msg_id": msg_id or str(uuid.uuid4()),
        "serial": serial,
        "recorded_at": (recorded_at or datetime.now(UTC) - timedelta(minutes=1)).isoformat(),
        "source": {"kind": "home_hub", "id": source_id, "firmware": "2.4.1"},
        "model": "SynchroMed II 8637-40",
        "reservoir": {
            "volume_ml": volume_ml,
            "capacity_ml": 40,
            "low_alarm_ml": 2.0,
            "basis": "calculated",
        },
        "drug": {"name": "baclofen", "concentration_mcg_per_ml": 2000},
        "infusion": {"mode": "continuous", "rate_ml_per_day": 0.25, "daily_dose_mcg": 500},
        "flow": {"measured_ml_per_day": 0.248},
        "battery": {"remaining_pct": 71, "status": "ok"},
        "alarms": [],
    }
    if seq is not None:
        message["seq"] = seq
    message.update(overrides)
    return message


def refill_event(
    *,
    serial: str = "NGP204519H",
    msg_id: str | None = None,
    seq: int | None = 0,
    recorded_at: datetime | None = None,
) -> dict[str, Any]:
    message: dict[str, Any] = {
        "v": 1,
        "msg_id": msg_id or str(uuid.uuid4()),
        "serial": serial,
        "recorded_at": (recorded_at or datetime.now(UTC) - timedelta(minutes=1)).isoformat(),
        "source": {"kind": "clinician_programmer", "id": "CP-12", "firmware": "5.1"},
        "type": "refill",
        "refill": {
            "residual_ml": 2.4,
            "added_ml": 38,
            "drug": "baclofen",
            "concentration_mcg_per_ml": 2000,
            "expected_residual_ml": 2.6,
        },
    }
    if seq is not None:
        message["seq"] = seq
    return message


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode()


@dataclass
class IngestProcess:
    """``pumpwatch ingest`` as a child process, configured through the environment."""

    database_url: str
    broker: EmbeddedBroker
    log_path: Path
    client_id: str = field(default_factory=lambda: f"ingest-test-{uuid.uuid4().hex[:8]}")
    extra_env: dict[str, str] = field(default_factory=dict)
    metrics_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    command: str = "ingest"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            PUMPWATCH_DATABASE_URL=self.database_url,
            PUMPWATCH_MQTT_URL=self.broker.url,
            PUMPWATCH_MQTT_CLIENT_ID=self.client_id,
            PUMPWATCH_METRICS_PORT=str(self.metrics_port),
            PUMPWATCH_METRICS_HOST="127.0.0.1",
            PUMPWATCH_LOG_FORMAT="json",
        )
        if not self.broker.supports_mqtt5:
            env.update(PUMPWATCH_MQTT_PROTOCOL="3.1.1", PUMPWATCH_MQTT_SHARE_GROUP="")
        env.update(self.extra_env)
        return env

    def start(self, *, wait_ready: bool = True) -> IngestProcess:
        self.metrics_port = free_port()
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services", self.command],
            env=self.env(),
            stdout=log,
            stderr=log,
        )
        log.close()
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.command} exited with {self.proc.returncode}:\n{self.log()}"
                )
            status, _ = self.get("/readyz")
            if status == 200:
                return
            time.sleep(0.05)
        raise AssertionError(f"{self.command} not ready after {timeout_s} s:\n{self.log()}")

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.metrics_port}{path}", timeout=2
            ) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError:
            return 0, ""

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample on /metrics (0 when absent); fails if /metrics does not
        answer, so that a missed scrape is never read as a zero."""
        status, text = self.get("/metrics")
        if status != 200:
            raise AssertionError(f"/metrics answered {status}:\n{self.log()}")
        wanted = name + (
            "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""
        )
        for line in text.splitlines():
            if line.startswith(wanted + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def wait_metric(self, name: str, value: float, timeout_s: float = 30.0, **labels: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.metric(name, **labels) >= value:
                return
            time.sleep(0.05)
        raise AssertionError(
            f"{name}{labels} stayed at {self.metric(name, **labels)} < {value}:\n{self.log()}"
        )

    def wait_metric_equal(
        self, name: str, value: float, timeout_s: float = 30.0, **labels: str
    ) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.metric(name, **labels) == value:
                return
            time.sleep(0.05)
        raise AssertionError(f"{name}{labels} is {self.metric(name, **labels)}, not {value}")

    def terminate(self, timeout_s: float = 60.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop_quietly(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path.exists() else ""


def alerts_process(
    database_url: str, broker: EmbeddedBroker, log_path: Path, **env: str
) -> IngestProcess:
    """``pumpwatch alerts`` as a child process (same handling as ingest's)."""
    return IngestProcess(database_url, broker, log_path, extra_env=env, command="alerts")


def notify_process(
    database_url: str, broker: EmbeddedBroker, log_path: Path, **env: str
) -> IngestProcess:
    """``pumpwatch notify`` as a child process (same handling as ingest's)."""
    return IngestProcess(database_url, broker, log_path, extra_env=env, command="notify")


async def fetch(url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(query, *args)
    finally:
        await conn.close()


async def fetchval(url: str, query: str, *args: Any) -> Any:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(query, *args)
    finally:
        await conn.close()


async def wait_for_count(url: str, query: str, expected: int, timeout_s: float = 60.0) -> int:
    """Poll a COUNT query until it reaches ``expected``; returns the last count."""
    deadline = time.monotonic() + timeout_s
    count = -1
    while time.monotonic() < deadline:
        count = int(await fetchval(url, query))
        if count >= expected:
            return count
        await asyncio.sleep(0.1)
    return count
