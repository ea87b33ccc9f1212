"""A delivery the worker claimed: its row (``CLAIM_DELIVERIES``) with its webhook's URL and
signing keys, or why that webhook may no longer be sent to."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from services.notify.channel import WebhookKeys


@dataclass(frozen=True, slots=True)
class Claimed:
    """A delivery this worker holds under a lease."""

    id: str
    alert_id: str | None
    clinic_id: str | None
    event: str
    channel: str
    target: str
    webhook_id: str | None
    key: str
    payload: dict[str, Any]
    due_at: datetime
    created_at: datetime
    attempts: int
    previous_claim: datetime | None
    webhook_url: str | None
    keys: WebhookKeys | None
    webhook_gone: str | None
    """Why the webhook may no longer be sent to (deleted, disabled), or None."""

    @classmethod
    def of(cls, row: asyncpg.Record) -> Claimed:
        keys = None
        gone = None
        if row["webhook_id"] is not None:
            if row["secret"] is None:
                gone = "the webhook no longer exists"
            elif row["webhook_deleted_at"] is not None:
                gone = "the webhook was deleted"
            elif row["webhook_disabled_at"] is not None:
                gone = "the webhook is disabled"
            else:
                keys = WebhookKeys(
                    row["secret"], row["previous_secret"], row["previous_secret_expires_at"]
                )
        return cls(
            id=str(row["id"]),
            alert_id=None if row["alert_id"] is None else str(row["alert_id"]),
            clinic_id=None if row["clinic_id"] is None else str(row["clinic_id"]),
            event=row["event"],
            channel=row["channel"],
            target=row["target"],
            webhook_id=None if row["webhook_id"] is None else str(row["webhook_id"]),
            key=row["idempotency_key"],
            payload=row["payload"],
            due_at=row["due_at"],
            created_at=row["created_at"],
            attempts=int(row["attempts"]),
            previous_claim=row["previous_claim"],
            webhook_url=row["webhook_url"],
            keys=keys,
            webhook_gone=gone,
        )
