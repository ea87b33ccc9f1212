"""Who is asking: bearer API keys (machines) and people's tokens (users, OAuth2 password flow),
roles and tenancy, and a limit on failed attempts."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from uuid import UUID

from asyncpg import Record
from fastapi import Request

from services.api import clock, keys, sql
from services.api.keys import Role
from services.api.problems import Problem
from services.logs import get
from services.storage.database import Connection

log = get(__name__)

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="pumpwatch"'}


USER_TOKEN_PREFIX = "pwu_"  # noqa: S105 - a prefix, not a secret
"""People's bearer tokens start with this; API keys with ``pw_``."""


@dataclass(frozen=True, slots=True)
class Principal:
    key_id: UUID | None
    """The API key; None for a person and for the ``PUMPWATCH_ADMIN_TOKEN`` bootstrap token."""
    role: Role
    clinic_id: UUID | None
    user_id: UUID | None = None
    """The person (a user's token or dashboard session)."""
    name: str | None = None
    """The person's display name, or the key's label: what pages show."""
    token_hash: bytes | None = None
    """A person's bearer token (its hash): what ``POST /v1/auth/logout`` ends."""

    @property
    def actor(self) -> str:
        """Who, as history rows, custody and outbox events record it: ``user:<id>``,
        ``key:<id>`` (``actor_json`` in SQL turns these into names)."""
        if self.user_id is not None:
            return f"user:{self.user_id}"
        return f"key:{self.key_id}" if self.key_id else "admin-token"

    @property
    def actor_object(self) -> dict[str, str | None]:
        """The actor as the contract shows it (alert history, events)."""
        if self.user_id is not None:
            return {"type": "user", "id": str(self.user_id), "display_name": self.name}
        if self.key_id is not None:
            return {"type": "key", "id": str(self.key_id), "label": self.name}
        return {"type": "key", "id": "admin-token", "label": "PUMPWATCH_ADMIN_TOKEN"}

    @property
    def identified(self) -> bool:
        """May see names, MRNs and birth dates (every role but fleet)."""
        return self.role != "fleet"

    @property
    def all_clinics(self) -> bool:
        return self.role in ("admin", "fleet")

    def sees(self, clinic_id: UUID | None) -> bool:
        """Whether a resource of ``clinic_id`` (None: a pump without a patient) exists for
        this key; anything else answers 404."""
        return self.all_clinics or (clinic_id is not None and clinic_id == self.clinic_id)


def source_of(request: Request) -> str:
    return request.client.host if request.client else "unknown"


async def key_row(request: Request, conn: Connection, key_hash: bytes) -> Record | None:
    """The API key's row, or None when the key is unknown or revoked (a failure counted
    against the source, shared by every API process). A right key is never refused; a wrong
    one from a source over its limit gets 429. Shared by bearer authentication and the web
    sign-in form."""
    row: Record | None = await conn.fetchrow(sql.KEY_BY_HASH, key_hash)
    if row is not None and row["revoked_at"] is None:
        return row
    await _failed(request, conn, revoked=row is not None)
    return None


async def _failed(request: Request, conn: Connection, *, revoked: bool) -> None:
    """A credential presented and wrong: 429 if the source is over its limit, else counted."""
    source = source_of(request)
    now = datetime.now(UTC)
    await check_source(request, conn, now)
    await conn.execute(sql.RECORD_AUTH_FAILURE, source, now)
    log.info("api_auth_failed", source=source, revoked=revoked)


async def check_source(request: Request, conn: Connection, now: datetime) -> None:
    """429 if the request's source presented too many wrong credentials in the last minute."""
    limit: int = request.app.state.settings.api_auth_failures_per_minute
    if await conn.fetchval(sql.AUTH_FAILURES, source_of(request), now) >= limit:
        raise Problem(
            429,
            "too many failed authentications from this source; retry in a minute",
            kind="rate-limited",
            headers={"Retry-After": "60"},
        )


async def record_source_failure(request: Request, conn: Connection, now: datetime) -> None:
    """A wrong password counts against its source like a wrong key."""
    await conn.execute(sql.RECORD_AUTH_FAILURE, source_of(request), now)


async def authenticate(request: Request) -> Principal:
    """The request's principal, or 401 (429 for wrong keys once a source keeps failing).
    A request without credentials is not a failed authentication: nothing is counted."""
    state = request.app.state
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Problem(
            401,
            "send an API key: Authorization: Bearer <key>",
            kind="unauthenticated",
            headers=_CHALLENGE,
        )
    key_hash = keys.hash_key(token)
    admin = state.settings.admin_token
    if admin is not None and hmac.compare_digest(
        token.encode("utf-8", "surrogatepass"), admin.get_secret_value().encode()
    ):
        principal = Principal(None, "admin", None)
    elif token.startswith(USER_TOKEN_PREFIX):
        async with state.pool.acquire() as conn:
            principal = await _person(request, conn, key_hash)
    else:
        async with state.pool.acquire() as conn:
            row = await key_row(request, conn, key_hash)
            if row is None:
                raise Problem(
                    401, "unknown or revoked API key", kind="unauthenticated", headers=_CHALLENGE
                )
            principal = Principal(row["id"], row["role"], row["clinic_id"], name=row["label"])
            await _touch(conn, request, row)
    request.state.principal = principal
    return principal


async def _person(request: Request, conn: Connection, token_hash: bytes) -> Principal:
    """The person behind a bearer token, or 401: unknown, ended (logout, deactivation),
    expired or idle tokens alike (counted as failures, like a revoked key)."""
    settings = request.app.state.settings
    now = await clock.now(conn, request)
    row = await conn.fetchrow(sql.USER_TOKEN, token_hash, now, settings.api_idle_timeout_s)
    if row is None:
        await _failed(request, conn, revoked=False)
        raise Problem(
            401,
            "the sign-in ended (expired, idle, signed out or deactivated): sign in again",
            kind="unauthenticated",
            headers=_CHALLENGE,
        )
    if now - row["last_used_at"] >= timedelta(seconds=settings.api_key_touch_interval_s):
        await conn.execute(sql.TOUCH_USER_TOKEN, token_hash, now)
    return Principal(
        None,
        row["role"],
        row["clinic_id"],
        user_id=row["user_id"],
        name=row["display_name"],
        token_hash=token_hash,
    )


async def _touch(conn: Connection, request: Request, row: Record) -> None:
    interval = timedelta(seconds=request.app.state.settings.api_key_touch_interval_s)
    now = datetime.now(UTC)
    last = row["last_used_at"]
    if last is None or now - last >= interval:
        await conn.execute(sql.TOUCH_KEY, row["id"], now)


def require(principal: Principal, *roles: Role) -> None:
    """403 unless the principal has one of ``roles``; a clinic administrator may do what a
    clinician may (and manage the clinic's people)."""
    allowed = set(roles) | ({"clinic_admin"} if "clinician" in roles else set())
    if principal.role not in allowed:
        raise Problem(
            403,
            f"the {principal.role} role may not do this (needs {' or '.join(roles)})",
            kind="forbidden",
        )
