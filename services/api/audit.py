"""The audit log: who (the person, or the key), did what, to which resource, with what outcome,
from where (HIPAA §164.312(b)).

A change writes its row with :func:`record` inside its own transaction, naming the resource it
actually changed: the row commits with the change or neither does. The middleware
(``services.api.app``) writes the rows of reads of patient data, and of changes that were
refused or failed (nothing changed then), unless the route wrote its own.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from fastapi import Request

from services.api import sql
from services.api.auth import Principal
from services.storage.database import Connection


def source(request: Request) -> str | None:
    """The client's address (its proxy's X-Forwarded-For only from a trusted proxy: uvicorn)."""
    return request.client.host if request.client else None


async def record(
    conn: Connection,
    request: Request,
    *,
    resource_type: str,
    resource_id: Any,
    clinic_id: UUID | None,
    status: int = 200,
    outcome: str = "ok",
    principal: Principal | None = None,
    action: str | None = None,
) -> None:
    """One audit row, on ``conn`` (in the caller's transaction). ``principal``: who, when the
    request has none yet (a sign-in); else the request's. ``action``: the route's method and
    name unless given (as the middleware's rows say it)."""
    who: Principal | None = principal or getattr(request.state, "principal", None)
    if action is None:
        route = request.scope.get("route")
        action = f"{request.method.lower()} {getattr(route, 'name', '')}"
    await conn.execute(
        sql.INSERT_AUDIT,
        None if who is None else who.key_id,
        None if who is None else who.role,
        action,
        resource_type,
        None if resource_id is None else str(resource_id),
        clinic_id,
        outcome,
        status,
        source(request),
        None if who is None else who.user_id,
    )
    request.state.audited = True
    request.app.state.metrics.audit_rows.inc()
