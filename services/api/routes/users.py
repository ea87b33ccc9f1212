"""People's accounts: create (with a password, or a one-time invitation link), list, rename,
change role, deactivate (their sessions and tokens end at once), and a new invitation link."""

from __future__ import annotations

from uuid import UUID

from fastapi import APIRouter, Request, Response, status

from services.api import audit, clock, models, people, sql
from services.api.common import Auth, Cursor, Db, Limit, cursor_uuid, decode_cursor, encode_cursor
from services.api.problems import Problem, not_found

router = APIRouter(prefix="/v1/users", tags=["users"])


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    summary="Create a person's account (admin; clinic_admin for their clinic)",
)
async def create_user(
    body: models.UserIn, principal: Auth, db: Db, request: Request, response: Response
) -> models.UserCreated:
    """With `password`, the person signs in with it; without, the answer carries a one-time
    `invitation_url` (72 h), also emailed to the person when SMTP is configured."""
    people.manager(principal)
    clinic_id = people.placed(principal, body.role, body.clinic_id)
    email = body.email.strip().lower()
    if clinic_id is not None and not await db.fetchval(sql.CLINIC_EXISTS, clinic_id):
        raise not_found("clinic")
    hashed = None
    if body.password is not None:
        hashed = await people.strong(
            request,
            body.password,
            email=email,
            display_name=body.display_name,
            field="body.password",
        )
    now = await clock.now(db, request)
    link = None
    async with db.transaction():
        row = await db.fetchrow(
            sql.INSERT_USER, email, body.display_name, body.role, clinic_id, hashed, principal.actor
        )
        if row is None:
            raise Problem(409, f"an account with email {email} exists", kind="conflict")
        if hashed is None:
            link = await people.new_link(
                db,
                request.app.state.settings,
                people.base_url(request),
                user_id=row["id"],
                purpose="invitation",
                now=now,
            )
        await audit.record(
            db,
            request,
            action="post create_user",
            resource_type="users",
            resource_id=row["id"],
            clinic_id=clinic_id,
            status=201,
        )
    if link is not None:
        await people.email_link(
            request.app.state.settings,
            to=email,
            name=body.display_name,
            link=link,
            purpose="invitation",
        )
    response.headers["Location"] = f"/v1/users/{row['id']}"
    return models.UserCreated(
        **people.user_out(row).model_dump(),
        invitation_url=None if link is None else link.url,
        invitation_expires_at=None if link is None else link.expires_at,
    )


@router.get("", summary="People's accounts, by name (admin: all; clinic_admin: their clinic's)")
async def list_users(
    principal: Auth, db: Db, limit: Limit = 50, cursor: Cursor = None
) -> models.Page[models.User]:
    people.manager(principal)
    after = decode_cursor(cursor, 2)
    rows = await db.fetch(
        sql.LIST_USERS,
        people.scope(principal),
        None if after is None else after[0],
        None if after is None else cursor_uuid(after[1]),
        limit + 1,
    )
    items = [people.user_out(r) for r in rows[:limit]]
    more = len(rows) > limit
    return models.Page(
        items=items,
        next_cursor=encode_cursor(items[-1].display_name, items[-1].id) if more else None,
    )


@router.get("/{user_id}", summary="A person's account")
async def get_user(user_id: UUID, principal: Auth, db: Db) -> models.User:
    return people.user_out(await people.visible_user(db, principal, user_id))


@router.patch("/{user_id}", summary="Rename, change the role or clinic of a person's account")
async def patch_user(
    user_id: UUID, body: models.UserPatch, principal: Auth, db: Db, request: Request
) -> models.User:
    """The change applies at once to the person's tokens and sessions (they carry no role of
    their own)."""
    before = await people.visible_user(db, principal, user_id)
    role = body.role or before["role"]
    moves = "clinic_id" in body.model_fields_set or body.role is not None
    given = body.clinic_id if "clinic_id" in body.model_fields_set else before["clinic_id"]
    if role not in people.CLINIC_USER_ROLES and "clinic_id" not in body.model_fields_set:
        given = None  # becoming admin or fleet leaves the clinic
    clinic_id = people.placed(principal, role, given) if moves else before["clinic_id"]
    if clinic_id is not None and not await db.fetchval(sql.CLINIC_EXISTS, clinic_id):
        raise not_found("clinic")
    async with db.transaction():
        row = await db.fetchrow(
            sql.UPDATE_USER, user_id, body.display_name, body.role, clinic_id, moves
        )
        if row is None:
            raise Problem(409, "the account is deactivated", kind="conflict")
        await audit.record(
            db,
            request,
            action="patch patch_user",
            resource_type="users",
            resource_id=user_id,
            clinic_id=clinic_id,
        )
    return people.user_out(row)


@router.delete(
    "/{user_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Deactivate a person's account: their sessions and tokens end at once",
    response_class=Response,
)
async def delete_user(user_id: UUID, principal: Auth, db: Db, request: Request) -> Response:
    before = await people.visible_user(db, principal, user_id)
    now = await clock.now(db, request)
    async with db.transaction():
        await db.fetchrow(sql.DEACTIVATE_USER, user_id, now)
        await people.end_sessions(db, user_id)
        await audit.record(
            db,
            request,
            action="delete delete_user",
            resource_type="users",
            resource_id=user_id,
            clinic_id=before["clinic_id"],
            status=204,
        )
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/{user_id}/invitation",
    status_code=status.HTTP_201_CREATED,
    summary="A new one-time link for the person to choose a password (replaces older ones)",
)
async def invite_again(
    user_id: UUID, principal: Auth, db: Db, request: Request
) -> models.Invitation:
    """For a person who lost their invitation or forgot their password when email is not set
    up: the link works once, for 72 h, and is emailed when SMTP is configured."""
    row = await people.visible_user(db, principal, user_id)
    if row["deactivated_at"] is not None:
        raise Problem(409, "the account is deactivated", kind="conflict")
    now = await clock.now(db, request)
    async with db.transaction():
        link = await people.new_link(
            db,
            request.app.state.settings,
            people.base_url(request),
            user_id=user_id,
            purpose="invitation",
            now=now,
        )
        await audit.record(
            db,
            request,
            action="post invite_again",
            resource_type="users",
            resource_id=user_id,
            clinic_id=row["clinic_id"],
            status=201,
        )
    await people.email_link(
        request.app.state.settings,
        to=row["email"],
        name=row["display_name"],
        link=link,
        purpose="invitation",
    )
    return models.Invitation(invitation_url=link.url, expires_at=link.expires_at)
