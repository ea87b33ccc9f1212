"""The outbox: what someone must hear of, written in the transaction of the change itself.

Every service that changes what clinics are told about (the alert engine, the API's human
actions, the notification worker's own notices) adds its event here with :func:`add`; the
notification worker fans each event out into deliveries, at least once. A trigger (migration
0003) sends ``NOTIFY`` on :data:`services.storage.channels.OUTBOX` at each commit.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import asyncpg

from services.storage.database import Connection

_INSERT = "INSERT INTO outbox (event, alert_id, clinic_id, payload) VALUES ($1, $2, $3, $4)"


async def add(
    conn: Connection,
    event: str,
    payload: dict[str, Any],
    *,
    alert_id: object | None = None,
    clinic_id: object | None = None,
) -> None:
    """Add one event (``alert.opened``, ``refill.recorded``, …) in the caller's transaction."""
    await conn.execute(_INSERT, event, alert_id, clinic_id, payload)


def _stamp(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat()


def alert_object(row: asyncpg.Record | Mapping[str, Any]) -> dict[str, Any]:
    """The alert object of the HTTP contract, from a row of ``alerts`` with its owner
    (``clinic_id``, ``patient_id``): what alert events carry."""
    return {
        "id": str(row["id"]),
        "serial": row["serial"],
        "patient_id": None if row["patient_id"] is None else str(row["patient_id"]),
        "clinic_id": None if row["clinic_id"] is None else str(row["clinic_id"]),
        "rule": row["rule"],
        "priority": row["priority"],
        "status": row["status"],
        "title": row["title"],
        "detail": row["detail"],
        "opened_at": _stamp(row["opened_at"]),
        "updated_at": _stamp(row["updated_at"]),
        "acknowledged_at": _stamp(row["acknowledged_at"]),
        "resolved_at": _stamp(row["resolved_at"]),
        "resolution": row["resolution"],
    }
