"""Ingest while its servers go away and come back, with ingest as a real process.

The broker restarts (SIGTERM, then started again on the same port and data directory: mosquitto
saves the persistent sessions on shutdown and restores them), and the database disappears behind
a TCP proxy that cuts every connection and refuses new ones, then lets them through again.
Throughout, ingest must stay up, say on /readyz and /healthz what is wrong, reconnect on its own
and, in the end, have stored every message exactly once.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest

from lab.embedded import EmbeddedBroker, free_port, start_mosquitto
from tests.support import IngestProcess, fetchval, wait_for_count
from tests.test_ingest_resilience import (
    BACKLOG,
    DUPLICATES,
    LEDGER_COUNT,
    QUARANTINED,
    RECEIVED,
    STORED,
    assert_stored_exactly_once,
    eventually,
    fleet_messages,
    log_records,
    publish_messages,
    scrape,
    total,
)

RETRIES = "pumpwatch_ingest_store_retries_total"
DATABASE_UP = "pumpwatch_ingest_database_up"
MQTT_CONNECTED = "pumpwatch_ingest_mqtt_connected"


def status_of(process: IngestProcess, path: str) -> tuple[int, dict[str, Any]]:
    """/healthz or /readyz: the HTTP status and the JSON body ({} when there is none)."""
    status, body = process.get(path)
    return status, json.loads(body) if body.startswith("{") else {}


def answers(process: IngestProcess, path: str, wanted: int) -> Callable[[], bool]:
    return lambda: process.get(path)[0] == wanted


def alive(process: IngestProcess) -> bool:
    return process.proc is not None and process.proc.poll() is None


def settled(process: IngestProcess, *, stored: int) -> Callable[[], bool]:
    """``stored`` messages stored, and every message received is accounted for (stored, found
    to be a duplicate or quarantined): no batch is still committing."""

    def check() -> bool:
        samples = scrape(process)
        done = total(samples, STORED) + total(samples, DUPLICATES) + total(samples, QUARANTINED)
        return total(samples, STORED) == stored and total(samples, RECEIVED) == done

    return check


# -- 1. Broker restart -----------------------------------------------------------------------


class RestartableBroker:
    """A mosquitto of the test's own that can be stopped and started again on the same port
    with the same data directory (and so the same persistence file)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        try:
            self.current: EmbeddedBroker | None = start_mosquitto(data_dir)
        except FileNotFoundError as exc:
            pytest.skip(f"needs mosquitto (apt install mosquitto): {exc}")
        self.port = self.current.port
        self.url = self.current.url

    @property
    def broker(self) -> EmbeddedBroker:
        assert self.current is not None, "the broker is stopped"
        return self.current

    def stop(self) -> None:
        """SIGTERM: mosquitto saves its persistence file on the way out."""
        assert self.current is not None
        self.current.stop()
        self.current = None

    def start(self) -> None:
        assert self.current is None
        self.current = start_mosquitto(self.data_dir, port=self.port)
        assert self.current.url == self.url

    def close(self) -> None:
        if self.current is not None:
            self.stop()


@pytest.fixture
def restartable_broker(tmp_path: Path) -> Iterator[RestartableBroker]:
    broker = RestartableBroker(tmp_path / "mq")
    try:
        yield broker
    finally:
        broker.close()


