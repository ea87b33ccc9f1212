"""Test helpers: message factories, the ingest, alerts and notify services as real processes
(lab.processes), database reads."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from lab.embedded import EmbeddedBroker
from lab.processes import METRICS_PORT, ServiceProcess


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


class IngestProcess(ServiceProcess):
    """``pumpwatch ingest`` (or ``command``) as a child process on a test's database and broker,
    configured through the environment; /readyz, /healthz and /metrics on a free metrics port
    (a new one at each start)."""

    def __init__(
        self,
        database_url: str,
        broker: EmbeddedBroker,
        log_path: Path,
        *,
        client_id: str | None = None,
        extra_env: dict[str, str] | None = None,
        command: str = "ingest",
    ) -> None:
        self.client_id = client_id or f"ingest-test-{uuid.uuid4().hex[:8]}"
        settings = {
            "PUMPWATCH_DATABASE_URL": database_url,
            "PUMPWATCH_MQTT_URL": broker.url,
            "PUMPWATCH_MQTT_CLIENT_ID": self.client_id,
            "PUMPWATCH_METRICS_HOST": "127.0.0.1",
            "PUMPWATCH_LOG_FORMAT": "json",
        }
        if not broker.supports_mqtt5:
            settings.update(PUMPWATCH_MQTT_PROTOCOL="3.1.1", PUMPWATCH_MQTT_SHARE_GROUP="")
        settings.update(extra_env or {})
        super().__init__(command, settings, log_path, port_setting=METRICS_PORT)

    @property
    def extra_env(self) -> dict[str, str]:
        """The settings; a test may change them before the next start."""
        return self.settings

    @property
    def metrics_port(self) -> int:
        return self.port

    def env(self) -> dict[str, str]:
        """The environment the process gets (with the port of the last start)."""
        return self.environment()

    def stop_quietly(self) -> None:
        """Clean-up: SIGKILL if still running."""
        self.kill()


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
