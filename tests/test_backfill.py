"""Backfill (MQTT contract 1.1) end to end: ``pumpwatch ingest`` as the real command line, a
real mosquitto, a real PostgreSQL, and the simulator's devices (lab.sim.resend) answering
``resend`` from what they hold. Conditions are waited for with generous deadlines."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from lab.embedded import EmbeddedBroker
from lab.sim.outgoing import Outgoing
from lab.sim.publisher import publish_all
from lab.sim.resend import DeviceBuffers, ResendResponder
from services.domain.alerting import RuleSettings
from services.domain.rules import evaluate
from services.settings import parse_mqtt_url
from services.storage import snapshots
from tests.support import IngestProcess, encode, fetch, fetchval, telemetry

SERIAL = "NGP204519H"
DEADLINE_S = 90.0

# Quick rounds and a short settle time; one request per gap unless a test says otherwise.
FAST = {
    "PUMPWATCH_BACKFILL_SETTLE_S": "0.3",
    "PUMPWATCH_BACKFILL_POLL_INTERVAL_S": "0.2",
    "PUMPWATCH_BACKFILL_RETRY_INITIAL_S": "600",
    "PUMPWATCH_BACKFILL_GIVE_UP_AFTER_S": "3600",
    "PUMPWATCH_INGEST_GAUGE_INTERVAL_S": "0.2",
}


def stream(
    count: int, *, serial: str = SERIAL, source_id: str = "HUB-7731", start: int = 0
) -> list[Outgoing]:
    """``count`` readings of one source, seq from ``start``, 15 minutes apart, ending now."""
    now = datetime.now(UTC).replace(microsecond=0)
    out = []
    for i in range(count):
        at = now - timedelta(minutes=15 * (count - i))
        doc = telemetry(serial=serial, seq=start + i, recorded_at=at, source_id=source_id)
        out.append(
            Outgoing(
                topic=f"pumps/{serial}/telemetry",
                payload=encode(doc),
                kind="telemetry",
                msg_id=doc["msg_id"],
                serial=serial,
                valid=True,
                at=at,
            )
        )
    return out


def seq_of(message: Outgoing) -> int:
    value: int = json.loads(message.payload)["seq"]
    return value


def publish(broker: EmbeddedBroker, messages: list[Outgoing]) -> None:
    report = publish_all(
        parse_mqtt_url(broker.url), messages, client_id=f"test-dev-{uuid.uuid4().hex[:8]}"
    )
    assert report.published == len(messages)


def devices(broker: EmbeddedBroker, held: list[Outgoing], **options: Any) -> ResendResponder:
    return ResendResponder(parse_mqtt_url(broker.url), DeviceBuffers(held), **options)


async def wait_for(
    what: str, probe: Callable[[], Any], timeout_s: float = DEADLINE_S, every_s: float = 0.1
) -> Any:
    """Poll an async ``probe`` until it returns something true; return it."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = await probe()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what} (last: {found!r})")
        await asyncio.sleep(every_s)


async def gaps(url: str) -> list[tuple[str, str, int, int, str]]:
    rows = await fetch(
        url,
        "SELECT serial, source_id, first_missing, last_missing, state FROM sequence_gaps "
        "ORDER BY serial, source_id, first_missing",
    )
    return [(r[0], r[1], r[2], r[3], r[4]) for r in rows]


async def stored_seqs(url: str, serial: str = SERIAL, source_id: str = "HUB-7731") -> list[int]:
    rows = await fetch(
        url,
        "SELECT seq FROM readings WHERE serial = $1 AND source_id = $2 ORDER BY seq",
        serial,
        source_id,
    )
    return [r["seq"] for r in rows]


def count_is(url: str, query: str, expected: int) -> Callable[[], Any]:
    async def probe() -> bool:
        return int(await fetchval(url, query)) == expected

    return probe


@pytest.fixture
def ingest(
    database_url: str, mqtt5_broker: EmbeddedBroker, tmp_path: Path
) -> Iterator[IngestProcess]:
    process = IngestProcess(database_url, mqtt5_broker, tmp_path / "ingest.log", extra_env=FAST)
    yield process
    process.stop_quietly()