async def test_broker_restart_is_survived_and_later_messages_are_stored_exactly_once(
    restartable_broker: RestartableBroker, database_url: str, tmp_path: Path
) -> None:
    mq = restartable_broker
    messages = fleet_messages(500, seed=31, pumps=25)
    before, after = messages[:200], messages[200:]
    ingest = IngestProcess(database_url, mq.broker, tmp_path / "ingest.log")
    try:
        ingest.start()
        assert [r["generation"] for r in log_records(ingest, "mqtt_connected")] == [1]
        publish_messages(mq.broker, before)
        assert await wait_for_count(database_url, LEDGER_COUNT, len(before)) == len(before)

        mq.stop()
        assert (mq.data_dir / "mosquitto.db").exists(), "mosquitto saved no persistence file"
        await eventually(
            answers(ingest, "/readyz", 503), "/readyz to report not ready", process=ingest
        )
        status, body = status_of(ingest, "/readyz")
        assert status == 503
        assert body["status"] == "not ready"
        assert any("broker" in reason for reason in body["reasons"]), body
        assert "database unavailable" not in body["reasons"], body
        assert ingest.metric(MQTT_CONNECTED) == 0
        # It keeps trying while the broker is away, and stays up (and live: nothing waits).
        await eventually(
            lambda: len(log_records(ingest, "mqtt_reconnect_failed")) >= 2,
            "two failed reconnection attempts",
            process=ingest,
        )
        assert alive(ingest), ingest.log()
        assert ingest.get("/healthz")[0] == 200
        assert log_records(ingest, "mqtt_reconnected") == []

        mq.start()
        await eventually(
            lambda: len(log_records(ingest, "mqtt_reconnected")) == 1,
            "ingest to reconnect to the restarted broker",
            process=ingest,
        )
        await eventually(answers(ingest, "/readyz", 200), "/readyz to recover", process=ingest)
        status, body = status_of(ingest, "/readyz")
        assert (status, body) == (200, {"status": "ready", "reasons": []})
        assert ingest.metric(MQTT_CONNECTED) == 1
        connected = log_records(ingest, "mqtt_connected")
        assert [r["generation"] for r in connected] == [1, 2], ingest.log()
        # The restarted broker restored the persistent session from its file.
        assert connected[1]["session_present"] is True, ingest.log()

        publish_messages(mq.broker, after)
        count = await wait_for_count(database_url, LEDGER_COUNT, len(messages))
        assert count == len(messages), ingest.log()
        # Redelivered copies (an ack the broker had not processed when it stopped) are fine,
        # as long as they are recognised as duplicates.
        await eventually(
            settled(ingest, stored=len(messages)), "every received message settled", process=ingest
        )
        assert alive(ingest)
        assert len(log_records(ingest, "mqtt_connected")) == 2
        assert [r for r in log_records(ingest) if r.get("level") in ("error", "critical")] == []
        assert ingest.terminate() == 0, ingest.log()
    finally:
        ingest.stop_quietly()
    await assert_stored_exactly_once(database_url, messages)


RECEIVE_MAXIMUM = 50


async def test_messages_held_in_the_session_when_the_broker_stops_come_after_its_restart(
    restartable_broker: RestartableBroker, database_url: str, tmp_path: Path
) -> None:
    """Ingest holds its first batch (it waits for ``2 * RECEIVE_MAXIMUM`` messages, for up to
    two minutes), so when the broker stops it has sent ``RECEIVE_MAXIMUM`` messages that ingest
    has not acknowledged, and queued as many more that it may not send yet. Only the restarted
    broker, from its persistence file, can complete the batch (by redelivering the first half)
    and then send the second half."""
    mq = restartable_broker
    messages = fleet_messages(2 * RECEIVE_MAXIMUM, seed=32, pumps=10)
    ingest = IngestProcess(
        database_url,
        mq.broker,
        tmp_path / "ingest.log",
        extra_env={
            "PUMPWATCH_MQTT_RECEIVE_MAXIMUM": str(RECEIVE_MAXIMUM),
            "PUMPWATCH_INGEST_BATCH_MAX_MESSAGES": str(2 * RECEIVE_MAXIMUM),
            "PUMPWATCH_INGEST_BATCH_MAX_WAIT_MS": "120000",
        },
    )
    try:
        ingest.start()
        publish_messages(mq.broker, messages)
        await eventually(
            lambda: scrape(ingest).get(BACKLOG, 0) >= RECEIVE_MAXIMUM,
            "the first messages to reach the backlog",
            process=ingest,
        )
        samples = scrape(ingest)
        assert samples[BACKLOG] == RECEIVE_MAXIMUM  # the broker keeps the rest queued
        assert total(samples, RECEIVED) == 0  # no batch taken: nothing stored, nothing acked
        assert await fetchval(database_url, LEDGER_COUNT) == 0

        mq.stop()
        await eventually(
            answers(ingest, "/readyz", 503), "/readyz to report not ready", process=ingest
        )
        mq.start()
        await eventually(
            lambda: len(log_records(ingest, "mqtt_reconnected")) == 1,
            "ingest to reconnect to the restarted broker",
            process=ingest,
        )
        # The unacknowledged half comes again and completes the batch (whose first half ingest
        # still holds from before the restart): each message is stored once, the second copy
        # is a duplicate. The acks let the broker send the half it had queued.
        count = await wait_for_count(database_url, LEDGER_COUNT, RECEIVE_MAXIMUM)
        assert count == RECEIVE_MAXIMUM, ingest.log()
        await eventually(
            lambda: (
                settled(ingest, stored=RECEIVE_MAXIMUM)()
                and scrape(ingest)[BACKLOG] == RECEIVE_MAXIMUM
            ),
            "the first batch to settle and the queued half to reach the backlog",
            process=ingest,
        )
        samples = scrape(ingest)
        assert total(samples, RECEIVED) == 2 * RECEIVE_MAXIMUM
        assert total(samples, STORED) == RECEIVE_MAXIMUM
        assert total(samples, DUPLICATES) == RECEIVE_MAXIMUM
        assert samples[BACKLOG] == RECEIVE_MAXIMUM
        # SIGTERM commits the held second half.
        assert ingest.terminate() == 0, ingest.log()
    finally:
        ingest.stop_quietly()
    await assert_stored_exactly_once(database_url, messages)


