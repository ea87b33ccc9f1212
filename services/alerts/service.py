"""``pumpwatch alerts``: evaluates pumps when their data changes and on a schedule.

Ingest's ``NOTIFY pumpwatch_ingest`` (sent after each commit, naming the pumps) queues those
pumps; a worker evaluates the queue in batches, so a change is judged within a second. A sweep
queues every pump now and then, for the rules that time alone sets off, and at start and after a
lost notification connection, so nothing is missed while the service was away. Several
instances may run: evaluations of a pump are serialised by an advisory lock and the database
allows one unresolved alert per pump and rule.

The same process may run parts beside the evaluation, each on a thread of its own
(:mod:`services.parts`): the command line gives it the notification worker
(``services.notify.runner``) unless ``PUMPWATCH_NOTIFY_ENABLED=false`` — then ``pumpwatch
notify`` runs the worker in a process of its own, where the evaluation's CPU-bound batches
cannot hold it up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from contextlib import AsyncExitStack
from datetime import timedelta

import asyncpg

from services.alerts import sql
from services.alerts.engine import Engine
from services.alerts.metrics import AlertsMetrics
from services.alerts.settings import AlertsSettings
from services.errors import FatalError
from services.health import Health, serve_or_fail
from services.logs import get
from services.parts import Part, PartFactory
from services.settings import ConfigError
from services.storage import channels, migrate
from services.storage.database import (
    DATABASE_ERRORS,
    Connection,
    DatabaseRejected,
    DatabaseUnavailable,
    connect,
    open_pool,
)

log = get(__name__)


async def run(settings: AlertsSettings, parts: tuple[PartFactory, ...] = ()) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await AlertsService(settings, stop, parts).run()


class AlertsService:
    def __init__(
        self, settings: AlertsSettings, stop: asyncio.Event, parts: tuple[PartFactory, ...] = ()
    ) -> None:
        self.settings = settings
        self.stop = stop
        self.parts = parts
        self.metrics = AlertsMetrics()
        # Pumps to evaluate -> when they were first queued (Unix time); insertion ordered.
        self.pending: dict[str, float] = {}
        self._wake = asyncio.Event()
        self._sweep_now = asyncio.Event()
        self.health = Health(settings.alerts_stall_timeout_s, waiting=self._waiting)
        self.health.check("database", False, "database unavailable")
        self.health.check("listen", False, "not listening for ingest's notifications")

    def _waiting(self) -> tuple[int, float | None]:
        queued = list(self.pending.values())
        return len(queued), min(queued, default=None)

    def queue(self, serials: list[str]) -> None:
        now = time.time()
        for serial in serials:
            self.pending.setdefault(serial, now)
        self.metrics.pending.set(len(self.pending))
        self._wake.set()

    async def run(self) -> None:
        settings = self.settings
        try:
            database_url = settings.require_database_url()
        except ConfigError as exc:
            raise FatalError(str(exc)) from exc
        async with AsyncExitStack() as stack:
            if settings.metrics_port:
                stack.callback(
                    serve_or_fail(
                        self.health,
                        self.metrics.registry,
                        settings.metrics_host,
                        settings.metrics_port,
                    )
                )
            pool = await self._open_pool(database_url)
            if pool is None:
                return
            stack.push_async_callback(pool.close)
            async with pool.acquire() as conn:
                if await migrate.pending(conn):
                    raise FatalError(
                        "the database schema is not current: run `pumpwatch migrate` first"
                    )
            engine = Engine(
                pool,
                settings=settings.rules,
                flap_window=timedelta(seconds=settings.alerts_flap_window_s),
                data_clock=settings.alerts_clock == "data",
                metrics=self.metrics,
            )
            tasks = [
                asyncio.create_task(self._listen(database_url), name="listen"),
                asyncio.create_task(self._sweep(pool), name="sweep"),
                asyncio.create_task(self._heartbeat(), name="heartbeat"),
            ]
            worker = asyncio.create_task(self._work(engine), name="evaluate")
            started = self._start_parts()
            stopper = asyncio.create_task(self.stop.wait())
            done, _ = await asyncio.wait(
                {worker, stopper, *tasks}, return_when=asyncio.FIRST_COMPLETED
            )
            log.info("alerts_stopping", pending=len(self.pending))
            self.stop.set()
            self._wake.set()
            for part in started:
                part.stop()  # e.g. deliveries in flight finish, their outcome recorded
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(worker), 30)
            for part in started:
                if not await asyncio.to_thread(part.join, 30):
                    log.warning("part_still_running", part=type(part).__name__)
            for task in (*tasks, stopper, worker):
                task.cancel()
            for task in done:
                if task is not stopper and not task.cancelled():
                    task.result()  # re-raise what ended a task early
            log.info("alerts_stopped")

    def _start_parts(self) -> list[Part]:
        loop = asyncio.get_running_loop()

        def failed(problem: str) -> None:
            loop.call_soon_threadsafe(self.health.check, "part", False, problem)

        started = []
        for make in self.parts:
            part = make(self.metrics.registry, failed)
            part.start()
            started.append(part)
        return started

    async def _open_pool(self, url: str) -> asyncpg.Pool | None:
        try:
            pool = await open_pool(
                url, application_name="pumpwatch-alerts", stop=self.stop, min_size=1, max_size=3
            )
        except DatabaseRejected as exc:
            raise FatalError(f"the database refused the connection: {exc}") from exc
        if pool is not None:
            self.health.check("database", True, "")
            self.metrics.database_up.set(1)
        return pool

    async def _listen(self, url: str) -> None:
        """Hold a LISTEN connection; after losing one, sweep (notifications may be lost)."""
        delay = 0.2
        while True:
            lost = asyncio.Event()
            try:
                conn = await connect(url, application_name="pumpwatch-alerts-listen")
            except (DatabaseUnavailable, DatabaseRejected) as exc:
                log.warning("listen_unavailable", error=str(exc), retry_in_s=round(delay, 2))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            delay = 0.2
            conn.add_termination_listener(lambda _, lost=lost: lost.set())
            await conn.add_listener(channels.INGEST, self._on_notify)
            self.health.check("listen", True, "")
            self._sweep_now.set()  # anything that changed while we were not listening
            log.info("listening", channel=channels.INGEST)
            try:
                await lost.wait()
            finally:
                self.health.check("listen", False, "not listening for ingest's notifications")
                with contextlib.suppress(Exception):
                    await conn.close()
            log.warning("listen_connection_lost")

    def _on_notify(self, conn: Connection, pid: int, channel: str, payload: object) -> None:
        self.metrics.notifications.inc()
        try:
            serials = json.loads(str(payload))["serials"]
        except (ValueError, KeyError, TypeError):
            serials = None
        if serials is None:
            self._sweep_now.set()  # "many pumps changed": look at them all
        else:
            self.queue([s for s in serials if isinstance(s, str)])

    async def _sweep(self, pool: asyncpg.Pool) -> None:
        self._sweep_now.set()  # at start: catch up on what happened while we were away
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._sweep_now.wait(), self.settings.alerts_sweep_interval_s
                )
            self._sweep_now.clear()
            try:
                serials = [r["serial"] for r in await pool.fetch(sql.ALL_SERIALS)]
            except DATABASE_ERRORS as exc:
                log.warning("sweep_failed", error=str(exc))
                self._sweep_now.set()
                await asyncio.sleep(1.0)
                continue
            self.metrics.sweeps.inc()
            self.queue(serials)

    async def _work(self, engine: Engine) -> None:
        batch_size = self.settings.alerts_batch_max_pumps
        delay = 0.1
        while not self.stop.is_set():
            if not self.pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            serials = list(self.pending)[:batch_size]
            for serial in serials:
                del self.pending[serial]
            try:
                await engine.evaluate(serials)
            except DATABASE_ERRORS as exc:
                # Put them back first in line, keeping when they were queued.
                self.pending = dict.fromkeys(serials, time.time()) | self.pending
                self.health.check("database", False, "database unavailable")
                self.metrics.database_up.set(0)
                log.warning(
                    "evaluation_failed",
                    error=str(exc),
                    pumps=len(serials),
                    retry_in_s=round(delay, 2),
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            delay = 0.1
            self.health.check("database", True, "")
            self.metrics.database_up.set(1)
            self.health.progressed()
            self.metrics.pending.set(len(self.pending))

    async def _heartbeat(self) -> None:
        while True:
            self.health.tick()
            await asyncio.sleep(1.0)
