"""Ingest against a real broker and a real PostgreSQL, run as the real command line."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from lab.embedded import EmbeddedBroker
from lab.sim.fleet import Outgoing
from lab.sim.publisher import publish_all
from services.api.sql import FLEET
from services.settings import parse_mqtt_url
from tests.support import (
    IngestProcess,
    encode,
    fetch,
    fetchval,
    refill_event,
    telemetry,
    wait_for_count,
)


def publish(broker: EmbeddedBroker, items: list[tuple[str, bytes]]) -> None:
    """Publish hand-made (topic, payload) pairs with QoS 1; returns once the broker has them."""
    now = datetime.now(UTC)
    messages = [
        Outgoing(
            topic=topic,
            payload=payload,
            kind="events" if topic.endswith("/events") else "telemetry",
            msg_id=None,
            serial=topic.split("/")[-2],
            valid=True,
            at=now,
        )
        for topic, payload in items
    ]
    report = publish_all(
        parse_mqtt_url(broker.url),
        messages,
        client_id=f"test-pub-{uuid.uuid4().hex[:8]}",
        protocol="5" if broker.supports_mqtt5 else "3.1.1",
    )
    assert report.published == len(messages)


@pytest.fixture
def ingest(database_url: str, broker: EmbeddedBroker, tmp_path: Path) -> Iterator[IngestProcess]:
    process = IngestProcess(database_url, broker, tmp_path / "ingest.log")
    yield process
    process.stop_quietly()


TOPIC = "pumps/NGP204519H/telemetry"


async def test_message_published_three_times_is_stored_once(
    ingest: IngestProcess, broker: EmbeddedBroker, database_url: str
) -> None:
    ingest.start()
    payload = encode(telemetry(seq=1))
    publish(broker, [(TOPIC, payload)] * 3)
    ingest.wait_metric("pumpwatch_ingest_messages_received_total", 3, kind="telemetry")
    ingest.wait_metric("pumpwatch_ingest_messages_duplicate_total", 2)
    assert ingest.metric("pumpwatch_ingest_messages_duplicate_total") == 2
    assert ingest.metric("pumpwatch_ingest_messages_stored_total", kind="telemetry") == 1
    assert await fetchval(database_url, "SELECT count(*) FROM readings") == 1
    assert await fetchval(database_url, "SELECT count(*) FROM ingested_messages") == 1
    stored = await fetchval(database_url, "SELECT payload FROM readings")
    assert json.loads(stored) == json.loads(payload)


async def test_messages_sent_again_after_they_were_stored_are_the_ledgers_duplicates(
    ingest: IngestProcess, broker: EmbeddedBroker, database_url: str
) -> None:
    """Duplicates across batches are found by the ledger (in one batch, by the judge): counted
    as duplicates, never stored or counted as stored again."""
    ingest.start()
    reading = encode(telemetry(seq=1))
    event = encode(refill_event(serial="NGP204519H"))
    first = [(TOPIC, reading), ("pumps/NGP204519H/events", event)]
    publish(broker, first)
    ingest.wait_metric("pumpwatch_ingest_messages_stored_total", 1, kind="telemetry")
    ingest.wait_metric("pumpwatch_ingest_messages_stored_total", 1, kind="events")
    publish(broker, first)
    ingest.wait_metric("pumpwatch_ingest_messages_duplicate_total", 2)
    publish(broker, [(TOPIC, encode(telemetry(seq=2)))])  # a new one after them
    ingest.wait_metric("pumpwatch_ingest_messages_stored_total", 2, kind="telemetry")
    assert ingest.metric("pumpwatch_ingest_messages_duplicate_total") == 2
    assert ingest.metric("pumpwatch_ingest_messages_stored_total", kind="telemetry") == 2
    assert ingest.metric("pumpwatch_ingest_messages_stored_total", kind="events") == 1
    assert await fetchval(database_url, "SELECT count(*) FROM readings") == 2
    assert await fetchval(database_url, "SELECT count(*) FROM events") == 1


async def test_out_of_order_readings_keep_the_newest_state(
    ingest: IngestProcess, broker: EmbeddedBroker, database_url: str
) -> None:
    ingest.start()
    now = datetime.now(UTC)
    newest = telemetry(seq=5, recorded_at=now - timedelta(minutes=1), volume_ml=10.0)
    older = telemetry(seq=4, recorded_at=now - timedelta(minutes=20), volume_ml=11.0)
    oldest = telemetry(seq=3, recorded_at=now - timedelta(hours=2), volume_ml=12.0)
    publish(broker, [(TOPIC, encode(newest))])
    await wait_for_count(database_url, "SELECT count(*) FROM readings", 1)
    publish(broker, [(TOPIC, encode(older)), (TOPIC, encode(oldest))])
    assert await wait_for_count(database_url, "SELECT count(*) FROM readings", 3) == 3
    state = (await fetch(database_url, "SELECT msg_id, volume_ml FROM pump_state"))[0]
    assert str(state["msg_id"]) == newest["msg_id"]
    assert state["volume_ml"] == 10.0


async def test_the_pumps_firmware_is_that_of_its_newest_readings_source(
    ingest: IngestProcess, broker: EmbeddedBroker, database_url: str
) -> None:
    """pump_state keeps the firmware its newest reading came through: the fleet page and
    Grafana's pump_status read it there (a late reading does not change it)."""
    ingest.start()
    now = datetime.now(UTC)

    def reading(seq: int, minutes_ago: int, firmware: str | None) -> tuple[str, bytes]:
        message = telemetry(seq=seq, recorded_at=now - timedelta(minutes=minutes_ago))
        if firmware is None:
            del message["source"]["firmware"]
        else:
            message["source"]["firmware"] = firmware
        return TOPIC, encode(message)

    async def shown() -> list[object]:
        state = await fetchval(database_url, "SELECT source_firmware FROM pump_state")
        fleet = await fetch(database_url, FLEET)
        grafana = await fetchval(database_url, "SELECT firmware FROM grafana.pump_status")
        return [state, *((r["firmware"], r["pumps"]) for r in fleet), grafana]

    publish(broker, [reading(5, 10, "2.5.0")])
    await wait_for_count(database_url, "SELECT count(*) FROM readings", 1)
    publish(broker, [reading(4, 30, "2.4.1")])  # late: recorded before the newest
    await wait_for_count(database_url, "SELECT count(*) FROM readings", 2)
    assert await shown() == ["2.5.0", ("2.5.0", 1), "2.5.0"]
    publish(broker, [reading(6, 1, None)])  # newer, its source naming no firmware
    await wait_for_count(database_url, "SELECT count(*) FROM readings", 3)
    assert await shown() == [None, ("unknown", 1), "unknown"]