async def test_a_gap_in_the_middle_is_asked_for_once_and_filled(
    ingest: IngestProcess, mqtt5_broker: EmbeddedBroker, database_url: str
) -> None:
    ingest.start()
    sent = stream(12)
    lost = [m for m in sent if 4 <= seq_of(m) <= 6]
    with devices(mqtt5_broker, sent) as responder:
        publish(mqtt5_broker, [m for m in sent if m not in lost])
        await wait_for("the gap to be filled", lambda: _all_stored(database_url, 12))
        await wait_for("the gap row to go", _no_gaps(database_url))
        [request] = responder.requested()
    assert request.serial == SERIAL
    assert (request.command.source_id, request.command.from_seq, request.command.to_seq) == (
        "HUB-7731",
        4,
        6,
    )
    assert request.command.v == 1
    assert request.answered == 3
    assert await stored_seqs(database_url) == list(range(12))
    assert await fetchval(database_url, "SELECT count(*) FROM ingested_messages") == 12
    ingest.wait_metric_equal("pumpwatch_ingest_backfill_gaps_recovered_total", 1, requested="true")
    assert ingest.metric("pumpwatch_ingest_backfill_requests_total") == 1
    assert ingest.metric("pumpwatch_ingest_sequence_gaps_total") == 1
    assert ingest.metric("pumpwatch_ingest_backfill_recovery_seconds_count", requested="true") == 1
    ingest.wait_metric_equal("pumpwatch_ingest_sequence_gaps_open", 0)


async def test_a_gap_right_after_a_streams_first_message_is_recovered(
    ingest: IngestProcess, mqtt5_broker: EmbeddedBroker, database_url: str
) -> None:
    """The start of what pumpwatch knows of a source: message 0 arrives, 1-5 are lost, and the
    next ones come in the same batch as the first. (Numbers below the first one ever seen are
    not asked for: nothing says where a source started counting.)"""
    ingest.start()
    sent = stream(10)
    with devices(mqtt5_broker, sent) as responder:
        publish(mqtt5_broker, [m for m in sent if not 1 <= seq_of(m) <= 5])
        await wait_for("the gap to be filled", lambda: _all_stored(database_url, 10))
        await wait_for("the gap row to go", _no_gaps(database_url))
        commands = [(r.command.from_seq, r.command.to_seq) for r in responder.requested()]
    assert commands == [(1, 5)]
    assert await stored_seqs(database_url) == list(range(10))


async def test_several_sources_of_one_pump_are_each_asked_for_their_own_numbers(
    ingest: IngestProcess, mqtt5_broker: EmbeddedBroker, database_url: str
) -> None:
    ingest.start()
    hub = stream(10, source_id="HUB-7731")
    programmer = stream(10, source_id="PP-0042", start=100)
    sent = [*hub, *programmer]
    lost = {m.msg_id for m in hub if seq_of(m) in (3, 7)} | {
        m.msg_id for m in programmer if 104 <= seq_of(m) <= 105
    }
    with devices(mqtt5_broker, sent) as responder:
        publish(mqtt5_broker, [m for m in sent if m.msg_id not in lost])
        await wait_for("the gaps to be filled", lambda: _all_stored(database_url, 20))
        await wait_for("the gap rows to go", _no_gaps(database_url))
        commands = sorted(
            (r.command.source_id, r.command.from_seq, r.command.to_seq)
            for r in responder.requested()
        )
    assert commands == [("HUB-7731", 3, 3), ("HUB-7731", 7, 7), ("PP-0042", 104, 105)]
    assert await stored_seqs(database_url, source_id="PP-0042") == list(range(100, 110))


