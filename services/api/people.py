"""People's accounts: who may manage whom, one-time links (invitations, password resets) and
their emails, passwords set and changed, deactivation.

Roles: ``admin`` (every clinic, every person), ``clinic_admin`` (the people, webhooks and
settings of their clinic, and everything a clinician does), ``clinician``, ``fleet``. A clinic
administrator manages only clinicians and clinic administrators of their own clinic: another
clinic answers 404 (as everywhere), an ``admin`` or ``fleet`` account 403.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.message import EmailMessage
from typing import Any, Literal
from urllib.parse import unquote, urlsplit
from uuid import UUID

import aiosmtplib
import asyncpg
from fastapi import Request

from services.api import models, passwords, sql
from services.api.auth import Principal, require
from services.api.problems import FieldError, Problem, not_found
from services.api.settings import ApiSettings
from services.logs import get
from services.storage.database import Connection

log = get(__name__)

CLINIC_USER_ROLES = frozenset({"clinician", "clinic_admin"})
Purpose = Literal["invitation", "reset"]
LINK_PATH = "/set-password/"
"""The dashboard's page where a link's token is used (the token follows in the path)."""


def link_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def user_out(row: asyncpg.Record) -> models.User:
    return models.User(
        id=row["id"],
        email=row["email"],
        display_name=row["display_name"],
        role=row["role"],
        clinic_id=row["clinic_id"],
        created_at=row["created_at"],
        created_by=row["created_by"],
        active=row["deactivated_at"] is None,
        deactivated_at=row["deactivated_at"],
    )


def manager(principal: Principal) -> None:
    require(principal, "admin", "clinic_admin")


def scope(principal: Principal) -> UUID | None:
    """The clinic whose people a manager sees (None: an administrator sees everyone)."""
    return None if principal.role == "admin" else principal.clinic_id


def placed(principal: Principal, role: str, clinic_id: UUID | None) -> UUID | None:
    """The clinic of an account with ``role`` that ``principal`` makes or changes, or a
    problem: 403 for a role above the manager's, 404 for another clinic, 422 for a clinic
    given to a role without one (or missing for one with)."""
    if principal.role != "admin":
        if role not in CLINIC_USER_ROLES:
            raise Problem(
                403,
                f"a clinic administrator may not manage {role} accounts (an administrator does)",
                kind="forbidden",
            )
        if clinic_id is not None and clinic_id != principal.clinic_id:
            raise not_found("clinic")
        clinic_id = principal.clinic_id
    if role in CLINIC_USER_ROLES and clinic_id is None:
        raise _field("body.clinic_id", f"required for a {role}")
    if role not in CLINIC_USER_ROLES and clinic_id is not None:
        raise _field("body.clinic_id", f"a {role} belongs to no clinic")
    return clinic_id


def _field(field: str, message: str) -> Problem:
    return Problem(
        422, message, kind="validation", errors=[FieldError(field=field, message=message)]
    )


async def visible_user(conn: Connection, principal: Principal, user_id: UUID) -> asyncpg.Record:
    """The account, or 404 when it does not exist or is not the manager's to see."""
    manager(principal)
    row = await conn.fetchrow(sql.USER, user_id)
    if row is None:
        raise not_found("user")
    if principal.role != "admin" and (
        row["clinic_id"] is None or row["clinic_id"] != principal.clinic_id
    ):
        raise not_found("user")
    return row


async def strong(
    request: Request, password: str, *, email: str, display_name: str, field: str
) -> str:
    """The password's argon2id hash, or 422 saying why it is refused (never echoing it).
    Hashing runs on a worker thread: ~50 ms of CPU would stall every request on the loop."""
    settings: ApiSettings = request.app.state.settings
    try:
        passwords.check(
            password,
            min_length=settings.api_password_min_length,
            email=email,
            display_name=display_name,
        )
    except passwords.WeakPassword as exc:
        raise _field(field, f"password refused: {exc}") from exc
    return await asyncio.to_thread(passwords.hash_password, password)


@dataclass(frozen=True, slots=True)
class Link:
    url: str
    expires_at: datetime


def base_url(request: Request) -> str:
    """Where people reach the dashboard: the configured public URL, else this request's."""
    public: str = request.app.state.settings.api_public_url
    return public or str(request.base_url)