async def test_what_devices_publish_to_a_restarted_broker_before_ingest_is_back_is_stored(
    restartable_broker: RestartableBroker, database_url: str, tmp_path: Path
) -> None:
    """The default plain subscription is part of the persistent session that mosquitto saves
    and restores, so the broker queues for ingest from the moment it is back, before ingest has
    reconnected. (Mosquitto 2.0 does not restore ``$share`` subscriptions: that is why plain is
    the default.) Ingest is frozen (SIGSTOP) over the restart so that the devices certainly
    publish first."""
    mq = restartable_broker
    messages = fleet_messages(300, seed=33, pumps=15)
    before, during = messages[:100], messages[100:]
    ingest = IngestProcess(database_url, mq.broker, tmp_path / "ingest.log")
    try:
        ingest.start()
        assert "$share" not in " ".join(log_records(ingest, "mqtt_subscribed")[0]["topics"])
        publish_messages(mq.broker, before)
        assert await wait_for_count(database_url, LEDGER_COUNT, len(before)) == len(before)
        assert ingest.proc is not None
        ingest.proc.send_signal(signal.SIGSTOP)
        try:
            mq.stop()
            mq.start()
            publish_messages(mq.broker, during)  # each PUBACKed by the restarted broker
        finally:
            ingest.proc.send_signal(signal.SIGCONT)
        await eventually(
            lambda: len(log_records(ingest, "mqtt_reconnected")) == 1,
            "ingest to reconnect to the restarted broker",
            process=ingest,
        )
        assert log_records(ingest, "mqtt_connected")[-1]["session_present"] is True
        count = await wait_for_count(database_url, LEDGER_COUNT, len(messages))
        assert count == len(messages), ingest.log()
        assert ingest.terminate() == 0, ingest.log()
    finally:
        ingest.stop_quietly()
    await assert_stored_exactly_once(database_url, messages)


# -- 2. Database outage ----------------------------------------------------------------------


@dataclass
class _Link:
    """One proxied connection: the client's socket, the server's, a thread each way."""

    client: socket.socket
    server: socket.socket
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        self.threads = [
            threading.Thread(target=_pump, args=(a, b), name="db-proxy-pump", daemon=True)
            for a, b in ((self.client, self.server), (self.server, self.client))
        ]
        for thread in self.threads:
            thread.start()

    def close(self) -> None:
        for sock in (self.client, self.server):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self.threads:
            thread.join(5)
            assert not thread.is_alive(), "a proxy thread did not stop"
        self.client.close()
        self.server.close()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


