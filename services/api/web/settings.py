"""Clinic settings in the dashboard, for the clinic's administrators (``clinic_admin``: their own
clinic; ``admin``: the clinic they pick): the clinic's people — invite, change role, deactivate.
Thresholds and notification routes: :mod:`settings_alerts`; webhooks: :mod:`settings_webhooks`.

Every action calls the JSON API's own route function with the session's principal (its checks,
its transaction and the audit row naming the signed-in person); a refusal comes back on the page
in words. Clinicians (and everyone else) get the "not found" page."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import quote
from uuid import UUID

from fastapi import APIRouter, Form, Request, Response
from fastapi.responses import RedirectResponse
from pydantic import ValidationError
from starlette.datastructures import FormData

from services.api import models
from services.api.common import Db
from services.api.problems import Problem, not_found
from services.api.routes import clinics as clinic_routes
from services.api.routes import users as user_routes
from services.api.web import sessions
from services.api.web.patients import field_errors
from services.api.web.routes import _check_csrf, _page, _session, _to_login, _zone

router = APIRouter(include_in_schema=False)

MANAGERS = ("clinic_admin", "admin")
CLINIC_ROLES = ("clinician", "clinic_admin")
ROLE_WORDS = {"clinician": "clinician (nurse, physician)", "clinic_admin": "clinic administrator"}
USER_WORDS = {"email": "Email", "display_name": "Name", "role": "Role"}
SECTIONS = (
    ("users", "People"),
    ("alerts", "Alert thresholds"),
    ("notifications", "Notifications"),
    ("webhooks", "Webhooks"),
)


FIELD_MAX = 4000


def posted_text(form: FormData, name: str) -> str:
    """A posted form's field, trimmed ("" when absent)."""
    found = form.get(name)
    return found.strip()[:FIELD_MAX] if isinstance(found, str) else ""


def posted_list(form: FormData, name: str) -> list[str]:
    """A posted form's repeated field (checkboxes)."""
    return [v[:200] for v in form.getlist(name) if isinstance(v, str)][:50]


@dataclass(frozen=True, slots=True)
class Place:
    """Who manages which clinic's settings."""

    session: sessions.Session
    clinic_id: UUID
    clinic_name: str
    admin: bool

    def url(self, section: str, **params: str) -> str:
        """A settings page's address (an administrator's carries the clinic chosen)."""
        query = ({"clinic": str(self.clinic_id)} if self.admin else {}) | params
        tail = "&".join(f"{k}={quote(v)}" for k, v in query.items())
        return f"/settings/{section}" + (f"?{tail}" if tail else "")


def _clinic_param(value: str | None) -> UUID | str | None:
    """The ``clinic`` chosen (None: none; ``"bad"``: not an id)."""
    if not value:
        return None
    try:
        return UUID(value.strip())
    except ValueError:
        return "bad"


async def place(
    db: Db, request: Request, clinic: str | None, *, csrf: str | None = None
) -> Place | Response:
    """The signed-in manager and the clinic whose settings they see, or the page to show
    instead: sign-in, "not found" (not a manager, another clinic's), or an administrator's
    choice of clinic. ``csrf``: a form's token, checked before anything else is looked at."""
    session = await _session(db, request)
    if session is None:
        return _to_login(request)
    if csrf is not None:
        _check_csrf(session, csrf)
    principal = session.principal
    chosen = _clinic_param(clinic)
    target = chosen if principal.role == "admin" else principal.clinic_id
    if principal.role == "admin" and chosen is None and csrf is None:
        listed = await clinic_routes.list_clinics(principal, db, limit=200, cursor=None)
        return _page("settings_pick.html", session=session, clinics=listed.items)
    name = None
    if principal.role in MANAGERS and isinstance(target, UUID) and chosen in (None, target):
        try:
            name = (await clinic_routes.get_clinic(target, principal, db)).name
        except Problem as exc:
            if exc.status != 404:
                raise
    if name is None or not isinstance(target, UUID):
        return _page("missing.html", status=404, session=session)
    return Place(session, target, name, principal.role == "admin")


async def posted_place(db: Db, request: Request) -> tuple[FormData, Place | Response]:
    """A settings form as posted, and its place (the CSRF token checked first)."""
    posted = await request.form()
    found = await place(
        db, request, posted_text(posted, "clinic"), csrf=posted_text(posted, "csrf_token")
    )
    return posted, found


def render(where: Place, section: str, template: str, status: int = 200, **ctx: Any) -> Response:
    """A settings page: the clinic's name, the sections, the session's CSRF token."""
    return _page(
        template,
        status=status,
        session=where.session,
        where=where,
        section=section,
        sections=SECTIONS,
        clinic_field=str(where.clinic_id) if where.admin else "",
        **ctx,
    )


@router.get("/settings", tags=["settings"])
async def settings_home(request: Request, db: Db, clinic: str | None = None) -> Response:
    where = await place(db, request, clinic)
    if not isinstance(where, Place):
        return where
    return RedirectResponse(where.url("users"), status_code=303)


# --- people ---------------------------------------------------------------------------------------


