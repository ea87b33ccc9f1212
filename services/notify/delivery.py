"""Delivering: due deliveries are claimed under a lease (``next_attempt_at`` moved to the
lease's end, committed), sent by their channel's sender, and their outcome recorded with the
attempt (:mod:`services.notify.outcome`). A process that dies mid-delivery leaves the claim
behind; when the lease runs out any instance sends it again and records the lost attempt as
``interrupted``. So every delivery is made at least once; receivers dedupe on its id.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from datetime import datetime

import asyncpg

from services.logs import get
from services.notify import sql
from services.notify.channel import Message, Result, Sender
from services.notify.claimed import Claimed
from services.notify.metrics import NotifyMetrics
from services.notify.outcome import Outcomes
from services.notify.settings import NotifySettings
from services.notify.timing import Clock, pause, wait
from services.storage.database import DATABASE_ERRORS

log = get(__name__)

_MIN_WAIT_S = 0.02
_DRAIN_S = 15.0


class Deliveries:
    """Claims due deliveries and attempts them, up to ``notify_concurrency`` at once, with the
    ``senders`` by channel; ``wake`` is set when deliveries may be due."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        settings: NotifySettings,
        metrics: NotifyMetrics,
        *,
        senders: Mapping[str, Sender],
        outcomes: Outcomes,
        clock: Clock,
        wake: asyncio.Event,
        stop: asyncio.Event,
    ) -> None:
        self.pool = pool
        self.settings = settings
        self.metrics = metrics
        self.senders = senders
        self.outcomes = outcomes
        self.clock = clock
        self.wake = wake
        self.stop = stop
        self._inflight: set[asyncio.Task[None]] = set()

    async def deliver_due(self) -> int:
        """Claim what is due now (up to the free concurrency) and start sending it; returns how
        many were claimed."""
        free = self.settings.notify_concurrency - len(self._inflight)
        if free <= 0:
            return 0
        now = self.clock()
        rows = await self.pool.fetch(
            sql.CLAIM_DELIVERIES, now, free, float(self.settings.notify_lease_s)
        )
        for row in rows:
            task = asyncio.create_task(self._attempt(Claimed.of(row)), name="notify-attempt")
            self._inflight.add(task)
            task.add_done_callback(self._attempt_done)
        return len(rows)

    async def settle(self) -> None:
        """Wait for the attempts in flight."""
        while self._inflight:
            await asyncio.wait(set(self._inflight))

    def _attempt_done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self.wake.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("notify_attempt_crashed", error=repr(task.exception()))

    async def loop(self) -> None:
        """Deliver until ``stop``, then finish the attempts in flight (for a while)."""
        delay = 0.1
        try:
            while not self.stop.is_set():
                self.wake.clear()
                free = self.settings.notify_concurrency - len(self._inflight)
                try:
                    claimed = await self.deliver_due()
                    wait_s = await self._until_next_due()
                except DATABASE_ERRORS as exc:
                    log.warning("notify_claim_failed", error=str(exc), retry_in_s=round(delay, 2))
                    await pause(self.stop, delay)
                    delay = min(delay * 2, 10.0)
                    continue
                delay = 0.1
                if free > 0 and claimed == free:
                    continue  # more may be due
                await wait(self.wake, self.stop, wait_s)
        finally:
            if self._inflight:
                await asyncio.wait(set(self._inflight), timeout=_DRAIN_S)

    async def _until_next_due(self) -> float:
        poll = self.settings.notify_poll_interval_s
        next_due: datetime | None = await self.pool.fetchval(sql.NEXT_DUE)
        if next_due is None:
            return poll
        seconds = (next_due - self.clock()).total_seconds()
        return min(poll, max(_MIN_WAIT_S, seconds))

    async def _attempt(self, d: Claimed) -> None:
        started_at = self.clock()
        if d.webhook_gone is not None:
            await self.outcomes.record(d, None, started_at, 0.0, cancel=d.webhook_gone)
            return
        target = d.webhook_url if d.channel == "webhook" and d.webhook_url else d.target
        message = Message(
            delivery_id=d.id,
            message_id=d.key,
            event=d.event,
            target=target,
            payload=d.payload,
            attempt=d.attempts,
            keys=d.keys,
        )
        sender = self.senders.get(d.channel)
        started = time.perf_counter()
        if sender is None:
            result = Result("error", error=f"the {d.channel} channel is not configured")
        else:
            try:
                result = await asyncio.wait_for(
                    sender.send(message), self.settings.notify_lease_s * 0.8
                )
            except TimeoutError:
                result = Result("timeout", error="the attempt outlasted its lease")
            except Exception as exc:  # a channel's bug must not lose the delivery
                log.exception("notify_send_crashed", channel=d.channel, delivery_id=d.id)
                result = Result("error", error=f"{type(exc).__name__}: {exc}"[:500])
        duration = time.perf_counter() - started
        self.metrics.attempts.labels(channel=d.channel, outcome=result.outcome).inc()
        self.metrics.attempt_seconds.labels(channel=d.channel).observe(duration)
        await self.outcomes.record(d, result, started_at, duration)
