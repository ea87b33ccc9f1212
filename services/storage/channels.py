"""PostgreSQL ``LISTEN``/``NOTIFY`` channels by which the services wake each other.

They only wake: what changed is in the tables, and every listener also polls or sweeps, so a
lost notification delays work and never loses it.
"""

from __future__ import annotations

import json

from services.storage.database import Connection

INGEST = "pumpwatch_ingest"
"""Pumps with new data, ``{"serials": [...]}`` (``null``: too many to list, re-read them all):
ingest after each commit, the API after a refill, a booking or an assignment, and the triggers
of migration 0016 when a patient's margin or risk or a clinic's alert settings or zone change
(the pumps whose forecasts that made stale; :func:`pumps_changed_payload`'s format and limit).
The alert service listens and evaluates those pumps."""
OUTBOX = "pumpwatch_outbox"
"""Sent by the outbox's trigger at each commit (migration 0003): the notification worker wakes."""

_NOTIFY = "SELECT pg_notify($1, $2)"
_NOTIFY_LIMIT_BYTES = 7000
"""PostgreSQL refuses payloads of 8000 bytes and more (migration 0016's triggers use the same
limit)."""


def pumps_changed_payload(serials: set[str] | list[str]) -> str:
    payload = json.dumps({"serials": sorted(serials)})
    if len(payload) > _NOTIFY_LIMIT_BYTES:
        payload = json.dumps({"serials": None})  # many pumps changed: re-read them all
    return payload


async def pumps_changed(conn: Connection, serials: set[str] | list[str]) -> None:
    """Tell the alert service (at the commit of the caller's transaction) to evaluate these."""
    await conn.execute(_NOTIFY, INGEST, pumps_changed_payload(serials))
