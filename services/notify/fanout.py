"""Fan-out: outbox events → deliveries.

Outbox rows (written in the transaction of the change they announce) are taken oldest first with
``FOR UPDATE SKIP LOCKED`` — several instances take disjoint rows — and turned, in the same
transaction, into one delivery per channel target by the clinic's routing
(:mod:`services.notify.routing`); the row is then marked dispatched. A trigger NOTIFYs
``pumpwatch_outbox`` at each commit, so the worker wakes at once (:func:`listen`); it also polls.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from datetime import datetime, tzinfo
from typing import Any

import asyncpg

from services.domain.notifications import ALERT_EVENTS, NotificationSettings
from services.logs import get
from services.notify import sql
from services.notify.clinic import clinic_settings, zone
from services.notify.metrics import NotifyMetrics
from services.notify.mqtt import alerts_topic
from services.notify.render import EmailContent, PatientRef, admin_email, alert_email
from services.notify.routing import Event, WebhookTarget, message_id, plan
from services.notify.settings import NotifySettings
from services.notify.timing import iso, pause, wait
from services.storage import channels
from services.storage.database import (
    DATABASE_ERRORS,
    Connection,
    DatabaseRejected,
    DatabaseUnavailable,
    connect,
)

log = get(__name__)


async def fan_out(
    pool: asyncpg.Pool,
    settings: NotifySettings,
    metrics: NotifyMetrics,
    *,
    now: datetime,
    mqtt_enabled: bool,
    deliveries_wake: asyncio.Event,
) -> int:
    """Turn up to a batch of outbox events into deliveries (one transaction); returns how
    many events went out (an event that failed stays, and is not counted: a batch of failures
    does not spin the loop). Sets ``deliveries_wake`` when it made deliveries."""
    mqtt_prefix = settings.mqtt_topic_prefix if mqtt_enabled else None
    async with pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(sql.CLAIM_OUTBOX, settings.notify_batch_max_events)
        if not rows:
            return 0
        clinic_ids = list({r["clinic_id"] for r in rows if r["clinic_id"] is not None})
        hooks: dict[str, list[WebhookTarget]] = {}
        if clinic_ids:
            for h in await conn.fetch(sql.ACTIVE_WEBHOOKS, clinic_ids):
                hooks.setdefault(str(h["clinic_id"]), []).append(
                    WebhookTarget(str(h["id"]), h["url"], frozenset(h["events"]))
                )
        alert_events = [r["id"] for r in rows if r["alert_id"] is not None]
        patients = {
            str(r["id"]): PatientRef(r["display_name"], r["mrn"])
            for r in (await conn.fetch(sql.ALERT_PATIENTS, alert_events) if alert_events else [])
        }
        columns: list[list[Any]] = [[] for _ in range(10)]
        dispatched = []
        for row in rows:
            try:
                planned = _deliveries(row, hooks, patients, now, mqtt_prefix=mqtt_prefix)
            except Exception:
                # A bug with one event must not hold up the others, nor lose this one: it
                # stays in the outbox (its age shows on the backlog gauge) and is tried again.
                log.exception("notify_fanout_event_failed", outbox_id=row["id"])
                metrics.fanout_failures.inc()
                continue
            dispatched.append(row["id"])
            for values in planned:
                for column, value in zip(columns, values, strict=True):
                    column.append(value)
        if columns[0]:
            await conn.execute(sql.INSERT_DELIVERIES, *columns, now)
        await conn.execute(sql.MARK_DISPATCHED, dispatched, now)
    metrics.events_dispatched.inc(len(dispatched))
    if columns[0]:
        deliveries_wake.set()
    return len(dispatched)


def _deliveries(
    row: asyncpg.Record,
    hooks: dict[str, list[WebhookTarget]],
    patients: dict[str, PatientRef],
    now: datetime,
    *,
    mqtt_prefix: str | None,
) -> list[tuple[Any, ...]]:
    """The delivery rows (``INSERT_DELIVERIES``' columns) of one outbox row; ``mqtt_prefix``:
    the MQTT topic prefix, None when MQTT is not configured."""
    if row["clinic_id"] is None:
        return []  # an unassigned pump's alert: no clinic to tell
    clinic_id = str(row["clinic_id"])
    event = Event(
        outbox_id=row["id"],
        created_at=row["created_at"],
        event=row["event"],
        alert_id=None if row["alert_id"] is None else str(row["alert_id"]),
        clinic_id=clinic_id,
        payload=row["payload"],
    )
    settings = clinic_settings(row["notification_settings"], clinic_id)
    tz = zone(row["timezone"])
    topic = alerts_topic(clinic_id, mqtt_prefix) if mqtt_prefix is not None else None
    planned = plan(
        event, settings, webhooks=hooks.get(clinic_id, []), mqtt_topic=topic, tz=tz, now=now
    )
    out = []
    for p in planned:
        key = message_id("outbox", event.outbox_id, p.channel, p.target, p.webhook_id)
        payload: dict[str, Any] = {
            "id": key,
            "type": event.event,
            "created_at": iso(event.created_at),
            "data": event.payload,
        }
        if p.channel == "email":
            payload["email"] = _email(event, settings, tz, row["clinic_name"], patients).as_json()
        out.append(
            (
                event.outbox_id,
                event.alert_id,
                clinic_id,
                event.event,
                p.channel,
                p.target,
                p.webhook_id,
                key,
                payload,
                p.due_at,
            )
        )
    return out


def _email(
    event: Event,
    settings: NotificationSettings,
    tz: tzinfo,
    clinic_name: str | None,
    patients: dict[str, PatientRef],
) -> EmailContent:
    name = clinic_name or "your clinic"
    if event.event in ALERT_EVENTS:
        patient = patients.get(str(event.outbox_id)) if settings.email.patient_names else None
        return alert_email(event.event, event.payload, clinic_name=name, tz=tz, patient=patient)
    return admin_email(event.event, event.payload, clinic_name=name, tz=tz)


async def loop(
    step: Callable[[], Awaitable[int]],
    settings: NotifySettings,
    *,
    wake: asyncio.Event,
    stop: asyncio.Event,
) -> None:
    """Fan out (``step``) until ``stop``: at once again while batches come full, else when
    ``wake`` is set or after the poll interval; backs off while the database is away."""
    delay = 0.1
    while not stop.is_set():
        wake.clear()
        try:
            taken = await step()
        except DATABASE_ERRORS as exc:
            log.warning("notify_fanout_failed", error=str(exc), retry_in_s=round(delay, 2))
            await pause(stop, delay)
            delay = min(delay * 2, 10.0)
            continue
        delay = 0.1
        if taken >= settings.notify_batch_max_events:
            continue
        await wait(wake, stop, settings.notify_poll_interval_s)


async def listen(url: str, *, wake: asyncio.Event, stop: asyncio.Event) -> None:
    """Wake the fan-out when outbox rows commit (the trigger's NOTIFY)."""

    def on_outbox(conn: Connection, pid: int, channel: str, payload: object) -> None:
        wake.set()

    delay = 0.2
    while not stop.is_set():
        lost = asyncio.Event()
        try:
            conn = await connect(url, application_name="pumpwatch-alerts-notify-listen")
        except (DatabaseUnavailable, DatabaseRejected) as exc:
            log.warning("notify_listen_unavailable", error=str(exc))
            await pause(stop, delay)
            delay = min(delay * 2, 10.0)
            continue
        delay = 0.2
        conn.add_termination_listener(lambda _, lost=lost: lost.set())
        await conn.add_listener(channels.OUTBOX, on_outbox)
        wake.set()  # anything that arrived while we were not listening
        try:
            stopping = asyncio.ensure_future(stop.wait())
            losing = asyncio.ensure_future(lost.wait())
            await asyncio.wait({stopping, losing}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            losing.cancel()
        finally:
            with contextlib.suppress(Exception):
                await conn.close()
