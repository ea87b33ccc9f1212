"""What the routes share: the connection of a request, cursors, limits, tenancy checks."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any
from uuid import UUID

from fastapi import Depends, Query, Request

from services.api.auth import Principal, authenticate
from services.api.problems import FieldError, Problem, not_found
from services.storage.database import Connection


async def connection(request: Request) -> AsyncIterator[Connection]:
    async with request.app.state.pool.acquire() as conn:
        yield conn


# Returned to the pool when the route function ends, before the response is sent: the audit
# write (at the response's start) takes a connection of its own, and a request holding one
# while waiting for another deadlocks the API once more requests are in flight than the pool
# has connections.
Db = Annotated[Connection, Depends(connection, scope="function")]
Auth = Annotated[Principal, Depends(authenticate)]
Limit = Annotated[int, Query(ge=1, le=500, description="Items per page (1-500).", examples=[50])]
Cursor = Annotated[
    str | None,
    Query(max_length=500, description="`next_cursor` of the previous page."),
]


def encode_cursor(*values: Any) -> str:
    raw = json.dumps([str(v) if v is not None else None for v in values]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def cursor_time(value: str | None) -> datetime:
    """A time this API wrote into a cursor (with its offset); 400 for anything else."""
    try:
        found = datetime.fromisoformat(value or "")
    except ValueError as exc:
        raise Problem(400, "cursor is not one this API gave out", kind="bad-cursor") from exc
    if found.tzinfo is None:
        raise Problem(400, "cursor is not one this API gave out", kind="bad-cursor")
    return found


def decode_cursor(cursor: str | None, size: int) -> list[str | None] | None:
    if cursor is None:
        return None
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        values = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
        if not isinstance(values, list) or len(values) != size:
            raise ValueError("wrong shape")
        if not all(v is None or isinstance(v, str) for v in values):
            raise ValueError("wrong shape")
    except (ValueError, UnicodeError) as exc:
        raise Problem(
            400,
            "cursor is not one this API gave out",
            kind="bad-cursor",
            errors=[FieldError(field="query.cursor", message="not a cursor of this list")],
        ) from exc
    return values


def cursor_uuid(value: str | None) -> UUID | None:
    if value is None:
        return None
    try:
        return UUID(value)
    except ValueError as exc:
        raise Problem(400, "cursor is not one this API gave out", kind="bad-cursor") from exc


def scope_of(principal: Principal) -> UUID | None:
    """The clinic a list is restricted to; None for the roles that see every clinic."""
    return None if principal.all_clinics else principal.clinic_id


def visible(principal: Principal, clinic_id: UUID | None, what: str) -> None:
    """404 unless the principal may see a resource of ``clinic_id``."""
    if not principal.sees(clinic_id):
        raise not_found(what)


def clinic_for_write(principal: Principal, given: UUID | None) -> UUID:
    """The clinic a new resource belongs to: the key's own, or (admin) the one given."""
    if principal.role == "admin":
        if given is None:
            raise Problem(
                422,
                "clinic_id is required with an admin key",
                kind="validation",
                errors=[FieldError(field="body.clinic_id", message="required for admin keys")],
            )
        return given
    assert principal.clinic_id is not None
    if given is not None and given != principal.clinic_id:
        raise not_found("clinic")
    return principal.clinic_id
