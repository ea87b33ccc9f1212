"""Running the notification worker: :func:`work` (its connection pool, senders and loops until
told to stop), shared by both places it runs.

``pumpwatch notify`` runs it on the process's own event loop
(:mod:`services.notify.service`). ``pumpwatch alerts`` runs it on an event loop and thread
of its own (:class:`NotifyThread`, a part the command line gives it) unless
``PUMPWATCH_NOTIFY_ENABLED=false``. Evaluating a batch
of pumps runs the rules in Python between database round trips; on the alert service's loop those
stretches would hold up every notification behind them (measured by ``pumpwatch bench webhooks``:
p50 0.8 s commit → webhook with batches of 200 pumps). On its own thread the worker is scheduled
between them (the interpreter switches threads every few milliseconds), with a small connection
pool of its own. It shares the metrics registry (whose updates are thread-safe) and the stop
signal. The thread still shares the interpreter lock with the evaluation: under heavy load a
separate ``pumpwatch notify`` process delivers sooner.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable

import asyncpg
from prometheus_client import CollectorRegistry

from services.logs import get
from services.notify.metrics import NotifyMetrics
from services.notify.settings import NotifySettings
from services.notify.worker import Notifications
from services.parts import PartFactory
from services.storage.database import open_pool

log = get(__name__)


async def work(
    settings: NotifySettings,
    metrics: NotifyMetrics,
    database_url: str,
    stop: asyncio.Event,
    *,
    on_pool: Callable[[asyncpg.Pool], Awaitable[None]] | None = None,
    retry_rejected: bool = True,
) -> None:
    """The notification worker until ``stop`` is set: opens its pool (retrying while the
    database is unavailable), calls ``on_pool`` with it, then runs the worker's loops; returns
    once they finished (deliveries in flight complete, for a while). Raises what ended a loop
    early, and, unless ``retry_rejected``, :class:`DatabaseRejected`."""
    pool = await open_pool(
        database_url,
        application_name="pumpwatch-alerts-notify",
        stop=stop,
        min_size=2,
        max_size=max(4, min(settings.notify_concurrency, 10)),
        retry_rejected=retry_rejected,
    )
    if pool is None:
        return
    try:
        if on_pool is not None:
            await on_pool(pool)
        async with Notifications(
            pool, settings, metrics, stop=stop, database_url=database_url
        ) as notifications:
            tasks = [asyncio.create_task(loop) for loop in notifications.loops()]
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in tasks:
                task.cancel()
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
    finally:
        await pool.close()


class NotifyThread:
    """:func:`work` on an event loop and thread of its own, inside ``pumpwatch alerts``."""

    def __init__(
        self,
        settings: NotifySettings,
        metrics: NotifyMetrics,
        database_url: str,
        *,
        on_failure: Callable[[str], None],
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.database_url = database_url
        self.on_failure = on_failure
        """Called (from this thread) if the worker ends with an error."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="notify", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._started.wait(10)

    def stop(self) -> None:
        """Ask the worker to finish (deliveries in flight complete, for a while)."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)

    def join(self, timeout_s: float) -> bool:
        """Wait for the thread; False if it is still running after ``timeout_s``."""
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception as exc:  # the alert evaluation goes on; readiness says why not
            log.exception("notify_worker_crashed")
            self.on_failure(f"notification worker stopped: {type(exc).__name__}: {exc}")

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        stop = self._stop = asyncio.Event()
        self._started.set()
        await work(self.settings, self.metrics, self.database_url, stop)


def part(settings: NotifySettings) -> PartFactory:
    """The worker as a part of another service's process (``pumpwatch alerts``, which checked
    the database URL before it builds its parts): its metrics on the host's registry."""

    def make(registry: CollectorRegistry, on_failure: Callable[[str], None]) -> NotifyThread:
        return NotifyThread(
            settings,
            NotifyMetrics(registry),
            settings.require_database_url(),
            on_failure=on_failure,
        )

    return make
