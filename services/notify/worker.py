"""The notification worker: outbox → deliveries → attempts, as tasks of ``pumpwatch notify`` or
of a thread of ``pumpwatch alerts`` (:mod:`services.notify.runner`).

Fan-out (:mod:`services.notify.fanout`): outbox events become one delivery per channel target by
the clinic's routing; the worker wakes on the outbox trigger's NOTIFY, and also polls.

Delivering (:mod:`services.notify.delivery`): due deliveries are claimed under a lease and
sent; their outcome (:mod:`services.notify.outcome`) is recorded with the attempt — delivered,
retried later with backoff, or failed, when the clinic's admins are told and a webhook failing
too often is disabled. Every delivery is made at least once; receivers dedupe on its id.

Schedules (:mod:`services.notify.schedules`): the escalation check, the daily digests and the
backlog gauges, each run at its interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable, Coroutine
from typing import Any

import asyncpg

from services.logs import get
from services.notify import fanout, schedules
from services.notify.backoff import RetryPolicy
from services.notify.channel import Sender
from services.notify.delivery import Deliveries
from services.notify.email import EmailSender
from services.notify.escalation import escalate
from services.notify.metrics import NotifyMetrics
from services.notify.mqtt import MqttSender
from services.notify.outcome import Outcomes
from services.notify.settings import NotifySettings
from services.notify.timing import Clock, wall_clock
from services.notify.webhooks import Resolver, WebhookSender
from services.settings import ConfigError

__all__ = ["Clock", "Notifications", "wall_clock"]  # Clock: what tests pass as ``clock``

log = get(__name__)


class Notifications:
    """Owns the senders and runs the loops; ``async with`` opens and closes the senders."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        settings: NotifySettings,
        metrics: NotifyMetrics,
        *,
        stop: asyncio.Event,
        database_url: str | None = None,
        clock: Clock = wall_clock,
        resolver: Resolver | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.pool = pool
        self.settings = settings
        self.metrics = metrics
        self.stop = stop
        self.database_url = database_url
        self.clock = clock
        self.rand = rand
        self.resolver = resolver
        self.policy = RetryPolicy(
            first_s=settings.notify_retry_first_s,
            max_s=settings.notify_retry_max_s,
            jitter_fraction=settings.notify_retry_jitter_fraction,
            window_s=settings.notify_retry_window_s,
        )
        self.senders: dict[str, Sender] = {}
        self.mqtt_enabled = False
        self._outbox_wake = asyncio.Event()
        self._deliver_wake = asyncio.Event()
        self.outcomes = Outcomes(
            pool, settings, metrics, policy=self.policy, clock=clock, rand=rand
        )
        self.deliveries = Deliveries(
            pool,
            settings,
            metrics,
            senders=self.senders,
            outcomes=self.outcomes,
            clock=clock,
            wake=self._deliver_wake,
            stop=stop,
        )
        self.digests = schedules.Digests(
            pool, settings, metrics, clock=clock, wake=self._deliver_wake
        )

    async def __aenter__(self) -> Notifications:
        settings = self.settings
        self.senders["webhook"] = WebhookSender(
            allow_hosts=settings.allow_hosts(),
            timeout_s=settings.webhook_timeout_s,
            resolver=self.resolver,
            max_connections=max(settings.notify_concurrency, 10),
        )
        self.senders["email"] = EmailSender(
            settings.smtp(),
            sender=settings.smtp_from,
            starttls=settings.smtp_starttls,
            timeout_s=settings.smtp_timeout_s,
        )
        if settings.mqtt_url:
            try:
                target = settings.require_mqtt()
            except ConfigError as exc:  # pragma: no cover - validated with the settings
                log.error("notify_mqtt_unconfigured", error=str(exc))
            else:
                mqtt = MqttSender(
                    target, timeout_s=settings.notify_mqtt_timeout_s, metrics=self.metrics
                )
                mqtt.start()
                self.senders["mqtt"] = mqtt
                self.mqtt_enabled = True
        smtp = settings.smtp()
        log.info(
            "notify_started",
            channels=sorted(self.senders),
            smtp=None if smtp is None else smtp.redacted(),
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        for sender in reversed(list(self.senders.values())):
            with contextlib.suppress(Exception):
                await sender.aclose()

    def loops(self, *, scheduled: bool = True) -> list[Coroutine[Any, Any, None]]:
        """The worker's tasks; they return when ``stop`` is set (deliveries in flight are
        finished first, for a while). ``scheduled``: with the escalation and digest checks
        (tests run those steps themselves, on their own clock)."""
        every = schedules.every
        loops = [
            fanout.loop(self.fanout_once, self.settings, wake=self._outbox_wake, stop=self.stop),
            self.deliveries.loop(),
            every(
                self.settings.notify_gauge_interval_s, self.count_backlog, "gauges", stop=self.stop
            ),
        ]
        if scheduled:
            loops += [
                every(
                    self.settings.notify_escalation_check_s,
                    self.escalate_now,
                    "escalation",
                    stop=self.stop,
                ),
                every(
                    self.settings.notify_digest_check_s, self.make_digests, "digest", stop=self.stop
                ),
            ]
        if self.database_url:
            loops.append(fanout.listen(self.database_url, wake=self._outbox_wake, stop=self.stop))
        return loops

    def wake(self) -> None:
        self._outbox_wake.set()
        self._deliver_wake.set()

    # -- fan-out -------------------------------------------------------------------------------

    async def fanout_once(self) -> int:
        """Turn up to a batch of outbox events into deliveries (one transaction); returns how
        many events were taken."""
        return await fanout.fan_out(
            self.pool,
            self.settings,
            self.metrics,
            now=self.clock(),
            mqtt_enabled=self.mqtt_enabled,
            deliveries_wake=self._deliver_wake,
        )

    # -- delivering ----------------------------------------------------------------------------

    async def deliver_due(self) -> int:
        """Claim what is due now (up to the free concurrency) and start sending it; returns how
        many were claimed."""
        return await self.deliveries.deliver_due()

    async def settle(self) -> None:
        """Wait for the attempts in flight."""
        await self.deliveries.settle()

    # -- escalation, digests, gauges -----------------------------------------------------------

    async def escalate_now(self) -> int:
        return await escalate(self.pool, now=self.clock(), metrics=self.metrics)

    async def make_digests(self) -> int:
        """Make the digests due now that are not made yet; returns how many clinics got one."""
        return await self.digests.make()

    async def count_backlog(self) -> None:
        await schedules.count_backlog(self.pool, self.metrics, self.clock)