async def test_unknown_serial_is_stored_and_the_pump_appears_unassigned(
    ingest: IngestProcess, broker: EmbeddedBroker, database_url: str
) -> None:
    ingest.start()
    publish(broker, [("pumps/NEW-PUMP-1/telemetry", encode(telemetry(serial="NEW-PUMP-1")))])
    await wait_for_count(database_url, "SELECT count(*) FROM readings", 1)
    pump = (await fetch(database_url, "SELECT serial, model, patient_id FROM pumps"))[0]
    assert pump["serial"] == "NEW-PUMP-1"
    assert pump["model"] == "SynchroMed II 8637-40"
    assert pump["patient_id"] is None


def quarantine_cases() -> list[tuple[str, bytes, str]]:
    """Built when the test runs: the clock-skew case is "10 minutes from now", which a list
    built at collection would no longer be once the suite has run for 5 minutes."""
    return [
        ("invalid_json", b'{"v": 1, "msg_id": ', "truncated"),
        ("invalid_json", b'{"v": 1, "x": NaN}', "JSON is malformed"),
        ("invalid_json", encode(telemetry())[:-1] + b', "serial": "X"}', "duplicate key 'serial'"),
        ("invalid_json", b'{"a": "\\u0000"}', "NUL"),
        ("invalid_json", b'{"a": "\xff\xfe"}', "UTF-8"),
        ("invalid_json", b'{"a": ' + b"[" * 40 + b"]" * 40 + b"}", "nesting deeper than 32"),
        (
            "schema",
            encode(telemetry(reservoir={"volume_ml": -1, "capacity_ml": 40})),
            "reservoir.volume_ml",
        ),
        ("schema", encode({k: v for k, v in telemetry().items() if k != "drug"}), "drug"),
        ("schema", b"[1, 2, 3]", "not an object"),
        ("serial_mismatch", encode(telemetry(serial="OTHER-1")), "OTHER-1"),
        (
            "clock_skew",
            encode(telemetry(recorded_at=datetime.now(UTC) + timedelta(minutes=10))),
            "recorded_at",
        ),
        ("too_old", encode(telemetry(recorded_at=datetime(1970, 1, 1, tzinfo=UTC))), "recorded_at"),
        (
            "inconsistent_dose",
            encode(
                telemetry(
                    infusion={"mode": "continuous", "rate_ml_per_day": 0.25, "daily_dose_mcg": 600}
                )
            ),
            "daily_dose_mcg",
        ),
        ("too_large", encode(telemetry(notes="x" * 70_000)), "limit 65536"),
    ]


async def test_each_quarantine_reason_is_stored_with_its_detail_and_good_messages_pass(
    ingest: IngestProcess, broker: EmbeddedBroker, database_url: str
) -> None:
    ingest.start()
    items: list[tuple[str, bytes]] = []
    cases_sent = quarantine_cases()
    for n, (_, payload, _) in enumerate(cases_sent):
        items.append((TOPIC, payload))
        items.append((TOPIC, encode(telemetry(seq=n))))  # each bad one has a good one behind it
    publish(broker, items)
    cases = len(cases_sent)
    assert await wait_for_count(database_url, "SELECT count(*) FROM quarantine", cases) == cases
    assert await wait_for_count(database_url, "SELECT count(*) FROM readings", cases) == cases
    rows = await fetch(database_url, "SELECT reason, detail, topic, payload FROM quarantine")
    for reason, payload, needle in cases_sent:
        match = [r for r in rows if bytes(r["payload"]) == payload[:65536]]
        assert len(match) == 1, f"no quarantine row for a {reason} case"
        assert match[0]["reason"] == reason
        assert match[0]["topic"] == TOPIC
        assert needle in match[0]["detail"], (reason, match[0]["detail"])
    for reason in {c[0] for c in cases_sent}:
        count = sum(1 for c in cases_sent if c[0] == reason)
        assert ingest.metric("pumpwatch_ingest_messages_quarantined_total", reason=reason) == count


