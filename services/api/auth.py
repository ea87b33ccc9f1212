"""Who is asking: bearer API keys, roles and tenancy, and a limit on failed attempts."""

from __future__ import annotations

import hmac
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from uuid import UUID

from asyncpg import Record
from fastapi import Request

from services.api import keys, sql
from services.api.keys import Role
from services.api.problems import Problem
from services.logs import get
from services.storage.database import Connection

log = get(__name__)

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="pumpwatch"'}


@dataclass(frozen=True, slots=True)
class Principal:
    key_id: UUID | None
    """None for the ``PUMPWATCH_ADMIN_TOKEN`` bootstrap token."""
    role: Role
    clinic_id: UUID | None

    @property
    def actor(self) -> str:
        return f"key:{self.key_id}" if self.key_id else "admin-token"

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


class FailureLimiter:
    """Failed authentications per source over the last minute (per process).

    A source over the limit gets 429 without its key being looked up, except for keys that
    authenticated recently (from any source): one client spraying bad keys from behind a
    clinic's NAT does not lock out the clinic's working clients. A guessed key cannot be among
    them, and a recently trusted key is still looked up (so a revoked one gets its 401)."""

    TRUST_S = 3600.0
    """How long a key that authenticated passes a locked-out source."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._failures: dict[str, deque[float]] = {}
        self._trusted: dict[bytes, float] = {}

    def _recent(self, source: str, now: float) -> deque[float]:
        found = self._failures.setdefault(source, deque())
        while found and found[0] <= now - 60.0:
            found.popleft()
        return found

    def check(self, source: str, key_hash: bytes | None) -> None:
        now = time.monotonic()
        found = self._recent(source, now)
        if len(found) >= self.per_minute:
            trusted_at = self._trusted.get(key_hash) if key_hash is not None else None
            if trusted_at is not None and now - trusted_at < self.TRUST_S:
                return
            retry = max(1, int(60.0 - (now - found[0])) + 1)
            raise Problem(
                429,
                f"too many failed authentications from this source; retry in {retry} s",
                kind="rate-limited",
                headers={"Retry-After": str(retry)},
            )
        if not found:
            self._failures.pop(source, None)

    def failed(self, source: str) -> None:
        self._recent(source, time.monotonic()).append(time.monotonic())
        if len(self._failures) > 100_000:  # bounded memory under a spray of sources
            self._failures.clear()

    def succeeded(self, key_hash: bytes) -> None:
        self._trusted[key_hash] = time.monotonic()
        if len(self._trusted) > 100_000:  # bounded: keys are few, this is a safety net
            self._trusted.clear()


def _source(request: Request) -> str:
    return request.client.host if request.client else "unknown"


async def key_row(request: Request, conn: Connection, key_hash: bytes) -> Record | None:
    """The API key's row once the source's failure limit lets it be looked up (429
    otherwise), or None when the key is unknown or revoked (a failure counted against the
    source). Shared by bearer authentication and the web sign-in form."""
    limiter: FailureLimiter = request.app.state.limiter
    source = _source(request)
    limiter.check(source, key_hash)
    row: Record | None = await conn.fetchrow(sql.KEY_BY_HASH, key_hash)
    if row is None or row["revoked_at"] is not None:
        limiter.failed(source)
        log.info("api_auth_failed", source=source, revoked=row is not None)
        return None
    limiter.succeeded(key_hash)
    return row


async def authenticate(request: Request) -> Principal:
    """The request's principal, or 401 (429 once a source keeps failing)."""
    state = request.app.state
    source = _source(request)
    limiter: FailureLimiter = state.limiter
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    bearer = scheme.lower() == "bearer" and bool(token)
    if not bearer:
        limiter.check(source, None)
        limiter.failed(source)
        raise Problem(
            401,
            "send an API key: Authorization: Bearer <key>",
            kind="unauthenticated",
            headers=_CHALLENGE,
        )
    key_hash = keys.hash_key(token)
    # Before a pool connection is taken: a flood from a locked-out source costs none.
    limiter.check(source, key_hash)
    admin = state.settings.admin_token
    if admin is not None and hmac.compare_digest(
        token.encode("utf-8", "surrogatepass"), admin.get_secret_value().encode()
    ):
        principal = Principal(None, "admin", None)
        limiter.succeeded(key_hash)
    else:
        async with state.pool.acquire() as conn:
            row = await key_row(request, conn, key_hash)
            if row is None:
                raise Problem(
                    401, "unknown or revoked API key", kind="unauthenticated", headers=_CHALLENGE
                )
            principal = Principal(row["id"], row["role"], row["clinic_id"])
            await _touch(conn, request, row)
    request.state.principal = principal
    return principal


async def _touch(conn: Connection, request: Request, row: Record) -> None:
    interval = timedelta(seconds=request.app.state.settings.api_key_touch_interval_s)
    now = datetime.now(UTC)
    last = row["last_used_at"]
    if last is None or now - last >= interval:
        await conn.execute(sql.TOUCH_KEY, row["id"], now)


def require(principal: Principal, *roles: Role) -> None:
    if principal.role not in roles:
        raise Problem(
            403,
            f"the {principal.role} role may not do this (needs {' or '.join(roles)})",
            kind="forbidden",
        )