async def test_a_device_that_answers_twice_is_stored_once(
    ingest: IngestProcess, mqtt5_broker: EmbeddedBroker, database_url: str
) -> None:
    ingest.start()
    sent = stream(10)
    with devices(mqtt5_broker, sent, answers=2) as responder:
        publish(mqtt5_broker, [m for m in sent if not 2 <= seq_of(m) <= 4])
        await wait_for("the gap to be filled", lambda: _all_stored(database_url, 10))
        await wait_for("the gap row to go", _no_gaps(database_url))
        ingest.wait_metric("pumpwatch_ingest_messages_duplicate_total", 3, timeout_s=DEADLINE_S)
        assert responder.republished == 6
    assert await stored_seqs(database_url) == list(range(10))
    assert await fetchval(database_url, "SELECT count(*) FROM readings") == 10
    assert ingest.metric("pumpwatch_ingest_backfill_gaps_recovered_total", requested="true") == 1


async def test_a_device_that_never_answers_leaves_an_unrecoverable_gap_and_the_alert(
    ingest: IngestProcess, mqtt5_broker: EmbeddedBroker, database_url: str
) -> None:
    """The device lost its buffer: it is asked again with backoff, then the gap is given up
    on. Nothing is invented; only then does the snapshot show the gap and telemetry_gap fire."""
    ingest.extra_env.update(
        PUMPWATCH_BACKFILL_RETRY_INITIAL_S="0.5",
        PUMPWATCH_BACKFILL_RETRY_MAX_S="1",
        PUMPWATCH_BACKFILL_GIVE_UP_AFTER_S="6",
    )
    ingest.start()
    sent = stream(10)
    buffers = DeviceBuffers(sent)
    buffers.lose(SERIAL)
    with ResendResponder(parse_mqtt_url(mqtt5_broker.url), buffers) as responder:
        publish(mqtt5_broker, [m for m in sent if not 3 <= seq_of(m) <= 5])
        await wait_for("7 readings", count_is(database_url, "SELECT count(*) FROM readings", 7))
        # While backfill still asks, the gap is no finding.
        await wait_for("a first request", lambda: _requests_at_least(ingest, 1))
        early = await _finding(database_url)
        assert early is None or early[0] == 0
        await wait_for(
            "the gap to be given up",
            lambda: _gap_states(database_url, ["unrecoverable"]),
            timeout_s=DEADLINE_S,
        )
        asked = responder.requested()
    assert len(asked) >= 2  # repeated with backoff while open
    assert {(r.command.from_seq, r.command.to_seq, r.answered) for r in asked} == {(3, 5, 0)}
    assert await stored_seqs(database_url) == [0, 1, 2, 6, 7, 8, 9]  # nothing invented
    ingest.wait_metric_equal("pumpwatch_ingest_backfill_gaps_unrecoverable_total", 1)
    assert ingest.metric("pumpwatch_ingest_backfill_unrecoverable_messages_total") == 3
    ingest.wait_metric_equal("pumpwatch_ingest_sequence_gaps_unrecoverable", 1)
    found = await _finding(database_url)
    assert found is not None
    missing, facts, detail = found
    assert missing == 3
    assert facts["missing_from"] is not None
    assert facts["missing_until"] is not None
    assert "recorded between" in detail
    # Every request published was a claim of the gap while it was open.
    requests = await fetchval(database_url, "SELECT requests FROM sequence_gaps")
    assert ingest.metric("pumpwatch_ingest_backfill_requests_total") == requests


async def test_ingest_restarted_mid_backfill_carries_on_from_the_database(
    ingest: IngestProcess, mqtt5_broker: EmbeddedBroker, database_url: str
) -> None:
    """The gap is asked for while the device is offline; ingest is killed; the next ingest
    asks again (the state is in the database) and the device, back online, answers."""
    ingest.extra_env.update(
        PUMPWATCH_BACKFILL_RETRY_INITIAL_S="1", PUMPWATCH_BACKFILL_RETRY_MAX_S="1"
    )
    ingest.start()
    sent = stream(10)
    publish(mqtt5_broker, [m for m in sent if not 5 <= seq_of(m) <= 7])
    await wait_for("a first request", lambda: _requests_at_least(ingest, 1))
    ingest.kill()
    assert await gaps(database_url) == [(SERIAL, "HUB-7731", 5, 7, "open")]
    asked_before = int(await fetchval(database_url, "SELECT requests FROM sequence_gaps"))
    assert asked_before >= 1
    with devices(mqtt5_broker, sent) as responder:
        ingest.start()
        await wait_for("the gap to be filled", lambda: _all_stored(database_url, 10))
        await wait_for("the gap row to go", _no_gaps(database_url))
        assert [(r.command.from_seq, r.command.to_seq) for r in responder.requested()][:1] == [
            (5, 7)
        ]
    assert await stored_seqs(database_url) == list(range(10))


