"""``pumpwatch alerts`` as a real process beside ``pumpwatch ingest``: it reacts to new data
within a second, catches up after downtime, and two instances raise each alert once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from lab.embedded import EmbeddedBroker
from tests.support import IngestProcess, alerts_process, encode, fetch, fetchval, telemetry
from tests.test_ingest import publish


@pytest.fixture
def ingest(database_url: str, broker: EmbeddedBroker, tmp_path: Path) -> Iterator[IngestProcess]:
    process = IngestProcess(database_url, broker, tmp_path / "ingest.log")
    process.start()
    yield process
    process.stop_quietly()


def stalled(serial: str) -> tuple[str, bytes]:
    """A reading with the motor stalled (flow stopped, high priority)."""
    message = telemetry(
        serial=serial, alarms=["motor_stall"], recorded_at=datetime.now(UTC) - timedelta(seconds=5)
    )
    return f"pumps/{serial}/telemetry", encode(message)


async def wait_for_alerts(database_url: str, rule: str, count: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    query = "SELECT count(*) FROM alerts WHERE rule = $1"
    while (found := await fetchval(database_url, query, rule)) < count:
        assert time.monotonic() < deadline, f"{found} {rule} alerts of {count}"
        await asyncio.sleep(0.05)


async def test_new_data_raises_an_alert_within_a_second_of_its_commit(
    ingest: IngestProcess, database_url: str, broker: EmbeddedBroker, tmp_path: Path
) -> None:
    alerts = alerts_process(database_url, broker, tmp_path / "alerts.log")
    try:
        alerts.start()
        publish(broker, [stalled("NGP100001A")])
        await wait_for_alerts(database_url, "flow_stopped", 1)
        [row] = await fetch(
            database_url,
            "SELECT a.priority, a.opened_at - s.updated_at AS delay FROM alerts a "
            "JOIN pump_state s USING (serial)",
        )
        assert row["priority"] == "high"
        assert row["delay"] < timedelta(seconds=1)  # commit to alert
        alerts.wait_metric("pumpwatch_alerts_latency_seconds_count", 1)
        assert alerts.metric("pumpwatch_alerts_latency_seconds_bucket", le="1.0") == 1
        outbox = await fetchval(database_url, "SELECT count(*) FROM outbox")
        assert outbox == 1
        assert alerts.terminate() == 0
    finally:
        alerts.stop_quietly()


async def test_an_alert_service_that_was_down_catches_up_when_it_starts(
    ingest: IngestProcess, database_url: str, broker: EmbeddedBroker, tmp_path: Path
) -> None:
    publish(broker, [stalled(f"NGP20000{i}A") for i in range(5)])
    assert await fetchval(database_url, "SELECT count(*) FROM alerts") == 0
    alerts = alerts_process(database_url, broker, tmp_path / "alerts.log")
    try:
        alerts.start()
        await wait_for_alerts(database_url, "flow_stopped", 5)
    finally:
        alerts.stop_quietly()


async def test_two_alert_services_raise_each_alert_once(
    ingest: IngestProcess, database_url: str, broker: EmbeddedBroker, tmp_path: Path
) -> None:
    first = alerts_process(database_url, broker, tmp_path / "a1.log")
    second = alerts_process(database_url, broker, tmp_path / "a2.log")
    try:
        first.start()
        second.start()
        serials = [f"NGP3{i:05d}B" for i in range(40)]
        publish(broker, [stalled(s) for s in serials])
        await wait_for_alerts(database_url, "flow_stopped", len(serials))
        # Both instances evaluated; let them finish, then count what was recorded.
        for service in (first, second):
            service.wait_metric("pumpwatch_alerts_evaluations_total", len(serials))
        assert await fetchval(database_url, "SELECT count(*) FROM alerts") == len(serials)
        opened = await fetchval(
            database_url, "SELECT count(*) FROM alert_history WHERE action = 'opened'"
        )
        assert opened == len(serials)
        assert await fetchval(database_url, "SELECT count(*) FROM outbox") == len(serials)
    finally:
        first.stop_quietly()
        second.stop_quietly()


async def test_the_service_keeps_the_read_model_as_ingest_stores_readings(
    ingest: IngestProcess, database_url: str, broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """Issue 20: a pump ingest creates has a stale row at once (the worklist computes it); the
    alert service, woken by ingest, writes it; a newer reading moves it."""
    serial = "NGP300001A"

    async def row() -> Any:
        found = await fetch(
            database_url,
            "SELECT evaluated_version = version AS fresh, volume_ml, deadline_at "
            "FROM pump_forecasts WHERE serial = $1",
            serial,
        )
        return found[0] if found else None

    async def until(check: Callable[[Any], bool], timeout_s: float = 30) -> Any:
        deadline = time.monotonic() + timeout_s
        while not check(found := await row()):
            assert time.monotonic() < deadline, found
            await asyncio.sleep(0.05)
        return found

    now = datetime.now(UTC)
    publish(broker, [(f"pumps/{serial}/telemetry", encode(telemetry(
        serial=serial, seq=1, volume_ml=20.0, recorded_at=now - timedelta(minutes=10)
    )))])  # fmt: skip
    assert not (await until(lambda r: r is not None))["fresh"]  # ingest made the pump
    alerts = alerts_process(database_url, broker, tmp_path / "alerts.log")
    try:
        alerts.start()
        first = await until(lambda r: r["fresh"] and r["volume_ml"] == 20.0)
        publish(broker, [(f"pumps/{serial}/telemetry", encode(telemetry(
            serial=serial, seq=2, volume_ml=10.0, recorded_at=now - timedelta(minutes=1)
        )))])  # fmt: skip
        second = await until(lambda r: r["fresh"] and r["volume_ml"] == 10.0)
        assert second["deadline_at"] < first["deadline_at"] - timedelta(days=30)
    finally:
        alerts.stop_quietly()
