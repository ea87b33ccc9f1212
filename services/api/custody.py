"""What a change of a pump's custody does to its unresolved alerts.

An alert belongs to the pump's holder (``alert_clinic``, migration 0008), so the new holder
sees it the moment the custody commits. This module writes what people and integrators learn
of it, in the same transaction: a history entry per alert, an ``alert.assigned`` event for the
new holder (its webhooks, email and escalation), and, when the pump changes clinic, an
acknowledged alert opens again: the new clinic has not seen it yet.
"""

from __future__ import annotations

from datetime import UTC, datetime
from uuid import UUID

from services.api import sql
from services.storage import outbox
from services.storage.database import Connection

_WORDS = {
    "provisioned": "the pump was provisioned to a clinic",
    "claimed": "the pump was claimed by a clinic with its programmer's code",
    "assigned": "the pump was assigned to a patient",
    "moved": "the pump was moved to another patient",
}


async def hand_over(
    conn: Connection,
    serial: str,
    *,
    clinic_id: UUID | None,
    patient_id: UUID | None,
    clinic_changed: bool,
    actor: str,
    how: str,
) -> int:
    """Record the hand-over of the pump's unresolved alerts; returns how many there were."""
    alerts = await conn.fetch(sql.UNRESOLVED_ALERTS_FOR_CUSTODY, serial)
    now = datetime.now(UTC)
    reason = _WORDS.get(how, "the pump's custody changed")
    if clinic_id is None:
        reason = "the pump was taken from its clinic: only administrators see its alerts"
    for alert in alerts:
        status = alert["status"]
        if clinic_changed and clinic_id is not None and status == "acknowledged":
            await conn.execute(sql.REOPEN_FOR_NEW_HOLDER, alert["id"], now)
            status = "open"
        facts = {
            "clinic_id": None if clinic_id is None else str(clinic_id),
            "patient_id": None if patient_id is None else str(patient_id),
            "how": how,
        }
        await conn.execute(
            sql.INSERT_CUSTODY_HISTORY,
            alert["id"],
            actor,
            status,
            alert["priority"],
            reason,
            facts,
        )
        if clinic_id is not None:
            owned = dict(alert) | {
                "status": status,
                "clinic_id": clinic_id,
                "patient_id": patient_id,
                "updated_at": now if status != alert["status"] else alert["updated_at"],
            }
            await outbox.add(
                conn,
                "alert.assigned",
                outbox.alert_object(owned) | {"custody": {"how": how, "by": actor}},
                alert_id=alert["id"],
                clinic_id=clinic_id,
            )
    return len(alerts)
