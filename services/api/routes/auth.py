"""People sign in: the OAuth2 password form for a bearer token, sign-out, password change,
reset by email, and the one-time links (invitation, reset) that set a password."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response, status
from fastapi.security import OAuth2PasswordRequestForm

from services.api import audit, clock, models, passwords, people, signin, sql
from services.api.auth import Principal
from services.api.common import Auth, Db
from services.api.problems import FieldError, Problem

router = APIRouter(prefix="/v1/auth", tags=["auth"])


@router.post(
    "/token",
    summary="Sign in: the OAuth2 password form (username = email) for a bearer token",
    responses={429: {"description": "Too many wrong passwords: wait (Retry-After)"}},
)
async def token(
    form: Annotated[OAuth2PasswordRequestForm, Depends()], db: Db, request: Request
) -> models.TokenOut:
    """`application/x-www-form-urlencoded` with `username` (the email) and `password`. The
    token carries the person's role and clinic (as they are at each request), ends after the
    session lifetime and idles out; `POST /v1/auth/logout` ends it."""
    if len(form.username) > 254 or len(form.password) > 200:
        raise Problem(401, signin.WRONG, kind="unauthenticated")
    principal = await signin.sign_in(db, request, form.username, form.password)
    found, lifetime = await signin.issue_token(db, request, principal)
    return models.TokenOut(access_token=found, expires_in=lifetime)


@router.post(
    "/logout",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Sign out: the bearer token used ends",
    response_class=Response,
)
async def logout(principal: Auth, db: Db, request: Request) -> Response:
    if principal.token_hash is None:
        raise Problem(
            403,
            "only a person's token signs out (an API key is revoked with `pumpwatch keys revoke`)",
            kind="forbidden",
        )
    async with db.transaction():
        await db.execute(sql.END_USER_TOKEN, principal.token_hash)
        await audit.record(
            db,
            request,
            action="post logout",
            resource_type="users",
            resource_id=principal.user_id,
            clinic_id=principal.clinic_id,
            status=204,
        )
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/password",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Change one's own password; every other session and token ends",
    response_class=Response,
)
async def change_password(
    body: models.PasswordChangeIn, principal: Auth, db: Db, request: Request
) -> Response:
    if principal.user_id is None:
        raise Problem(403, "API keys have no password", kind="forbidden")
    stored = await db.fetchval(sql.PASSWORD_HASH, principal.user_id)
    if not await asyncio.to_thread(passwords.verify, stored, body.current_password):
        raise Problem(
            422,
            "the current password is wrong",
            kind="validation",
            errors=[FieldError(field="body.current_password", message="wrong")],
        )
    row = await db.fetchrow(sql.USER, principal.user_id)
    assert row is not None
    hashed = await people.strong(
        request,
        body.new_password,
        email=row["email"],
        display_name=row["display_name"],
        field="body.new_password",
    )
    now = await clock.now(db, request)
    async with db.transaction():
        await db.execute(sql.SET_PASSWORD, principal.user_id, hashed, now)
        await people.end_sessions(db, principal.user_id)
        if principal.token_hash is not None:  # this one stays: it just proved the password
            await db.execute(
                sql.INSERT_USER_TOKEN,
                principal.token_hash,
                principal.user_id,
                now,
                request.app.state.settings.api_token_lifetime_s,
            )
        await audit.record(
            db,
            request,
            action="post change_password",
            resource_type="users",
            resource_id=principal.user_id,
            clinic_id=principal.clinic_id,
            status=204,
        )
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/password-reset",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Email a one-time password-reset link (always 202: no account is revealed)",
    response_class=Response,
)
async def request_reset(body: models.PasswordResetIn, db: Db, request: Request) -> Response:
    """The link is emailed when the email is an active account's and SMTP is configured; the
    answer is the same either way."""
    email = body.email.strip().lower()
    row = await db.fetchrow(sql.USER_FOR_SIGNIN, email)
    now = await clock.now(db, request)
    link = None
    async with db.transaction():
        if row is not None and request.app.state.settings.smtp_url:
            link = await people.new_link(
                db,
                request.app.state.settings,
                people.base_url(request),
                user_id=row["id"],
                purpose="reset",
                now=now,
            )
        await audit.record(
            db,
            request,
            action="post request_reset",
            resource_type="users",
            resource_id=None if row is None else row["id"],
            clinic_id=None if row is None else row["clinic_id"],
            status=202,
        )
    if link is not None and row is not None:
        await people.email_link(
            request.app.state.settings,
            to=email,
            name=row["display_name"],
            link=link,
            purpose="reset",
        )
    return Response(status_code=status.HTTP_202_ACCEPTED)


@router.post(
    "/set-password",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Choose a password with a one-time link's token (invitation or reset)",
    response_class=Response,
)
async def set_password(body: models.SetPasswordIn, db: Db, request: Request) -> Response:
    await set_with_link(db, request, body.token, body.password)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


async def set_with_link(db: Db, request: Request, token: str, password: str) -> None:
    """Shared with the dashboard's page: spend the link and set the password, audited in the
    same transaction."""
    now = await clock.now(db, request)
    async with db.transaction():
        found = await people.use_link(db, request, token, password, now)
        await audit.record(
            db,
            request,
            action=f"post set_password ({found['purpose']})",
            resource_type="users",
            resource_id=found["user_id"],
            clinic_id=found["clinic_id"],
            status=204,
            principal=Principal(None, found["role"], found["clinic_id"], user_id=found["user_id"]),
        )
