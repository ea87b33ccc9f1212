"""Scaling ingest down without stranding messages: ``pumpwatch ingest --retire``.

Mosquitto keeps routing a share of a shared subscription to a member whose persistent session
is offline; those messages wait there until the session expires (a week by default) and are
then lost. Retiring the instance stores them and ends the session.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from lab.embedded import EmbeddedBroker
from lab.sim.fleet import Fleet
from tests.support import IngestProcess, fetchval
from tests.test_ingest import publish

COUNT_STORED = "SELECT count(*) FROM ingested_messages"  # readings and events


async def _settled_count(url: str, quiet_s: float = 1.5, timeout_s: float = 30.0) -> int:
    """The stored count once it has not changed for ``quiet_s``."""
    deadline = time.monotonic() + timeout_s
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        count = int(await fetchval(url, COUNT_STORED))
        if count != last:
            last, since = count, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return count
        await asyncio.sleep(0.1)
    raise AssertionError(f"the stored count kept changing: {last}")


def _received(process: IngestProcess) -> float:
    return sum(
        process.metric("pumpwatch_ingest_messages_received_total", kind=kind)
        for kind in ("telemetry", "events", "unknown")
    )


async def test_retiring_an_instance_stores_its_stranded_share_and_ends_its_session(
    mqtt5_broker: EmbeddedBroker, database_url: str, tmp_path: Path
) -> None:
    fleet = Fleet(pumps=40, seed=31, start=datetime.now(UTC) - timedelta(days=30))
    first, later = fleet.take(2000), fleet.take(500)
    shared = {"PUMPWATCH_MQTT_SHARE_GROUP": "pumpwatch-ingest"}
    leaving = IngestProcess(
        database_url, mqtt5_broker, tmp_path / "a.log", client_id="ingest-a", extra_env=shared
    )
    staying = IngestProcess(
        database_url, mqtt5_broker, tmp_path / "b.log", client_id="ingest-b", extra_env=shared
    )
    try:
        leaving.start()
        staying.start()
        assert leaving.terminate() == 0  # its persistent session stays in the share group

        publish(mqtt5_broker, [(m.topic, m.payload) for m in first])
        stranded = len(first) - await _settled_count(database_url)
        assert stranded > 0, "the broker did not route any messages to the offline session"

        retiring = subprocess.run(  # noqa: ASYNC221 - the test waits for the command, on purpose
            [sys.executable, "-m", "services", "ingest", "--retire"],
            env=leaving.env() | {"PUMPWATCH_INGEST_RETIRE_IDLE_S": "1"},
            capture_output=True,
            timeout=120,
            check=False,
        )
        log = retiring.stderr.decode()
        assert retiring.returncode == 0, log
        assert "session_retired" in log
        assert await fetchval(database_url, COUNT_STORED) == len(first)
        stored = "SELECT (SELECT count(*) FROM readings) + (SELECT count(*) FROM events)"
        assert await fetchval(database_url, stored) == len(first)

        received_before = _received(staying)
        publish(mqtt5_broker, [(m.topic, m.payload) for m in later])
        total = len(first) + len(later)
        assert await _settled_count(database_url) == total  # nothing goes to the old session
        assert _received(staying) - received_before == len(later)
    finally:
        leaving.stop_quietly()
        staying.stop_quietly()
