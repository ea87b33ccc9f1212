"""``pumpwatch notify``: the notification worker alone, in a process of its own.

The same worker ``pumpwatch alerts`` runs on a thread unless ``PUMPWATCH_NOTIFY_ENABLED=false``
(:func:`services.notify.runner.work`: outbox fan-out, deliveries, escalation, the daily
digest), here on the process's event loop, so the alert engine's CPU-bound evaluation batches
cannot hold deliveries up. Several instances may run beside each other and beside alert
services that deliver: outbox rows are taken with ``FOR UPDATE SKIP LOCKED`` and deliveries
claimed under leases.

Its own /metrics (the worker's ``pumpwatch_alerts_notify_*``), /healthz (the event loop turns)
and /readyz (the database answered and its schema is current) on ``PUMPWATCH_METRICS_PORT``
(9103). SIGTERM/SIGINT: stop taking work, finish the deliveries in flight (for a while) and
record their outcome, exit 0.
"""

from __future__ import annotations

import asyncio
import signal
from contextlib import AsyncExitStack

import asyncpg

from services.errors import FatalError
from services.health import Health, serve_or_fail
from services.logs import get
from services.notify.metrics import NotifyMetrics
from services.notify.runner import work
from services.notify.settings import NotifySettings
from services.settings import ConfigError
from services.storage import migrate
from services.storage.database import DatabaseRejected

log = get(__name__)

STALL_TIMEOUT_S = 60.0
"""/healthz fails when the event loop has not turned for this long."""


async def run(settings: NotifySettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await NotifyService(settings, stop).run()


class NotifyService:
    def __init__(self, settings: NotifySettings, stop: asyncio.Event) -> None:
        self.settings = settings
        self.stop = stop
        self.metrics = NotifyMetrics()
        self.health = Health(STALL_TIMEOUT_S)
        self.health.check("database", False, "database unavailable")

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
            heartbeat = asyncio.create_task(self._heartbeat(), name="heartbeat")
            stack.callback(heartbeat.cancel)
            try:
                await work(
                    settings,
                    self.metrics,
                    database_url,
                    self.stop,
                    on_pool=self._opened,
                    retry_rejected=False,
                )
            except DatabaseRejected as exc:
                raise FatalError(f"the database refused the connection: {exc}") from exc
            log.info("notify_stopped")

    async def _opened(self, pool: asyncpg.Pool) -> None:
        async with pool.acquire() as conn:
            if await migrate.pending(conn):
                raise FatalError(
                    "the database schema is not current: run `pumpwatch migrate` first"
                )
        self.health.check("database", True, "")
        log.info("notify_ready")

    async def _heartbeat(self) -> None:
        while True:
            self.health.tick()
            await asyncio.sleep(1.0)
