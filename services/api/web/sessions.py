"""Web sessions: a person's email and password (or a machine's API key) exchanged for an
HttpOnly cookie, with a CSRF token per session. A person's session ends after the sign-in
lifetime, after the idle timeout, at sign-out and when the person is deactivated."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import timedelta

from fastapi import Request

from services.api import clock, sql
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


async def create(
    conn: Connection, request: Request, principal: Principal, lifetime_s: float
) -> str:
    """A new session for the principal; returns the cookie's token (stored only hashed)."""
    token = secrets.token_urlsafe(32)
    now = await clock.now(conn, request)
    await conn.execute(sql.DELETE_EXPIRED_SESSIONS, now)
    await conn.execute(
        sql.INSERT_SESSION,
        _hash(token),
        principal.key_id,
        principal.role,
        principal.clinic_id,
        secrets.token_urlsafe(32),
        lifetime_s,
        principal.user_id,
        now,
    )
    return token


async def current(conn: Connection, request: Request, *, touch: bool = True) -> Session | None:
    """The request's session, or None (none, expired, idle, ended). ``touch=False``: the
    request is not the person's own doing (the page's automatic refresh), so it does not keep
    the session from idling out."""
    token = request.cookies.get(COOKIE)
    if not token or len(token) > 200:
        return None
    settings = request.app.state.settings
    now = await clock.now(conn, request)
    row = await conn.fetchrow(sql.SESSION, _hash(token), now, settings.api_idle_timeout_s)
    if row is None:
        return None
    interval = timedelta(seconds=settings.api_key_touch_interval_s)
    if touch and row["user_id"] is not None and now - row["last_used_at"] >= interval:
        await conn.execute(sql.TOUCH_SESSION, _hash(token), now)
    principal = Principal(
        row["key_id"], row["role"], row["clinic_id"], user_id=row["user_id"], name=row["name"]
    )
    request.state.principal = principal  # the audit log names the person or key
    return Session(principal, row["csrf_token"])


async def end(conn: Connection, request: Request) -> None:
    token = request.cookies.get(COOKIE)
    if token:
        await conn.execute(sql.DELETE_SESSION, _hash(token))


def csrf_ok(expected: str, given: str | None) -> bool:
    return given is not None and secrets.compare_digest(expected.encode(), given.encode())
