"""Ingest under failure, against a real broker and PostgreSQL, with ingest as a real process.

SIGKILL at random points while a stream is published, messages published while ingest is down,
SIGTERM with work in flight, two instances sharing a subscription, configuration errors that must
be fatal (and an unreachable database that must not be), and a stream full of malformed messages.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import random
import shutil
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import pytest

from lab.embedded import EmbeddedBroker, free_port, mosquitto_config, port_open
from lab.sim.fleet import Fault, Fleet, Outgoing
from lab.sim.publisher import publish_all
from services.domain.contract import Reason
from services.settings import parse_mqtt_url
from tests.support import IngestProcess, encode, fetch, fetchval, telemetry, wait_for_count

RECEIVED = "pumpwatch_ingest_messages_received_total"
STORED = "pumpwatch_ingest_messages_stored_total"
DUPLICATES = "pumpwatch_ingest_messages_duplicate_total"
QUARANTINED = "pumpwatch_ingest_messages_quarantined_total"
BACKLOG = "pumpwatch_ingest_backlog_messages"

LEDGER_COUNT = "SELECT count(*) FROM ingested_messages"
QUARANTINE_COUNT = "SELECT coalesce(sum(occurrences), 0) FROM quarantine"
STORED_MESSAGES = """
SELECT msg_id::text AS msg_id, payload FROM readings
UNION ALL
SELECT msg_id::text AS msg_id, payload FROM events
"""


# -- helpers ---------------------------------------------------------------------------------


def days_ago(days: int) -> datetime:
    """Midnight UTC ``days`` ago: a fleet started there records nothing in the future."""
    return (datetime.now(UTC) - timedelta(days=days)).replace(
        hour=0, minute=0, second=0, microsecond=0
    )


def fleet_messages(count: int, *, seed: int, pumps: int, days: int = 10) -> list[Outgoing]:
    """``count`` valid messages of a fault-free fleet, all recorded before now."""
    messages = Fleet(pumps=pumps, seed=seed, start=days_ago(days)).take(count)
    assert all(m.valid and m.msg_id for m in messages)
    assert len({m.msg_id for m in messages}) == count
    assert max(m.at for m in messages) < datetime.now(UTC)
    return messages


def protocol_of(broker: EmbeddedBroker) -> Literal["5", "3.1.1"]:
    return "5" if broker.supports_mqtt5 else "3.1.1"


def publish_messages(broker: EmbeddedBroker, messages: Sequence[Outgoing]) -> None:
    """QoS 1; returns once the broker acknowledged every message."""
    report = publish_all(
        parse_mqtt_url(broker.url),
        messages,
        client_id=f"test-pub-{uuid.uuid4().hex[:8]}",
        protocol=protocol_of(broker),
    )
    assert report.published == len(messages)
    assert report.refused == 0


def probe_message(serial: str) -> Outgoing:
    """One hand-made valid telemetry message."""
    message = telemetry(serial=serial, seq=1)
    return Outgoing(
        topic=f"pumps/{serial}/telemetry",
        payload=encode(message),
        kind="telemetry",
        msg_id=message["msg_id"],
        serial=serial,
        valid=True,
        at=datetime.now(UTC),
    )


def scrape(process: IngestProcess) -> dict[str, float]:
    """Every sample on the process's /metrics, keyed by name with labels as printed."""
    return process.metrics()


def total(samples: dict[str, float], name: str) -> float:
    """The sum of a metric over all its label values."""
    return sum(v for k, v in samples.items() if k == name or k.startswith(name + "{"))


def log_records(process: IngestProcess, event: str | None = None) -> list[dict[str, Any]]:
    """The process's JSON log records (all of its lives), optionally only one event's."""
    return process.records(event)