class DatabaseProxy:
    """A TCP forwarder on 127.0.0.1 to the real PostgreSQL (TCP or Unix socket).

    ``cut()`` closes every open connection and the listening socket (new connections are
    refused); ``restore()`` listens on the same port again."""

    def __init__(self, database_url: str) -> None:
        parts = urlsplit(database_url)
        query = parse_qsl(parts.query)
        host = parts.hostname or dict(query).get("host", "")
        port = parts.port or int(dict(query).get("port", "5432"))
        if host.startswith("/"):
            self.upstream: tuple[str, int] | str = f"{host}/.s.PGSQL.{port}"
        else:
            self.upstream = (host or "localhost", port)
        self.port = free_port()
        userinfo, at, _ = parts.netloc.rpartition("@")
        kept = [(k, v) for k, v in query if k not in ("host", "port")]
        self.url = urlunsplit(
            parts._replace(netloc=f"{userinfo}{at}127.0.0.1:{self.port}", query=urlencode(kept))
        )
        self.accepted = 0
        self._links: list[_Link] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._stopping = threading.Event()

    def restore(self) -> None:
        assert self._listener is None
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind(("127.0.0.1", self.port))
        except OSError:
            listener.close()
            raise
        listener.listen(32)
        listener.settimeout(0.05)
        self._stopping.clear()
        self._listener = listener
        self._acceptor = threading.Thread(
            target=self._accept, args=(listener,), name="db-proxy-accept", daemon=True
        )
        self._acceptor.start()

    def cut(self) -> int:
        """Refuse new connections and close the open ones; returns how many were open."""
        if self._acceptor is not None:
            self._stopping.set()
            self._acceptor.join(5)
            assert not self._acceptor.is_alive(), "the proxy's acceptor did not stop"
            self._acceptor = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            links, self._links = self._links, []
        for link in links:
            link.close()
        return len(links)

    def _connect_upstream(self) -> socket.socket:
        if isinstance(self.upstream, str):
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                server.settimeout(5)
                server.connect(self.upstream)
            except OSError:
                server.close()
                raise
        else:
            server = socket.create_connection(self.upstream, timeout=5)
        server.settimeout(None)
        return server

    def _accept(self, listener: socket.socket) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                server = self._connect_upstream()
            except OSError:
                client.close()
                continue
            link = _Link(client, server)
            with self._lock:
                self._links.append(link)
                self.accepted += 1
            link.start()


@pytest.fixture
def database_proxy(database_url: str) -> Iterator[DatabaseProxy]:
    proxy = DatabaseProxy(database_url)
    proxy.restore()
    try:
        yield proxy
    finally:
        proxy.cut()


STALL_TIMEOUT_S = 2.0


@pytest.fixture
def proxied_ingest(
    database_proxy: DatabaseProxy, broker: EmbeddedBroker, tmp_path: Path
) -> Iterator[IngestProcess]:
    process = IngestProcess(
        database_proxy.url,
        broker,
        tmp_path / "ingest.log",
        extra_env={"PUMPWATCH_INGEST_STALL_TIMEOUT_S": str(STALL_TIMEOUT_S)},
    )
    yield process
    process.stop_quietly()


async def test_database_outage_is_retried_reported_and_loses_nothing(
    proxied_ingest: IngestProcess,
    database_proxy: DatabaseProxy,
    broker: EmbeddedBroker,
    database_url: str,
) -> None:
    ingest = proxied_ingest
    messages = fleet_messages(15, seed=41, pumps=5)
    before, during, after = messages[:5], messages[5:10], messages[10:]
    assert urlsplit(database_proxy.url).hostname == "127.0.0.1"
    ingest.start()
    assert database_proxy.accepted >= 1  # ingest's connections go through the proxy
    publish_messages(broker, before)
    assert await wait_for_count(database_url, LEDGER_COUNT, len(before)) == len(before)
    # Ingest has seen its commit through (else the cut could lose the reply to COMMIT, and the
    # retry would find the batch stored: correct, but not what this test counts on).
    await eventually(settled(ingest, stored=len(before)), "the first commit", process=ingest)
    assert ingest.metric(DATABASE_UP) == 1

    assert database_proxy.cut() >= 1  # the pool's idle connection at least
    publish_messages(broker, during)
    await eventually(
        lambda: total(scrape(ingest), RECEIVED) == len(before) + len(during),
        "the messages published during the outage to be received",
        process=ingest,
    )
    await eventually(
        lambda: ingest.metric(RETRIES) >= 1, "a failed store to be retried", process=ingest
    )
    status, body = status_of(ingest, "/readyz")
    assert status == 503
    assert body["reasons"] == ["database unavailable"], body
    assert ingest.metric(DATABASE_UP) == 0
    # It keeps retrying, and stays up.
    retries = ingest.metric(RETRIES)
    await eventually(
        lambda: ingest.metric(RETRIES) > retries, "the store to be retried again", process=ingest
    )
    assert alive(ingest), ingest.log()
    assert log_records(ingest, "store_failed"), ingest.log()
    assert await fetchval(database_url, LEDGER_COUNT) == len(before)

    database_proxy.restore()
    count = await wait_for_count(database_url, LEDGER_COUNT, len(before) + len(during))
    assert count == len(before) + len(during), ingest.log()
    await eventually(answers(ingest, "/readyz", 200), "/readyz to recover", process=ingest)
    publish_messages(broker, after)
    assert await wait_for_count(database_url, LEDGER_COUNT, len(messages)) == len(messages)
    await eventually(
        settled(ingest, stored=len(messages)), "every received message settled", process=ingest
    )
    samples = scrape(ingest)
    assert total(samples, RECEIVED) == len(messages)
    assert total(samples, DUPLICATES) == 0
    assert samples[DATABASE_UP] == 1
    status, body = status_of(ingest, "/healthz")
    assert (status, body["status"], body["waiting_messages"]) == (200, "ok", 0)
    assert alive(ingest), ingest.log()
    assert ingest.terminate() == 0, ingest.log()
    await assert_stored_exactly_once(database_url, messages)


