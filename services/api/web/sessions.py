"""Web sessions: an API key exchanged for an HttpOnly cookie, with a CSRF token per session."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from fastapi import Request

from services.api import sql
from services.api.auth import Principal
from services.storage.database import Connection

COOKIE = "pw_session"
LOGIN_COOKIE = "pw_login"
"""Double-submit token of the sign-in form (there is no session yet to hold one)."""


@dataclass(frozen=True, slots=True)
class Session:
    principal: Principal
    csrf_token: str


def _hash(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


async def create(conn: Connection, principal: Principal, lifetime_s: float) -> str:
    """A new session for the principal; returns the cookie's token (stored only hashed)."""
    token = secrets.token_urlsafe(32)
    await conn.execute(sql.DELETE_EXPIRED_SESSIONS)
    await conn.execute(
        sql.INSERT_SESSION,
        _hash(token),
        principal.key_id,
        principal.role,
        principal.clinic_id,
        secrets.token_urlsafe(32),
        lifetime_s,
    )
    return token


async def current(conn: Connection, request: Request) -> Session | None:
    token = request.cookies.get(COOKIE)
    if not token or len(token) > 200:
        return None
    row = await conn.fetchrow(sql.SESSION, _hash(token))
    if row is None:
        return None
    principal = Principal(row["key_id"], row["role"], row["clinic_id"])
    request.state.principal = principal  # the audit log names the key behind the session
    return Session(principal, row["csrf_token"])


async def end(conn: Connection, request: Request) -> None:
    token = request.cookies.get(COOKIE)
    if token:
        await conn.execute(sql.DELETE_SESSION, _hash(token))


def csrf_ok(expected: str, given: str | None) -> bool:
    return given is not None and secrets.compare_digest(expected.encode(), given.encode())
