"""Hourly rollups: ingest adds each new reading to its hour exactly once (duplicates and late,
out-of-order readings included), and the API serves the dashboard series and ``bucket=1h``
telemetry from them."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from lab.embedded import EmbeddedBroker
from tests import alert_fixtures as fx
from tests.api_support import running_api
from tests.support import IngestProcess, encode, fetch, telemetry
from tests.test_ingest import publish

SERIAL = "NGPROLL01"
TOPIC = f"pumps/{SERIAL}/telemetry"


@pytest.fixture
def ingest(database_url: str, broker: EmbeddedBroker, tmp_path: Path) -> Iterator[IngestProcess]:
    process = IngestProcess(database_url, broker, tmp_path / "ingest.log")
    yield process
    process.stop_quietly()


async def test_rollups_match_the_readings_exactly_once(
    ingest: IngestProcess, broker: EmbeddedBroker, database_url: str
) -> None:
    ingest.start()
    start = (datetime.now(UTC) - timedelta(hours=30)).replace(minute=0, second=0, microsecond=0)
    rng = random.Random(5)
    messages = [
        telemetry(
            serial=SERIAL,
            seq=i,
            recorded_at=start + timedelta(minutes=7 * i),
            volume_ml=round(30 - i * 0.01 + rng.uniform(-0.05, 0.05), 3),
            flow={"measured_ml_per_day": round(rng.uniform(0.2, 0.3), 4)} if i % 3 else None,
        )
        for i in range(240)  # 28 hours, about 8.6 readings an hour
    ]
    for m in messages:
        if m["flow"] is None:
            del m["flow"]
    payloads = [encode(m) for m in messages]
    shuffled = payloads + payloads[::5]  # every fifth one twice
    rng.shuffle(shuffled)
    publish(broker, [(TOPIC, p) for p in shuffled])
    ingest.wait_metric("pumpwatch_ingest_messages_stored_total", 240, kind="telemetry")

    expected = await fetch(
        database_url,
        """SELECT date_trunc('hour', recorded_at) AS hour, count(*) AS n, avg(volume_ml) AS avg,
                  min(volume_ml) AS min, max(volume_ml) AS max,
                  (array_agg(volume_ml ORDER BY recorded_at DESC))[1] AS last,
                  count(measured_flow_ml_per_day) AS flows, avg(measured_flow_ml_per_day) AS flow
           FROM readings GROUP BY 1 ORDER BY 1""",
    )
    rolled = await fetch(
        database_url,
        """SELECT hour, readings AS n, volume_ml_sum / readings AS avg, volume_ml_min AS min,
                  volume_ml_max AS max, last_volume_ml AS last, flow_readings AS flows,
                  CASE WHEN flow_readings > 0 THEN flow_ml_per_day_sum / flow_readings END AS flow
           FROM readings_hourly WHERE serial = $1 ORDER BY hour""",
        SERIAL,
    )
    assert len(rolled) == len(expected) == 28
    for want, got in zip(expected, rolled, strict=True):
        assert got["hour"] == want["hour"]
        assert (got["n"], got["flows"], got["min"], got["max"], got["last"]) == (
            want["n"],
            want["flows"],
            want["min"],
            want["max"],
            want["last"],
        )
        assert got["avg"] == pytest.approx(want["avg"], rel=1e-12)
        assert got["flow"] == pytest.approx(want["flow"], rel=1e-12)

    async with running_api(database_url) as api:
        conn = await api.conn()
        try:
            clinic = await fx.clinic(conn)
            patient = await fx.patient(conn, clinic)
            await conn.execute(
                "UPDATE pumps SET patient_id = $1 WHERE serial = $2",
                uuid.UUID(patient),
                SERIAL,
            )
        finally:
            await conn.close()
        key = await api.key("clinician", clinic)
        buckets = await api.call(
            "GET", f"/v1/pumps/{SERIAL}/telemetry", key, params={"bucket": "1h", "limit": 500}
        )
        assert buckets.status_code == 200
        items = buckets.json()["items"]
        assert [b["readings"] for b in items] == [r["n"] for r in reversed(expected)]
        assert items[0]["volume_ml"] == pytest.approx(expected[-1]["avg"])
        board = await api.call("GET", f"/v1/patients/{patient}/dashboard", key)
        actual = board.json()["series"]["actual"]
        assert len(actual) == 28
        assert actual[0]["volume_ml"] == pytest.approx(round(expected[0]["avg"], 3))