STALLED_MESSAGES = 8


@pytest.mark.parametrize(
    "batch_max_messages",
    [
        # Every message fits in the batches being retried (two commit at once, a third waits
        # its turn): none stays in the backlog. Low traffic during an outage looks like this.
        pytest.param(500, id="all-in-batches-being-retried"),
        # Batches of two: three hold six messages, two stay in the backlog.
        pytest.param(2, id="some-left-in-the-backlog"),
    ],
)
async def test_liveness_reports_a_stall_while_messages_cannot_be_stored(
    batch_max_messages: int,
    proxied_ingest: IngestProcess,
    database_proxy: DatabaseProxy,
    broker: EmbeddedBroker,
    database_url: str,
) -> None:
    ingest = proxied_ingest
    ingest.extra_env["PUMPWATCH_INGEST_BATCH_MAX_MESSAGES"] = str(batch_max_messages)
    messages = fleet_messages(2 + STALLED_MESSAGES, seed=43, pumps=4)
    before, during = messages[:2], messages[2:]
    ingest.start()
    publish_messages(broker, before)  # the stall is counted from the last commit
    assert await wait_for_count(database_url, LEDGER_COUNT, len(before)) == len(before)
    await eventually(settled(ingest, stored=len(before)), "the first commit", process=ingest)
    assert ingest.get("/healthz")[0] == 200
    assert database_proxy.cut() >= 1
    publish_messages(broker, during)
    # All of them reached ingest and wait there (queued or in batches, nothing committed).
    await eventually(
        lambda: scrape(ingest)[BACKLOG] == len(during),
        "the messages to reach ingest",
        process=ingest,
    )
    await eventually(lambda: ingest.metric(RETRIES) >= 1, "a failed store", process=ingest)
    # Messages wait and nothing commits: after the stall timeout, liveness must say so.
    try:
        await eventually(
            answers(ingest, "/healthz", 503),
            f"/healthz to report the stall ({STALL_TIMEOUT_S} s without a commit)",
            process=ingest,
            timeout_s=STALL_TIMEOUT_S + 8,
        )
    except AssertionError as exc:
        _, body = status_of(ingest, "/healthz")
        samples = scrape(ingest)
        raise AssertionError(
            f"/healthz still 200 with {body} while {len(during)} messages wait: "
            f"{samples[BACKLOG]} waiting, "
            f"{await fetchval(database_url, LEDGER_COUNT)} in the ledger, "
            f"{samples[RETRIES]} store retries"
        ) from exc
    status, body = status_of(ingest, "/healthz")
    assert status == 503
    assert body["status"] == "stalled"
    assert body["seconds_waiting_without_commit"] >= STALL_TIMEOUT_S
    assert alive(ingest), ingest.log()

    database_proxy.restore()
    assert await wait_for_count(database_url, LEDGER_COUNT, len(messages)) == len(messages)
    await eventually(answers(ingest, "/healthz", 200), "/healthz to recover", process=ingest)
    await eventually(answers(ingest, "/readyz", 200), "/readyz to recover", process=ingest)
    assert ingest.terminate() == 0, ingest.log()
    await assert_stored_exactly_once(database_url, messages)
