"""``pumpwatch ingest``: the process that owns the MQTT bridge, the backlog and the writer.

Resources are opened in one ``AsyncExitStack`` and closed in reverse order. A message is acked
to the broker only after the transaction that stored or quarantined it committed. On SIGTERM or
SIGINT: stop reading, commit and ack what is in flight, disconnect, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import time
from collections import Counter
from contextlib import AsyncExitStack
from datetime import timedelta

import asyncpg

from services.errors import FatalError
from services.health import Health, serve
from services.ingest.backfill import Backfill, BackfillConfig
from services.ingest.backlog import Backlog, Incoming
from services.ingest.metrics import IngestMetrics
from services.ingest.mqtt import MqttBridge
from services.ingest.settings import IngestSettings
from services.ingest.writer import (
    BatchWriter,
    Prepared,
    StoreUnavailable,
    WriterConfig,
    prepare_connection,
)
from services.logs import get
from services.settings import ConfigError
from services.storage import migrate
from services.storage.database import (
    DATABASE_ERRORS,
    DatabaseRejected,
    keep_session,
    open_pool,
)

log = get(__name__)


_YOUNG_OBJECTS_PER_COLLECTION = 50_000
"""Allocations between the cyclic collector's young passes (Python's default is 700)."""


def tune_collector() -> None:
    """Fit the cyclic garbage collector to ingest's traffic (the ``pumpwatch ingest`` process).

    Each message in flight holds about ten tracked objects (its arrival, its decoded message,
    its row, …) until its batch commits: some 25,000 young objects at full speed. With the
    default threshold the collector ran a pass every 70 messages and scanned them over and over
    (perf: 10 % of ingest's CPU in the collector). With room for 50,000 allocations between
    passes most objects are gone before any pass sees them; what start-up allocated (modules,
    classes, settings) lives as long as the process and is frozen out of every pass. Ingest
    makes no reference cycles in its steady state, so memory does not grow (the older
    generations keep their thresholds)."""
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(_YOUNG_OBJECTS_PER_COLLECTION, older, oldest)


async def run(settings: IngestSettings, *, retire: bool = False) -> None:
    """Run until SIGTERM/SIGINT (or, retiring, until drained). Raises FatalError on bad config."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await IngestService(settings, stop, retire=retire).run()


class IngestService:
    def __init__(
        self, settings: IngestSettings, stop: asyncio.Event, *, retire: bool = False
    ) -> None:
        self.settings = settings
        self.stop = stop
        self.retire = retire
        """Take what the broker still holds for this client id, then end its session."""
        self.retired = False
        self.committing = 0
        # Batches taken from the backlog and not yet committed: id -> (messages, oldest arrival).
        self._in_process: dict[int, tuple[int, float]] = {}
        self.metrics = IngestMetrics()
        self.backlog = Backlog(
            settings.ingest_backlog_max_messages, settings.ingest_batch_max_messages
        )
        self.metrics.backlog_capacity.set(self.backlog.capacity)
        self.health = Health(settings.ingest_stall_timeout_s, waiting=self.waiting)
        self.health.check("mqtt", False, "not connected to the MQTT broker")
        self.health.check("database", False, "database unavailable")

    def waiting(self) -> tuple[int, float | None]:
        """Messages received and not yet committed, and when the oldest arrived. Called from
        the health server's thread too: reads only, each read atomic under the GIL."""
        batches = list(self._in_process.values())
        count = len(self.backlog) + sum(n for n, _ in batches)
        arrivals = [t for _, t in batches]
        head = self.backlog.oldest_received_at()
        if head is not None:
            arrivals.append(head)
        return count, min(arrivals, default=None)

    async def run(self) -> None:
        settings = self.settings
        try:
            target = settings.require_mqtt()
            database_url = settings.require_database_url()
        except ConfigError as exc:
            raise FatalError(str(exc)) from exc
        if self.retire and settings.mqtt_protocol != "5":
            raise FatalError("--retire needs MQTT 5 (a session can end only by expiry there)")
        async with AsyncExitStack() as stack:
            if settings.metrics_port:
                stack.callback(
                    serve(
                        self.health,
                        self.metrics.registry,
                        settings.metrics_host,
                        settings.metrics_port,
                    )
                )
                log.info("metrics_listening", port=settings.metrics_port)
            pool = await self._open_pool(database_url)
            if pool is None:
                return
            stack.push_async_callback(pool.close)
            writer = await self._make_writer(pool)
            if settings.mqtt_share_group:
                log.info(
                    "mqtt_shared_subscription",
                    group=settings.mqtt_share_group,
                    note="mosquitto 2.0 does not restore $share subscriptions after a broker "
                    "restart: what is published before ingest re-subscribes is lost (and "
                    "flagged as sequence gaps); one instance loses nothing on a plain one",
                )
            bridge = MqttBridge(
                target=target,
                client_id=settings.mqtt_client_id,
                topics=settings.topics(),
                backlog=self.backlog,
                protocol=settings.mqtt_protocol,
                session_expiry_s=settings.mqtt_session_expiry_s,
                receive_maximum=settings.mqtt_receive_maximum,
                keepalive_s=settings.mqtt_keepalive_s,
                reconnect_max_delay_s=settings.mqtt_reconnect_max_delay_s,
                on_connection_change=self._connection_changed,
                on_pause=self.metrics.reading_paused.inc,
                on_publish_refused=self.metrics.backfill_refused.inc,
                retiring=self.retire,
            )
            if not await self._start_bridge(bridge):
                return
            stack.push_async_callback(lambda: bridge.stop(end_session=self.retired))
            backfill = Backfill(
                pool,
                BackfillConfig(
                    give_up_after_s=settings.backfill_give_up_after_s,
                    retry_initial_s=settings.backfill_retry_initial_s,
                    retry_max_s=settings.backfill_retry_max_s,
                    poll_interval_s=settings.backfill_poll_interval_s,
                    batch_max_gaps=settings.backfill_batch_max_gaps,
                    command_topic=settings.command_topic,
                ),
                self.metrics,
                publish=bridge.publish,
                connected=lambda: bridge.subscribed,
            )
            writer.on_gaps_opened = backfill.wake
            await self._serve(writer, bridge, backfill)

    async def _open_pool(self, url: str) -> asyncpg.Pool | None:
        """Connect, waiting while the database is unavailable; None if stopped meanwhile."""
        try:
            pool = await open_pool(
                url,
                application_name="pumpwatch-ingest",
                stop=self.stop,
                min_size=1,
                max_size=self.settings.ingest_commits_in_flight + 1,
                init=prepare_connection,
                reset=keep_session,  # the staging tables are all the session holds
            )
        except DatabaseRejected as exc:
            raise FatalError(f"the database refused the connection: {exc}") from exc
        if pool is not None:
            self.health.check("database", True, "")
            self.metrics.database_up.set(1)
        return pool

    async def _make_writer(self, pool: asyncpg.Pool) -> BatchWriter:
        settings = self.settings
        async with pool.acquire() as conn:
            todo = await migrate.pending(conn)
        if todo:
            raise FatalError(
                f"the database schema is not current ({len(todo)} migrations pending): "
                "run `pumpwatch migrate` first"
            )
        retention = settings.readings_retention_days
        writer = BatchWriter(
            pool,
            WriterConfig(
                topic_prefix=settings.mqtt_topic_prefix.strip("/"),
                max_future=timedelta(seconds=settings.ingest_clock_skew_max_s),
                oldest_recorded_at=settings.ingest_oldest_recorded_at,
                retention=timedelta(days=retention) if retention else None,
                live_window_s=settings.ingest_live_window_s,
                gap_settle_s=settings.backfill_settle_s,
            ),
            self.metrics,
        )
        await writer.maintain(settings.partitions_ahead_months)
        return writer

    async def _start_bridge(self, bridge: MqttBridge) -> bool:
        """Connect to the broker unless stopped first; bad credentials raise MqttRejected."""
        starting = asyncio.create_task(bridge.start())
        stopping = asyncio.create_task(self.stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            await bridge.stop()
            return False
        starting.result()
        return True

    def _connection_changed(self, up: bool) -> None:
        self.health.check("mqtt", up, "not connected to the MQTT broker")
        self.metrics.mqtt_connected.set(1 if up else 0)

    async def _serve(self, writer: BatchWriter, bridge: MqttBridge, backfill: Backfill) -> None:
        consumer = asyncio.create_task(self._consume(writer, bridge), name="consume")
        helpers = [
            asyncio.create_task(self._heartbeat(bridge), name="heartbeat"),
            asyncio.create_task(self._maintenance(writer), name="maintenance"),
        ]
        if not self.retire:
            # A retiring instance only drains its session; the others ask for what is missing.
            helpers.append(asyncio.create_task(backfill.run(), name="backfill"))
        if self.retire:
            helpers.append(asyncio.create_task(self._retire_when_drained(bridge), name="retire"))
        stopper = asyncio.create_task(self.stop.wait(), name="stop")
        done, _ = await asyncio.wait(
            {consumer, stopper, *helpers}, return_when=asyncio.FIRST_COMPLETED
        )
        log.info("ingest_stopping", backlog=len(self.backlog))
        bridge.halt_reading()
        self.backlog.close()
        if not consumer.done():
            try:
                await asyncio.wait_for(consumer, self.settings.ingest_drain_timeout_s)
            except TimeoutError:
                log.warning(
                    "drain_timed_out",
                    left_unacked=len(self.backlog),
                    note="the broker redelivers them",
                )
        for task in (*helpers, stopper):
            task.cancel()
        for task in done:
            if task is not stopper:
                task.result()  # re-raise what ended a worker task early
        log.info("ingest_stopped")

    async def _consume(self, writer: BatchWriter, bridge: MqttBridge) -> None:
        """Judge the next batch while earlier ones commit: Python and PostgreSQL work side by
        side. Up to ``ingest_commits_in_flight`` batches commit at once, each on its own
        connection; with more than one, a later batch may commit first, so a sequence gap can
        open for a moment until the earlier batch fills it (as with several instances)."""
        wait_s = self.settings.ingest_batch_max_wait_ms / 1000
        committing: list[asyncio.Task[None]] = []
        while True:
            batch = await self.backlog.take(wait_s)
            if not batch and self.backlog.closed:
                break
            if not batch:
                continue
            self._count_received(batch)
            self._in_process[id(batch)] = (len(batch), min(i.received_at for i in batch))
            prepared = await writer.prepare(batch)
            if len(committing) >= self.settings.ingest_commits_in_flight:
                await committing.pop(0)
            committing.append(asyncio.create_task(self._store(writer, bridge, prepared)))
        for task in committing:
            await task

    def _count_received(self, batch: list[Incoming]) -> None:
        kinds = Counter(_topic_kind(incoming.topic) for incoming in batch)
        for kind, count in kinds.items():
            self.metrics.received.labels(kind=kind).inc(count)

    async def _store(self, writer: BatchWriter, bridge: MqttBridge, prepared: Prepared) -> None:
        """Commit the batch, retrying while the database is unavailable, then ack it."""
        self.committing += 1
        try:
            await self._commit_with_retries(writer, prepared)
        finally:
            self.committing -= 1
        self._in_process.pop(id(prepared.batch), None)
        bridge.ack(prepared.batch)

    async def _commit_with_retries(self, writer: BatchWriter, prepared: Prepared) -> None:
        delay = 0.1
        while True:
            try:
                await writer.store(prepared)
                break
            except StoreUnavailable as exc:
                self.health.check("database", False, "database unavailable")
                self.metrics.database_up.set(0)
                self.metrics.store_retries.inc()
                log.warning(
                    "store_failed",
                    error=str(exc),
                    batch=len(prepared.batch),
                    retry_in_s=round(delay, 2),
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        self.health.check("database", True, "")
        self.health.progressed()

    async def _retire_when_drained(self, bridge: MqttBridge) -> None:
        """Unsubscribed, the session receives nothing new: once what it held has been stored
        and nothing arrived for a while, the session can end without losing a message."""
        idle_s = self.settings.ingest_retire_idle_s
        quiet_since = time.monotonic()
        seen = bridge.last_message_at
        while True:
            await asyncio.sleep(0.2)
            if bridge.last_message_at != seen or not bridge.subscribed:
                seen, quiet_since = bridge.last_message_at, time.monotonic()
                continue
            drained = not self.backlog and self.committing == 0
            if drained and time.monotonic() - quiet_since >= idle_s:
                received = sum(
                    int(
                        self.metrics.registry.get_sample_value(
                            "pumpwatch_ingest_messages_received_total", {"kind": kind}
                        )
                        or 0
                    )
                    for kind in ("telemetry", "events", "unknown")
                )
                log.info(
                    "session_retired",
                    client_id=self.settings.mqtt_client_id,
                    drained_messages=received,
                )
                self.retired = True
                self.stop.set()
                return

    async def _heartbeat(self, bridge: MqttBridge) -> None:
        while True:
            self.health.tick()
            if bridge.connected:
                self.health.check("mqtt", bridge.subscribed, "not subscribed yet")
            self.metrics.backlog.set(self.waiting()[0])
            await asyncio.sleep(1.0)

    async def _maintenance(self, writer: BatchWriter) -> None:
        """The open-gap gauges often; partitions and retention now and then."""
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.settings.ingest_gauge_interval_s)
            try:
                await writer.count_open_gaps()
                if time.monotonic() - last >= self.settings.ingest_maintenance_interval_s:
                    last = time.monotonic()
                    await writer.maintain(self.settings.partitions_ahead_months)
            except DATABASE_ERRORS as exc:
                log.warning("maintenance_failed", error=str(exc))


def _topic_kind(topic: str) -> str:
    if topic.endswith("/telemetry"):
        return "telemetry"
    if topic.endswith("/events"):
        return "events"
    return "unknown"
