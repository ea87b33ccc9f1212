"""Signing people in with email and password: the slow-down and lockout, bearer tokens.

How lockout is balanced against a stranger locking someone out
---------------------------------------------------------------
Wrong passwords are counted by the email typed (an account or not) and the source address,
in PostgreSQL, so every API process sees the same counts.

- At one address, after ``api_signin_slow_after_failures`` wrong passwords for an email each
  further attempt must wait (5 s, 10 s, … doubling) and after
  ``api_signin_lock_after_failures`` the email is locked *at that address* for
  ``api_signin_lockout_s``: refused (429) without the password being tried, so a guesser
  there learns nothing, the right password included. Someone elsewhere is not affected: a
  stranger cannot lock a nurse out of her own workstation.
- Across addresses, when ``api_signin_account_lock_failures`` wrong passwords for the email
  arrive from anywhere within the window (a distributed guesser), the account takes sign-ins
  only from addresses it signed in from before: the person at her usual places still signs in,
  new addresses wait.
- Per address across emails (password spraying): the API's failed-authentication limit per
  source (``api_auth_failures_per_minute``, shared with wrong API keys) refuses further
  attempts from that address, except for an email that signed in from it before.

A successful sign-in forgets that address's failures for the email. Unknown emails are
answered exactly like wrong passwords (same words, same time: a dummy hash is verified).
"""

from __future__ import annotations

import asyncio
import secrets
from datetime import datetime, timedelta

import asyncpg
from fastapi import Request

from services.api import audit, clock, keys, passwords, sql
from services.api.auth import (
    USER_TOKEN_PREFIX,
    Principal,
    check_source,
    record_source_failure,
    source_of,
)
from services.api.problems import Problem
from services.api.settings import ApiSettings
from services.logs import get
from services.storage.database import Connection

log = get(__name__)

WRONG = "unknown email or wrong password"


async def sign_in(conn: Connection, request: Request, email: str, password: str) -> Principal:
    """The person, if ``password`` is theirs and nothing holds the attempt back; else 401
    (counted) or 429 (not tried). Failures and refusals are audited here; the caller creates
    the token or session and audits it in its own transaction."""
    settings: ApiSettings = request.app.state.settings
    email = email.strip().lower()
    now = await clock.now(conn, request)
    source = source_of(request)
    try:
        await _held_back(conn, request, settings, email=email, source=source, now=now)
    except Problem as refused:
        async with conn.transaction():
            await _audit_attempt(conn, request, None, refused.status)
        log.info("signin_refused", source=source, status=refused.status)
        raise
    row = await conn.fetchrow(sql.USER_FOR_SIGNIN, email)
    stored = None if row is None else row["password_hash"]
    right = await asyncio.to_thread(passwords.verify, stored, password)
    async with conn.transaction():
        if not right:
            await conn.execute(
                sql.RECORD_SIGNIN_FAILURE, email, source, now, settings.api_signin_lockout_s
            )
            await record_source_failure(request, conn, now)
            await _audit_attempt(conn, request, row, 401)
        else:
            assert row is not None
            assert stored is not None
            await conn.execute(sql.SIGNED_IN, email, row["id"], source, now)
            if passwords.needs_rehash(stored):
                rehashed = await asyncio.to_thread(passwords.hash_password, password)
                await conn.execute(sql.REHASH_PASSWORD, row["id"], rehashed)
    if not right:
        log.info("signin_failed", source=source)
        raise Problem(401, WRONG, kind="unauthenticated")
    assert row is not None
    principal = Principal(
        None, row["role"], row["clinic_id"], user_id=row["id"], name=row["display_name"]
    )
    request.state.principal = principal
    return principal


async def _held_back(
    conn: Connection,
    request: Request,
    settings: ApiSettings,
    *,
    email: str,
    source: str,
    now: datetime,
) -> None:
    """429 when this attempt must not be tried (see the module's docstring)."""
    known = bool(await conn.fetchval(sql.KNOWN_SOURCE, email, source))
    window = settings.api_signin_lockout_s
    if not known:
        await check_source(request, conn, now)
        everywhere = await conn.fetchval(sql.SIGNIN_FAILURES_EVERYWHERE, email, now, window)
        if everywhere >= settings.api_signin_account_lock_failures:
            raise _wait(
                "too many wrong passwords for this account from many places: for now it signs "
                "in only from places it signed in from before",
                window,
            )
    here = await conn.fetchrow(sql.SIGNIN_FAILURES_HERE, email, source, now, window)
    assert here is not None  # an aggregate: always one row
    failures: int = here["failures"]
    last: datetime | None = here["last_at"]
    if last is None or failures < settings.api_signin_slow_after_failures:
        return
    if failures >= settings.api_signin_lock_after_failures:
        until = last + timedelta(seconds=window)
        words = "too many wrong passwords: this account is locked here"
    else:
        steps = failures - settings.api_signin_slow_after_failures
        until = last + timedelta(seconds=settings.api_signin_slow_delay_s * 2**steps)
        words = "wrong passwords: wait before trying again"
    if until > now:
        raise _wait(words, (until - now).total_seconds())


def _wait(words: str, seconds: float) -> Problem:
    wait = max(1, int(seconds + 0.999))
    return Problem(
        429,
        f"{words}; try again in {wait} s",
        kind="signin-locked",
        headers={"Retry-After": str(wait)},
    )


async def _audit_attempt(
    conn: Connection, request: Request, row: asyncpg.Record | None, status: int
) -> None:
    user = None if row is None else row["id"]
    clinic = None if row is None else row["clinic_id"]
    who = None if row is None else Principal(None, row["role"], clinic, user_id=user)
    await audit.record(
        conn,
        request,
        action="post sign-in",
        resource_type="users",
        resource_id=user,
        clinic_id=clinic,
        status=status,
        outcome="denied",
        principal=who,
    )


async def issue_token(conn: Connection, request: Request, principal: Principal) -> tuple[str, int]:
    """A new bearer token for the person (stored as its SHA-256), audited in the same
    transaction: (the token, its lifetime in seconds)."""
    settings: ApiSettings = request.app.state.settings
    now = await clock.now(conn, request)
    token = USER_TOKEN_PREFIX + secrets.token_urlsafe(32)
    lifetime = int(settings.api_token_lifetime_s)
    async with conn.transaction():
        await conn.execute(sql.DELETE_EXPIRED_USER_TOKENS, now)
        await conn.execute(
            sql.INSERT_USER_TOKEN, keys.hash_key(token), principal.user_id, now, lifetime
        )
        await audit.record(
            conn,
            request,
            action="post sign-in",
            resource_type="users",
            resource_id=principal.user_id,
            clinic_id=principal.clinic_id,
            status=200,
        )
    return token, lifetime
