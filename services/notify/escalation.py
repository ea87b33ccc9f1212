"""Escalation: a high alert nobody acknowledged within the clinic's ``after_minutes`` is re-sent
(event ``alert.unacknowledged``: the high-priority addresses, the escalation contacts, webhooks
subscribed to it, MQTT), then again every ``repeat_minutes`` until it is acknowledged or
resolved (or eased below high). Each escalation is a row of the alert's history
(``notification_escalated``) written with its outbox row in one transaction, the alert row
locked: two instances never escalate the same alert twice.

The clock is passed in (``now``): the worker passes the wall clock, tests an injected one.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import asyncpg

from services.domain.notifications import Escalation, NotificationSettings
from services.logs import get
from services.notify import sql
from services.notify.metrics import NotifyMetrics
from services.storage import outbox

log = get(__name__)


def escalation_due(
    escalation: Escalation,
    *,
    since: datetime,
    escalations: int,
    last_at: datetime | None,
    now: datetime,
) -> bool:
    """Whether an alert open and high since ``since``, escalated ``escalations`` times since
    then (the last at ``last_at``), is to be escalated at ``now``."""
    if not escalation.enabled:
        return False
    first = since + timedelta(minutes=escalation.after_minutes)
    if escalations == 0 or last_at is None:
        return now >= first
    return now >= max(first, last_at + timedelta(minutes=escalation.repeat_minutes))


def _settings(value: dict[str, object] | None, alert_id: object) -> NotificationSettings:
    try:
        return NotificationSettings.stored(value)
    except ValueError as exc:
        log.error("notification_settings_invalid", alert_id=str(alert_id), error=str(exc))
        return NotificationSettings()


async def escalate(pool: asyncpg.Pool, *, now: datetime, metrics: NotifyMetrics) -> int:
    """Escalate every alert due at ``now``; returns how many were escalated."""
    candidates = [row for row in await pool.fetch(sql.OPEN_HIGH_ALERTS, now) if _due(row, now)]
    done = 0
    for row in candidates:
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(sql.LOCK_ALERT, row["id"])
            state = await conn.fetchrow(sql.ESCALATION_STATE_OF, now, row["id"])
            if state is None or not _due(state, now):
                continue  # acknowledged, resolved or escalated meanwhile
            count = int(state["escalations"]) + 1
            minutes = round((now - state["since"]).total_seconds() / 60, 1)
            facts = {"escalation": count, "unacknowledged_minutes": minutes}
            await conn.execute(
                sql.INSERT_ESCALATION,
                state["id"],
                now,
                f"not acknowledged {minutes:g} min after it became high: re-sent to the "
                f"escalation contacts (escalation {count})",
                facts,
            )
            payload = outbox.alert_object(state) | {
                "escalation": facts | {"since": state["since"].isoformat()}
            }
            await outbox.add(
                conn,
                "alert.unacknowledged",
                payload,
                alert_id=state["id"],
                clinic_id=state["clinic_id"],
            )
        done += 1
        metrics.escalations.inc()
        log.info(
            "alert_escalated",
            alert_id=str(state["id"]),
            serial=state["serial"],
            escalation=count,
            unacknowledged_minutes=minutes,
        )
    return done


def _due(row: asyncpg.Record, now: datetime) -> bool:
    settings = _settings(row["notification_settings"], row["id"])
    return escalation_due(
        settings.escalation,
        since=row["since"],
        escalations=int(row["escalations"]),
        last_at=row["last_at"],
        now=now,
    )