async def test_a_message_on_a_topic_outside_the_contract_is_quarantined(
    database_url: str, broker: EmbeddedBroker, tmp_path: Path
) -> None:
    process = IngestProcess(
        database_url,
        broker,
        tmp_path / "ingest.log",
        extra_env={"PUMPWATCH_MQTT_TOPIC_PREFIX": "site-a"},
    )
    process.start()
    try:
        publish(
            broker,
            [
                ("site-a/pumps/AB/telemetry", encode(telemetry(serial="AB"))),
                ("site-a/pumps/NGP204519H/telemetry", encode(telemetry())),
            ],
        )
        await wait_for_count(database_url, "SELECT count(*) FROM readings", 1)
        rows = await fetch(database_url, "SELECT reason, detail FROM quarantine")
        assert [r["reason"] for r in rows] == ["bad_topic"]
        assert "'AB'" in rows[0]["detail"]
    finally:
        process.stop_quietly()


async def test_sequence_gap_is_recorded_and_a_late_arrival_narrows_it(
    ingest: IngestProcess, broker: EmbeddedBroker, database_url: str
) -> None:
    ingest.extra_env["PUMPWATCH_INGEST_GAUGE_INTERVAL_S"] = "0.2"
    ingest.start()
    publish(broker, [(TOPIC, encode(telemetry(seq=s))) for s in (10, 11)])
    await wait_for_count(database_url, "SELECT count(*) FROM readings", 2)
    publish(broker, [(TOPIC, encode(telemetry(seq=16)))])
    await wait_for_count(database_url, "SELECT count(*) FROM sequence_gaps", 1)
    gaps = await fetch(
        database_url, "SELECT serial, source_id, first_missing, last_missing FROM sequence_gaps"
    )
    assert [tuple(g) for g in gaps] == [("NGP204519H", "HUB-7731", 12, 15)]
    assert ingest.metric("pumpwatch_ingest_sequence_missing_messages_total") == 4
    publish(broker, [(TOPIC, encode(telemetry(seq=13)))])
    await wait_for_count(database_url, "SELECT count(*) FROM sequence_gaps", 2)
    gaps = await fetch(
        database_url, "SELECT first_missing, last_missing FROM sequence_gaps ORDER BY first_missing"
    )
    assert [tuple(g) for g in gaps] == [(12, 12), (14, 15)]
    # Another source for the same pump has a sequence of its own.
    other = telemetry(seq=500, source_id="HUB-OTHER")
    publish(broker, [(TOPIC, encode(other))])
    await wait_for_count(database_url, "SELECT count(*) FROM readings", 5)
    assert await fetchval(database_url, "SELECT count(*) FROM sequence_gaps") == 2
    assert ingest.metric("pumpwatch_ingest_sequence_late_messages_total") == 1
    ingest.wait_metric_equal("pumpwatch_ingest_sequence_missing_open_messages", 3)
    assert ingest.metric("pumpwatch_ingest_sequence_gaps_open") == 2


async def test_events_are_stored_with_their_body(
    ingest: IngestProcess, broker: EmbeddedBroker, database_url: str
) -> None:
    ingest.start()
    event = refill_event(serial="NGP204519H")
    publish(broker, [("pumps/NGP204519H/events", encode(event))] * 2)
    await wait_for_count(database_url, "SELECT count(*) FROM events", 1)
    ingest.wait_metric("pumpwatch_ingest_messages_duplicate_total", 1)
    row = (await fetch(database_url, "SELECT type, body, payload FROM events"))[0]
    assert row["type"] == "refill"
    assert json.loads(row["body"])["residual_ml"] == 2.4
    assert json.loads(row["payload"]) == event


async def test_commit_notifies_the_alert_service_with_the_changed_pumps(
    ingest: IngestProcess, broker: EmbeddedBroker, database_url: str
) -> None:
    ingest.start()
    received: asyncio.Queue[str] = asyncio.Queue()
    conn = await asyncpg.connect(database_url)
    try:
        await conn.add_listener("pumpwatch_ingest", lambda *args: received.put_nowait(args[3]))
        publish(broker, [("pumps/PUMP-A1/telemetry", encode(telemetry(serial="PUMP-A1")))])
        payload = json.loads(await asyncio.wait_for(received.get(), 10))
        assert payload == {"serials": ["PUMP-A1"]}
        stored = await conn.fetchval("SELECT count(*) FROM readings WHERE serial = 'PUMP-A1'")
        assert stored == 1  # the notification comes after the commit
    finally:
        await conn.close()