async def new_link(
    conn: Connection,
    settings: ApiSettings,
    base: str,
    *,
    user_id: UUID,
    purpose: Purpose,
    now: datetime,
) -> Link:
    """A one-time link for the person (replacing their unused ones of this purpose) under
    ``base``; only its hash is stored. Call inside the transaction of the change."""
    seconds = (
        settings.api_invitation_validity_h * 3600
        if purpose == "invitation"
        else settings.api_reset_validity_min * 60
    )
    token = secrets.token_urlsafe(32)
    await conn.execute(sql.SPEND_LINKS, user_id, purpose, now)
    await conn.execute(sql.INSERT_LINK, link_hash(token), user_id, purpose, now, seconds)
    return Link(f"{base.rstrip('/')}{LINK_PATH}{token}", now + timedelta(seconds=seconds))


async def use_link(
    conn: Connection, request: Request, token: str, password: str, now: datetime
) -> asyncpg.Record:
    """Spend the link (once, unexpired, of an active person) and set the password; every
    session and token of the person ends. 400 for a link that does not work."""
    found = await conn.fetchrow(sql.USE_LINK, link_hash(token), now)
    if found is None:
        raise Problem(
            400,
            "this link does not work: it was used, it expired, or a newer one replaced it; "
            "ask your clinic's administrator for a new one",
            kind="link-expired",
        )
    hashed = await strong(
        request,
        password,
        email=found["email"],
        display_name=found["display_name"],
        field="body.password",
    )
    await conn.execute(sql.SET_PASSWORD, found["user_id"], hashed, now)
    await end_sessions(conn, found["user_id"])
    return found


async def end_sessions(conn: Connection, user_id: UUID) -> None:
    """Every bearer token and dashboard session of the person ends now."""
    await conn.execute(sql.END_USER_TOKENS, user_id)
    await conn.execute(sql.END_USER_SESSIONS, user_id)


# --- email (the notifier's SMTP settings) --------------------------------------------------------


async def email_link(
    settings: ApiSettings, *, to: str, name: str, link: Link, purpose: Purpose
) -> bool:
    """Email the link when SMTP is configured; False (logged, never raised) if it could not be
    sent: the change stands, and an administrator can make a new link. Never logs the link."""
    if not settings.smtp_url:
        return False
    mail = EmailMessage()
    mail["From"] = settings.smtp_from
    mail["To"] = to
    if purpose == "invitation":
        mail["Subject"] = "Your pumpwatch account"
        first = "An account was made for you on pumpwatch. Choose your password here:"
    else:
        mail["Subject"] = "Reset your pumpwatch password"
        first = "Someone (we hope you) asked to reset your pumpwatch password. Choose a new one:"
    mail["Auto-Submitted"] = "auto-generated"
    mail.set_content(
        f"Hello {name},\n\n{first}\n\n{link.url}\n\n"
        f"The link works once, until {link.expires_at:%Y-%m-%d %H:%M} UTC. If you did not "
        "expect this email, ignore it.\n"
    )
    target = _smtp(settings.smtp_url)
    tls = target["tls"]
    start_tls = (
        False if tls else {"require": True, "auto": None, "off": False}[settings.smtp_starttls]
    )
    try:
        await aiosmtplib.send(
            mail,
            hostname=target["host"],
            port=target["port"],
            username=target["username"],
            password=target["password"],
            use_tls=tls,
            start_tls=start_tls,
            timeout=settings.smtp_timeout_s,
        )
    except (aiosmtplib.SMTPException, OSError) as exc:
        log.warning("user_link_email_failed", purpose=purpose, error=type(exc).__name__)
        return False
    log.info("user_link_emailed", purpose=purpose)
    return True


def _smtp(url: str) -> dict[str, Any]:
    """``smtp://user:pass@host:port`` or ``smtps://…``, as the notifier reads it."""
    parts = urlsplit(url)
    tls = parts.scheme == "smtps"
    return {
        "host": parts.hostname or "localhost",
        "port": parts.port or (465 if tls else 587),
        "username": unquote(parts.username) if parts.username else None,
        "password": unquote(parts.password) if parts.password else None,
        "tls": tls,
    }