async def eventually(
    condition: Callable[[], bool],
    what: str,
    *,
    process: IngestProcess | None = None,
    timeout_s: float = 60.0,
    every_s: float = 0.05,
) -> None:
    """Poll ``condition``; fail with ``what`` (and the log) on timeout or if ingest exits."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if process is not None and process.proc is not None and process.proc.poll() is not None:
            raise AssertionError(
                f"ingest exited with {process.proc.returncode} while waiting for {what}:\n"
                f"{process.log()}"
            )
        if time.monotonic() > deadline:
            log = f":\n{process.log()}" if process is not None else ""
            raise AssertionError(f"waited {timeout_s} s for {what}{log}")
        await asyncio.sleep(every_s)


async def assert_stored_exactly_once(url: str, messages: Sequence[Outgoing]) -> None:
    """Each message is stored once (readings or events), the ledger has each id once, and the
    stored payload is the published one."""
    published = {m.msg_id: m.payload for m in messages if m.msg_id is not None}
    assert len(published) == len(messages)
    rows = await fetch(url, STORED_MESSAGES)
    seen = Counter(r["msg_id"] for r in rows)
    duplicated = {msg_id: n for msg_id, n in seen.items() if n > 1}
    assert not duplicated, f"{len(duplicated)} messages stored more than once: {duplicated}"
    missing = published.keys() - seen.keys()
    unexpected = seen.keys() - published.keys()
    assert not missing, f"{len(missing)} published messages were never stored"
    assert not unexpected, f"{len(unexpected)} stored messages were never published"
    assert len(rows) == len(published)
    ledger = {r[0] for r in await fetch(url, "SELECT msg_id::text FROM ingested_messages")}
    assert await fetchval(url, LEDGER_COUNT) == len(published)
    assert ledger == published.keys()
    altered = [
        r["msg_id"] for r in rows if json.loads(r["payload"]) != json.loads(published[r["msg_id"]])
    ]
    assert not altered, (
        f"{len(altered)} stored payloads differ from the published, e.g. {altered[:5]}"
    )


@pytest.fixture
def ingest(database_url: str, broker: EmbeddedBroker, tmp_path: Path) -> Iterator[IngestProcess]:
    process = IngestProcess(database_url, broker, tmp_path / "ingest.log")
    yield process
    process.stop_quietly()


# -- 1. SIGKILL soak -------------------------------------------------------------------------

SOAK_MESSAGES = 20_000
SOAK_RESENDS = 1_000
SOAK_KILLS = 8
SOAK_SEED = 20261124


def with_resends(messages: Sequence[Outgoing], rng: random.Random, count: int) -> list[Outgoing]:
    """The stream as publishers that retry send it: ``count`` of the messages go out a second
    time, up to 3,000 messages later (the contract: the same message may arrive again)."""
    later: dict[int, list[Outgoing]] = {}
    for i in rng.sample(range(len(messages)), count):
        later.setdefault(min(len(messages) - 1, i + rng.randint(1, 3000)), []).append(messages[i])
    stream: list[Outgoing] = []
    for i, message in enumerate(messages):
        stream.append(message)
        stream.extend(later.get(i, []))
    return stream


@dataclass(frozen=True)
class KillRecord:
    """The state of things just before one SIGKILL."""

    life: int
    threshold: int
    """The kill came once the process had taken this many messages from its backlog ..."""
    extra_s: float
    """... and this much later."""
    published: int
    """Messages the broker had acknowledged to the publisher (re-sends included) ..."""
    distinct: int
    """... and how many distinct messages those were."""
    stored: int
    """Rows in the ledger (committed)."""
    received: float
    """Messages the killed process had taken from its backlog to store."""
    settled: float
    """Of those, committed (stored + duplicates + quarantined): the rest were in flight."""
    duplicates: float
    """Messages (re-sent or redelivered) the killed process found already stored."""

    @property
    def in_flight(self) -> bool:
        """Published messages were not committed yet: the kill interrupted work."""
        return self.stored < self.distinct


class PacedPublisher:
    """Publishes a stream from a background thread in small chunks, never beyond ``allow(n)``.

    The test raises the allowance after each kill, so each life of ingest sees new traffic, and
    the end of the stream is published only after the last kill: every kill is mid-stream."""

    def __init__(
        self, broker: EmbeddedBroker, messages: Sequence[Outgoing], *, chunk: int, pause_s: float
    ) -> None:
        self.broker = broker
        self.messages = messages
        self.chunk = chunk
        self.pause_s = pause_s
        self.published = 0
        self._allowed = 0
        self._cancelled = threading.Event()
        self._changed = threading.Condition()

    def allow(self, count: int) -> None:
        with self._changed:
            self._allowed = max(self._allowed, min(count, len(self.messages)))
            self._changed.notify_all()

    def cancel(self) -> None:
        self._cancelled.set()
        with self._changed:
            self._changed.notify_all()

    def run(self) -> int:
        target = parse_mqtt_url(self.broker.url)
        chunks = 0
        while self.published < len(self.messages):
            with self._changed:
                self._changed.wait_for(
                    lambda: self._allowed > self.published or self._cancelled.is_set()
                )
                upto = min(self.published + self.chunk, self._allowed)
            if self._cancelled.is_set():
                break
            report = publish_all(
                target,
                self.messages[self.published : upto],
                client_id=f"soak-pub-{chunks}-{uuid.uuid4().hex[:6]}",
                protocol=protocol_of(self.broker),
                stop=self._cancelled,
            )
            if self._cancelled.is_set():
                break
            if report.published != upto - self.published:
                raise AssertionError(f"the broker acknowledged {report.published} of a chunk")
            self.published = upto
            chunks += 1
            self._cancelled.wait(self.pause_s)
        return self.published


@pytest.mark.slow
async def test_sigkill_at_random_points_loses_nothing_and_stores_nothing_twice(
    ingest: IngestProcess, broker: EmbeddedBroker, database_url: str
) -> None:
    rng = random.Random(SOAK_SEED)
    messages = fleet_messages(SOAK_MESSAGES, seed=SOAK_SEED, pumps=60)
    stream = with_resends(messages, rng, SOAK_RESENDS)
    assert len(stream) == SOAK_MESSAGES + SOAK_RESENDS
    publisher = PacedPublisher(broker, stream, chunk=100, pause_s=0.04)
    # Each life of ingest gets a share of the stream to publish; the last share is published only
    # after the last kill.
    share = len(stream) // (SOAK_KILLS + 1)
    allowances = [share * (i + 1) for i in range(SOAK_KILLS)] + [len(stream)]
    kills: list[KillRecord] = []
    executor = ThreadPoolExecutor(1, thread_name_prefix="soak-publisher")
    try:
        ingest.start()  # subscribed: the persistent session exists before the first message
        publisher.allow(allowances[0])
        publishing = executor.submit(publisher.run)

        def received_at_least(count: int) -> Callable[[], bool]:
            def check() -> bool:
                if publishing.done():
                    publishing.result()  # re-raise a publisher failure here
                status, _ = ingest.get("/metrics")
                return status == 200 and total(scrape(ingest), RECEIVED) >= count

            return check

        for life in range(SOAK_KILLS):
            if life:
                # Same client id: the session (and its unacked messages) resumes. Not waiting for
                # /readyz, which lags up to a second behind: by then the queue would be drained.
                ingest.start(wait_ready=False)
            # A random point of this life's share: it has at least ``share`` messages to take.
            threshold = max(1, round(rng.uniform(0.05, 0.95) * share))
            extra_s = rng.uniform(0.0, 0.1)
            await eventually(
                received_at_least(threshold),
                f"life {life} to take {threshold} messages",
                process=ingest,
                every_s=0.01,
            )
            await asyncio.sleep(extra_s)
            assert ingest.proc is not None
            assert ingest.proc.poll() is None, f"ingest died by itself:\n{ingest.log()}"
            samples = scrape(ingest)
            stored = int(await fetchval(database_url, LEDGER_COUNT))
            published = publisher.published
            ingest.kill()
            duplicates = total(samples, DUPLICATES)
            kills.append(
                KillRecord(
                    life=life,
                    threshold=threshold,
                    extra_s=round(extra_s, 3),
                    published=published,
                    distinct=len({m.msg_id for m in stream[:published]}),
                    stored=stored,
                    received=total(samples, RECEIVED),
                    settled=total(samples, STORED) + duplicates + total(samples, QUARANTINED),
                    duplicates=duplicates,
                )
            )
            publisher.allow(allowances[life + 1])

        ingest.start()
        assert publishing.result(timeout=120) == len(stream)
        # The broker delivers a session's messages in order: once a message published after the
        # whole stream is stored, everything before it has been through ingest.
        barrier = probe_message("SOAK-BARRIER-1")
        publish_messages(broker, [barrier])
        count = await wait_for_count(database_url, LEDGER_COUNT, SOAK_MESSAGES + 1)
        assert count == SOAK_MESSAGES + 1, f"{count} stored:\n{ingest.log()}"
        final_duplicates = total(scrape(ingest), DUPLICATES)
        assert ingest.terminate() == 0, ingest.log()
    finally:
        publisher.cancel()
        executor.shutdown(wait=True)

    summary = "\n".join(map(str, kills)) + f"\nlast life: {final_duplicates} duplicates"
    print(f"kills:\n{summary}")
    assert len(kills) == SOAK_KILLS
    mid_stream = [k for k in kills if 0 < k.stored < SOAK_MESSAGES and k.published < len(stream)]
    assert len(mid_stream) >= 5, f"too few kills mid-stream:\n{summary}"
    assert any(k.in_flight for k in kills), f"no kill interrupted work:\n{summary}"
    await assert_stored_exactly_once(database_url, [*messages, barrier])
    assert await fetchval(database_url, "SELECT count(*) FROM quarantine") == 0


# -- 2. Offline ------------------------------------------------------------------------------


async def test_messages_published_while_ingest_is_down_arrive_once_when_it_returns(
    ingest: IngestProcess, broker: EmbeddedBroker, database_url: str
) -> None:
    messages = fleet_messages(5000, seed=2, pumps=40)
    ingest.start()  # subscribes: from now on the broker keeps the session
    assert ingest.terminate() == 0, ingest.log()

    publish_messages(broker, messages)

    ingest.start()  # a new process with the same client id
    count = await wait_for_count(database_url, LEDGER_COUNT, len(messages))
    assert count == len(messages), ingest.log()
    samples = scrape(ingest)
    assert total(samples, RECEIVED) == len(messages)
    assert total(samples, DUPLICATES) == 0
    assert ingest.terminate() == 0, ingest.log()
    await assert_stored_exactly_once(database_url, messages)


# -- 3. SIGTERM drains -----------------------------------------------------------------------

HELD_MESSAGES = 200  # well below the Receive Maximum (1000): all of them reach the backlog


async def test_sigterm_commits_and_acks_the_backlog_so_nothing_comes_back(
    broker: EmbeddedBroker, database_url: str, tmp_path: Path
) -> None:
    messages = fleet_messages(HELD_MESSAGES, seed=3, pumps=20)
    # Batches wait a minute to fill: far beyond the drain timeout (30 s), so only the drain on
    # SIGTERM can commit them in time.
    holding = IngestProcess(
        database_url,
        broker,
        tmp_path / "holding.log",
        extra_env={
            "PUMPWATCH_INGEST_BATCH_MAX_WAIT_MS": "60000",
            "PUMPWATCH_INGEST_BATCH_MAX_MESSAGES": "1000",
        },
    )
    resumed = IngestProcess(
        database_url, broker, tmp_path / "resumed.log", client_id=holding.client_id
    )
    try:
        holding.start()
        publish_messages(broker, messages)
        await eventually(
            lambda: scrape(holding).get(BACKLOG, 0) >= HELD_MESSAGES,
            "the messages to reach the backlog",
            process=holding,
        )
        samples = scrape(holding)
        assert samples[BACKLOG] == HELD_MESSAGES
        assert total(samples, RECEIVED) == 0  # no batch taken yet
        assert await fetchval(database_url, LEDGER_COUNT) == 0

        assert holding.terminate() == 0, holding.log()
        assert await fetchval(database_url, LEDGER_COUNT) == HELD_MESSAGES, holding.log()
        stopping = log_records(holding, "ingest_stopping")
        assert [r["backlog"] for r in stopping] == [HELD_MESSAGES], holding.log()
        await assert_stored_exactly_once(database_url, messages)

        # Same client id: the broker resumes the session. Anything left unacked would be
        # redelivered at once, before any newer message such as the probe.
        resumed.start()
        connected = log_records(resumed, "mqtt_connected")
        assert [r["session_present"] for r in connected] == [True], resumed.log()
        assert total(scrape(resumed), RECEIVED) == 0
        probe = probe_message("DRAIN-PROBE-1")
        publish_messages(broker, [probe])
        count = await wait_for_count(database_url, LEDGER_COUNT, HELD_MESSAGES + 1)
        assert count == HELD_MESSAGES + 1, resumed.log()
        samples = scrape(resumed)
        assert total(samples, RECEIVED) == 1, "the broker redelivered acknowledged messages"
        assert total(samples, DUPLICATES) == 0
        assert resumed.terminate() == 0, resumed.log()
    finally:
        holding.stop_quietly()
        resumed.stop_quietly()
    await assert_stored_exactly_once(database_url, [*messages, probe])


# -- 4. Shared subscription ------------------------------------------------------------------


async def test_two_instances_in_one_share_group_split_the_stream(
    mqtt5_broker: EmbeddedBroker, database_url: str, tmp_path: Path
) -> None:
    messages = fleet_messages(4000, seed=4, pumps=40)
    env = {"PUMPWATCH_MQTT_SHARE_GROUP": "resilience-test"}
    instances = [
        IngestProcess(database_url, mqtt5_broker, tmp_path / f"ingest-{n}.log", extra_env=env)
        for n in ("a", "b")
    ]
    assert instances[0].client_id != instances[1].client_id
    try:
        for instance in instances:
            instance.start()
        publish_messages(mqtt5_broker, messages)
        count = await wait_for_count(database_url, LEDGER_COUNT, len(messages))
        assert count == len(messages)
        samples = [scrape(instance) for instance in instances]
        received = [total(s, RECEIVED) for s in samples]
        assert all(r > 0 for r in received), f"one instance got nothing: {received}"
        assert sum(received) == len(messages), f"received {received}"
        assert [total(s, DUPLICATES) for s in samples] == [0, 0]
        for instance in instances:
            assert instance.terminate() == 0, instance.log()
    finally:
        for instance in instances:
            instance.stop_quietly()
    await assert_stored_exactly_once(database_url, messages)


# -- 5. MQTT credentials ---------------------------------------------------------------------

MQTT_USER = "user"
MQTT_PASSWORD = "s3cret-7731"


@dataclass(frozen=True)
class PasswordBroker:
    """A mosquitto that admits only ``MQTT_USER`` with ``MQTT_PASSWORD``."""

    port: int

    def as_user(self, user: str, password: str) -> EmbeddedBroker:
        url = f"mqtt://{user}:{password}@127.0.0.1:{self.port}"
        return EmbeddedBroker(url, "mosquitto", self.port, lambda: None)


@pytest.fixture
def password_broker(tmp_path: Path) -> Iterator[PasswordBroker]:
    binary = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    passwd = shutil.which("mosquitto_passwd")
    if binary is None or passwd is None:
        pytest.skip("needs mosquitto and mosquitto_passwd (apt install mosquitto)")
    data_dir = tmp_path / "mosquitto-auth"
    data_dir.mkdir()
    password_file = data_dir / "passwords"
    subprocess.run(
        [passwd, "-b", "-c", str(password_file), MQTT_USER, MQTT_PASSWORD],
        check=True,
        capture_output=True,
    )
    port = free_port()
    config = mosquitto_config(port, data_dir, persistence=False)
    assert "allow_anonymous true" in config
    config = config.replace("allow_anonymous true", "allow_anonymous false")
    config += f"password_file {password_file}\n"
    assert f"user {getpass.getuser()}" in config  # so mosquitto, as root, can read the file
    config_path = data_dir / "mosquitto.conf"
    config_path.write_text(config)
    log_path = data_dir / "mosquitto.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen([binary, "-c", str(config_path)], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 10
        while not port_open("127.0.0.1", port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mosquitto did not start:\n{log_path.read_text()}")
            time.sleep(0.02)
        yield PasswordBroker(port)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for_exit(process: IngestProcess, timeout_s: float = 20.0) -> int:
    assert process.proc is not None
    try:
        return process.proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"ingest still running after {timeout_s} s:\n{process.log()}"
        ) from None


def error_lines(process: IngestProcess) -> list[str]:
    return [line for line in process.log().splitlines() if line.startswith("pumpwatch: error:")]


async def test_wrong_mqtt_password_is_a_fatal_error_and_the_right_one_connects(
    password_broker: PasswordBroker, database_url: str, tmp_path: Path
) -> None:
    wrong_password = "wr0ng-pa55-8842"
    refused = IngestProcess(
        database_url, password_broker.as_user(MQTT_USER, wrong_password), tmp_path / "refused.log"
    )
    admitted = IngestProcess(
        database_url, password_broker.as_user(MQTT_USER, MQTT_PASSWORD), tmp_path / "admitted.log"
    )
    try:
        refused.start(wait_ready=False)
        assert wait_for_exit(refused) == 2, refused.log()
        errors = error_lines(refused)
        assert len(errors) == 1, refused.log()
        # Mosquitto answers a wrong password with "not authorized" (MQTT 5 reason code 135),
        # other brokers with "bad user name or password" (134).
        broker_name = f"mqtt://{MQTT_USER}@127.0.0.1:{password_broker.port}"
        assert f"broker {broker_name} refused the connection" in errors[0]
        assert "not authorized" in errors[0] or "bad user name or password" in errors[0]
        assert wrong_password not in refused.log_path.read_text()

        admitted.start()
        probe = probe_message("AUTH-PROBE-1")
        publish_messages(password_broker.as_user(MQTT_USER, MQTT_PASSWORD), [probe])
        assert await wait_for_count(database_url, LEDGER_COUNT, 1) == 1, admitted.log()
        assert admitted.terminate() == 0, admitted.log()
        assert MQTT_PASSWORD not in admitted.log_path.read_text()
    finally:
        refused.stop_quietly()
        admitted.stop_quietly()


# -- 6. Database at start --------------------------------------------------------------------


async def test_unreachable_database_at_start_is_retried_until_sigterm(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    nowhere = f"postgresql://postgres@127.0.0.1:{free_port()}/pumpwatch"
    ingest = IngestProcess(nowhere, broker, tmp_path / "ingest.log")
    try:
        ingest.start(wait_ready=False)
        # Four attempts take the first backoff steps (0.2 + 0.4 + 0.8 s): it keeps trying.
        await eventually(
            lambda: len(log_records(ingest, "database_unavailable")) >= 4,
            "repeated database_unavailable warnings",
            process=ingest,
        )
        status, body = ingest.get("/readyz")
        assert status == 503
        assert "database unavailable" in json.loads(body)["reasons"]
        assert ingest.terminate() == 0, ingest.log()
    finally:
        ingest.stop_quietly()
    assert not error_lines(ingest), ingest.log()


def _with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def _with_user(url: str, user: str, password: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{host}"))


@pytest.mark.parametrize("refusal", ["unknown_database", "unknown_role"])
async def test_database_that_refuses_us_is_a_fatal_error(
    refusal: str, broker: EmbeddedBroker, database_url: str, tmp_path: Path
) -> None:
    if refusal == "unknown_database":
        url, name = _with_database(database_url, "no_such_db_xyz"), "no_such_db_xyz"
    else:
        url, name = _with_user(database_url, "no_such_role_xyz", "wr0ng-db-pw"), "no_such_role_xyz"
    ingest = IngestProcess(url, broker, tmp_path / "ingest.log")
    try:
        ingest.start(wait_ready=False)
        assert wait_for_exit(ingest) == 2, ingest.log()
    finally:
        ingest.stop_quietly()
    errors = error_lines(ingest)
    assert len(errors) == 1, ingest.log()
    assert "the database refused the connection" in errors[0]
    assert name in errors[0]
    assert "wr0ng-db-pw" not in ingest.log_path.read_text()


# -- 7. Malformed flood ----------------------------------------------------------------------


async def test_malformed_flood_is_quarantined_with_its_reasons_and_the_rest_stored_once(
    ingest: IngestProcess, broker: EmbeddedBroker, database_url: str
) -> None:
    fleet = Fleet(pumps=100, seed=7, start=days_ago(3), fault_rates={Fault.MALFORMED: 0.3})
    messages = fleet.take(10_000)
    valid = [m for m in messages if m.valid]
    malformed = [m for m in messages if not m.valid]
    expected_reasons = Counter(m.reason.value for m in malformed if m.reason is not None)
    assert sum(expected_reasons.values()) == len(malformed) >= 200
    assert len(expected_reasons) >= 4  # the flood mixes several kinds of breakage
    assert max(m.at for m in valid) < datetime.now(UTC)

    ingest.start()
    assert ingest.proc is not None
    pid = ingest.proc.pid
    publish_messages(broker, messages)
    assert await wait_for_count(database_url, LEDGER_COUNT, len(valid)) == len(valid)
    quarantined = await wait_for_count(database_url, QUARANTINE_COUNT, len(malformed))
    assert quarantined == len(malformed), ingest.log()

    # The counters move just after the commit that the database already shows.
    deadline = time.monotonic() + 10
    samples = scrape(ingest)
    while total(samples, STORED) + total(samples, QUARANTINED) < len(messages):
        assert time.monotonic() < deadline, samples
        await asyncio.sleep(0.05)
        samples = scrape(ingest)
    assert total(samples, RECEIVED) == len(messages)
    assert total(samples, STORED) == len(valid)
    for reason in Reason:
        key = f'{QUARANTINED}{{reason="{reason.value}"}}'
        assert samples.get(key) == expected_reasons[reason.value], reason
    # One process, one connection, no errors, from start to finish.
    assert ingest.proc.pid == pid
    assert ingest.proc.poll() is None
    assert len(log_records(ingest, "mqtt_connected")) == 1, ingest.log()
    assert [r for r in log_records(ingest) if r.get("level") in ("error", "critical")] == []
    assert ingest.terminate() == 0, ingest.log()

    await assert_stored_exactly_once(database_url, valid)
    expected: dict[tuple[str, bytes], tuple[str, int]] = {}
    for m in malformed:
        assert m.reason is not None
        where = (m.topic, m.payload[:65536])
        expected[where] = (m.reason.value, expected.get(where, ("", 0))[1] + 1)
    rows = await fetch(database_url, "SELECT topic, payload, reason, occurrences FROM quarantine")
    stored = {(r["topic"], bytes(r["payload"])): (r["reason"], r["occurrences"]) for r in rows}
    wrong = [(k, stored.get(k), want) for k, want in expected.items() if stored.get(k) != want]
    assert not wrong, f"{len(wrong)} quarantined wrongly, e.g. {wrong[:3]}"
    assert len(stored) == len(expected)