async def _people(
    db: Db,
    where: Place,
    *,
    errors: list[str] | None = None,
    form: dict[str, str] | None = None,
    invited: models.UserCreated | None = None,
    emailed: bool = False,
    notice: str | None = None,
    status: int = 200,
) -> Response:
    principal = where.session.principal
    people: list[models.User] = []
    cursor = None
    while True:
        page = await user_routes.list_users(principal, db, limit=200, cursor=cursor)
        people.extend(u for u in page.items if u.clinic_id == where.clinic_id)
        cursor = page.next_cursor
        if cursor is None:
            break
    return render(
        where,
        "users",
        "settings_users.html",
        status=status,
        people=people,
        role_words=ROLE_WORDS,
        errors=errors or [],
        form=form or {"role": "clinician"},
        invited=invited,
        emailed=emailed,
        notice=notice,
        tz=await _zone(db, where.clinic_id),
    )


@router.get("/settings/users", tags=["settings"])
async def users_page(request: Request, db: Db, clinic: str | None = None) -> Response:
    where = await place(db, request, clinic)
    if not isinstance(where, Place):
        return where
    return await _people(db, where)


@router.post("/settings/users", tags=["settings"])
async def invite(
    request: Request,
    db: Db,
    csrf_token: Annotated[str, Form(max_length=200)] = "",
    clinic: Annotated[str, Form(max_length=64)] = "",
    email: Annotated[str, Form(max_length=400)] = "",
    display_name: Annotated[str, Form(max_length=400)] = "",
    role: Annotated[str, Form(max_length=40)] = "clinician",
) -> Response:
    """Invite a person to the clinic (the API's ``POST /v1/users`` without a password: a
    one-time link, shown here once and emailed when SMTP is set)."""
    where = await place(db, request, clinic, csrf=csrf_token)
    if not isinstance(where, Place):
        return where
    form = {"email": email.strip(), "display_name": display_name.strip(), "role": role}
    if role not in CLINIC_ROLES:
        return await _people(
            db,
            where,
            errors=["Role: choose clinician or clinic administrator"],
            form=form,
            status=422,
        )
    given = {k: v for k, v in form.items() if v != ""}
    try:
        body = models.UserIn.model_validate(given | {"clinic_id": str(where.clinic_id)})
    except ValidationError as exc:
        errors = field_errors(exc, USER_WORDS)
        return await _people(db, where, errors=errors, form=form, status=422)
    try:
        created = await user_routes.create_user(
            body, where.session.principal, db, request, Response()
        )
    except Problem as exc:
        if exc.status not in (403, 404, 409, 422):
            raise
        return await _people(db, where, errors=[exc.detail], form=form, status=exc.status)
    emailed = bool(request.app.state.settings.smtp_url)
    return await _people(db, where, invited=created, emailed=emailed)


async def _change(
    db: Db, request: Request, where: Place, user_id: UUID, patch: models.UserPatch | None
) -> Response:
    """Change a person's role (``patch``) or deactivate them (None): the API's own route."""
    principal = where.session.principal
    try:
        person = await user_routes.get_user(user_id, principal, db)
        if person.clinic_id != where.clinic_id:
            raise not_found("user")
        if patch is None:
            await user_routes.delete_user(user_id, principal, db, request)
            notice = f"{person.display_name} is deactivated: their sessions ended."
        else:
            changed = await user_routes.patch_user(user_id, patch, principal, db, request)
            notice = f"{changed.display_name} is now {ROLE_WORDS[changed.role]}."
    except Problem as exc:
        if exc.status not in (403, 404, 409, 422):
            raise
        words = "No such person in this clinic." if exc.status == 404 else exc.detail
        return await _people(db, where, errors=[words], status=exc.status)
    return await _people(db, where, notice=notice)


@router.post("/settings/users/{user_id}/role", tags=["settings"])
async def change_role(
    request: Request,
    db: Db,
    user_id: UUID,
    csrf_token: Annotated[str, Form(max_length=200)] = "",
    clinic: Annotated[str, Form(max_length=64)] = "",
    role: Annotated[str, Form(max_length=40)] = "",
) -> Response:
    where = await place(db, request, clinic, csrf=csrf_token)
    if not isinstance(where, Place):
        return where
    if role not in CLINIC_ROLES:
        errors = ["Role: choose clinician or clinic administrator"]
        return await _people(db, where, errors=errors, status=422)
    if user_id == where.session.principal.user_id:
        errors = ["You cannot change your own role here: ask another administrator."]
        return await _people(db, where, errors=errors, status=409)
    patch = models.UserPatch.model_validate({"role": role})
    return await _change(db, request, where, user_id, patch)


@router.post("/settings/users/{user_id}/deactivate", tags=["settings"])
async def deactivate(
    request: Request,
    db: Db,
    user_id: UUID,
    csrf_token: Annotated[str, Form(max_length=200)] = "",
    clinic: Annotated[str, Form(max_length=64)] = "",
) -> Response:
    """Deactivate a person: the API ends their sessions and tokens at once."""
    where = await place(db, request, clinic, csrf=csrf_token)
    if not isinstance(where, Place):
        return where
    if user_id == where.session.principal.user_id:
        errors = ["You cannot deactivate your own account here: ask another administrator."]
        return await _people(db, where, errors=errors, status=409)
    return await _change(db, request, where, user_id, None)