async def test_two_ingest_instances_ask_for_each_gap_once(
    database_url: str, mqtt5_broker: EmbeddedBroker, tmp_path: Path
) -> None:
    shared = {
        **FAST,
        "PUMPWATCH_MQTT_SHARE_GROUP": "pumpwatch-ingest",
        "PUMPWATCH_BACKFILL_SETTLE_S": "1",
    }
    first = IngestProcess(database_url, mqtt5_broker, tmp_path / "a.log", extra_env=shared)
    second = IngestProcess(database_url, mqtt5_broker, tmp_path / "b.log", extra_env=shared)
    try:
        first.start()
        second.start()
        sent: list[Outgoing] = []
        lost: set[str | None] = set()
        for n in range(8):
            serial = f"NGP{n:04d}TWO"
            pump = stream(30, serial=serial)
            sent.extend(pump)
            lost |= {m.msg_id for m in pump if seq_of(m) in (5, 6, 17, 25)}
        with devices(mqtt5_broker, sent) as responder:
            publish(mqtt5_broker, [m for m in sent if m.msg_id not in lost])
            await wait_for(
                "every gap filled", lambda: _all_stored(database_url, len(sent)), every_s=0.25
            )
            await wait_for("the gap rows to go", _no_gaps(database_url))
            asked = Counter(
                (r.serial, r.command.source_id, r.command.from_seq, r.command.to_seq)
                for r in responder.requested()
            )
        assert [key for key, n in asked.items() if n > 1] == []
        real = {
            (f"NGP{n:04d}TWO", "HUB-7731", a, b)
            for n in range(8)
            for a, b in ((5, 6), (17, 17), (25, 25))
        }
        assert real <= set(asked)
        total = first.metric("pumpwatch_ingest_backfill_requests_total") + second.metric(
            "pumpwatch_ingest_backfill_requests_total"
        )
        assert total == sum(asked.values())
        assert await fetchval(database_url, "SELECT count(*) FROM readings") == len(sent)
    finally:
        first.stop_quietly()
        second.stop_quietly()


# -- probes -------------------------------------------------------------------------------------


def _all_stored(url: str, expected: int) -> Any:
    return count_is(url, "SELECT count(*) FROM readings", expected)()


def _no_gaps(url: str) -> Callable[[], Any]:
    return count_is(url, "SELECT count(*) FROM sequence_gaps", 0)


async def _gap_states(url: str, states: list[str]) -> bool:
    found = await gaps(url)
    return [g[4] for g in found] == states


async def _requests_at_least(ingest: IngestProcess, n: int) -> bool:
    return ingest.metric("pumpwatch_ingest_backfill_requests_total") >= n


async def _finding(url: str) -> tuple[int, dict[str, Any], str] | None:
    """The pump's snapshot as the alert service loads it, and the telemetry_gap finding."""
    conn = await asyncpg.connect(url)
    try:
        now = datetime.now(UTC)
        settings = RuleSettings(telemetry_gap_min_minutes=0.01)
        loaded = await snapshots.load(conn, [SERIAL], now=now, wall_now=now, settings=settings)
    finally:
        await conn.close()
    snapshot, _ = loaded[SERIAL]
    for found in evaluate(snapshot):
        if found.rule.value == "telemetry_gap":
            return snapshot.missing_messages, found.facts, found.detail
    return None if snapshot.missing_messages == 0 else (snapshot.missing_messages, {}, "")
