"""Clinic settings in the dashboard, over the app's ASGI stack on a real PostgreSQL: a clinic
administrator invites a person, changes a role and deactivates someone (whose session ends at
once), sets the alert thresholds and the notification routes, and adds, rotates and deletes a
webhook — each through the API's own route, its audit row naming her. A clinician of the clinic
gets "not found" for every settings page and form, an administrator of another clinic sees and
changes none of it, every form needs the session's CSRF token, and bad input comes back in
words."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest

from services.api import passwords
from tests import alert_fixtures as fx
from tests.api_support import Api, running_api
from tests.notify_support import smtp_sink

PASSWORD = "lantern walnut harbour 47"
ANN, NORA, BEA, ROOT = "ann@north.example", "nora@north.example", "bea@south.example", "root@x.ex"
HOOK = "https://ehr.north.example/hooks/pumpwatch"

Form = dict[str, str | list[str]]


@dataclass
class Browser:
    client: httpx.AsyncClient
    csrf: str

    async def post(self, path: str, data: Form | None = None, *, csrf: bool = True) -> Any:
        given: Form = {"csrf_token": self.csrf} if csrf else {}
        return await self.client.post(path, data=given | (data or {}))

    async def get(self, path: str) -> httpx.Response:
        return await self.client.get(path)


@dataclass
class World:
    api: Api
    a: str
    b: str
    ids: dict[str, uuid.UUID]

    async def sql(self, statement: str, *args: object) -> list[asyncpg.Record]:
        conn = await self.api.conn()
        try:
            return list(await conn.fetch(statement, *args))
        finally:
            await conn.close()

    @asynccontextmanager
    async def signed_in(self, email: str) -> AsyncIterator[Browser]:
        transport = httpx.ASGITransport(app=self.api.app, client=("192.0.2.31", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            token = _csrf((await client.get("/login")).text)
            signed = await client.post(
                "/login", data={"email": email, "password": PASSWORD, "csrf_token": token}
            )
            assert signed.status_code == 303, signed.text
            yield Browser(client, _csrf((await client.get("/patients")).text))

    async def audited(self, who: str, resource_type: str) -> list[tuple[str, str, int]]:
        rows = await self.sql(
            "SELECT action, resource_id, status FROM audit_log WHERE user_id = $1 "
            "AND resource_type = $2 AND outcome = 'ok' AND action NOT LIKE 'get %' "
            "AND action NOT LIKE 'post sign-%' ORDER BY id",
            self.ids[who],
            resource_type,
        )
        return [(r["action"], r["resource_id"], r["status"]) for r in rows]


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found is not None
    return found[1]


async def _seed(api: Api) -> World:
    conn = await api.conn()
    try:
        a = await fx.clinic(conn, name="North", timezone="Europe/Berlin")
        b = await fx.clinic(conn, name="South", timezone="America/New_York")
        hashed = passwords.hash_password(PASSWORD)
        ids = {}
        for email, name, role, home in (
            (ANN, "Ann Admin", "clinic_admin", a),
            (NORA, "Nora Nurse", "clinician", a),
            (BEA, "Bea South", "clinic_admin", b),
            (ROOT, "Rob Root", "admin", None),
        ):
            ids[email] = await conn.fetchval(
                "INSERT INTO users (email, display_name, role, clinic_id, password_hash, "
                "created_by) VALUES ($1, $2, $3, $4, $5, 'test') RETURNING id",
                email,
                name,
                role,
                None if home is None else uuid.UUID(home),
                hashed,
            )
    finally:
        await conn.close()
    return World(api, a, b, ids)


@pytest.fixture
async def world(database_url: str) -> AsyncIterator[World]:
    async with running_api(database_url, api_auth_failures_per_minute=10_000) as api:
        yield await _seed(api)


async def _hook_of(world: World, clinic: str) -> str:
    """A webhook of ``clinic``, registered directly."""
    rows = await world.sql(
        "INSERT INTO webhooks (clinic_id, url, events, secret, created_by) "
        "VALUES ($1, $2, $3, 'whsec_dGVzdHRlc3R0ZXN0dGVzdHRlc3R0ZXN0', 'test') RETURNING id",
        uuid.UUID(clinic),
        HOOK,
        ["alert.opened"],
    )
    return str(rows[0]["id"])


async def test_a_clinic_admin_invites_changes_a_role_and_deactivates(world: World) -> None:
    async with world.signed_in(ANN) as ann, world.signed_in(NORA) as nora:
        home = await ann.get("/")
        assert '<a href="/settings">Clinic settings</a>' in home.text
        assert (await ann.get("/settings")).headers["location"] == "/settings/users"
        page = await ann.get("/settings/users")
        assert page.status_code == 200
        assert "Clinic settings" in page.text
        assert "North" in page.text
        assert "Nora Nurse" in page.text
        assert "Bea South" not in page.text  # another clinic's
        assert "Rob Root" not in page.text

        bad = await ann.post(
            "/settings/users", {"display_name": "", "email": "nina", "role": "clinician"}
        )
        assert bad.status_code == 422
        assert "Name: required" in bad.text
        assert "Email: String should match pattern" in bad.text
        above = await ann.post(
            "/settings/users", {"display_name": "Al", "email": "al@x.example", "role": "admin"}
        )
        assert above.status_code == 422
        assert "Role: choose clinician or clinic administrator" in above.text

        invited = await ann.post(
            "/settings/users",
            {"display_name": "Nina Nurse", "email": "Nina@North.example", "role": "clinician"},
        )
        assert invited.status_code == 200, invited.text
        assert "Nina Nurse is invited" in invited.text
        link = re.search(r'id="invitation-url">([^<]+)<', invited.text)
        assert link is not None
        assert "/set-password/" in link[1]
        assert "Email is not set up" in invited.text
        assert (await ann.get("/settings/users")).text.count("/set-password/") == 0  # once
        nina = (
            await world.sql(
                "SELECT id, role, clinic_id, created_by FROM users WHERE email = $1",
                "nina@north.example",
            )
        )[0]
        assert nina["role"] == "clinician"
        assert str(nina["clinic_id"]) == world.a
        assert str(world.ids[ANN]) in nina["created_by"] or "Ann" in nina["created_by"]
        again = await ann.post(
            "/settings/users",
            {"display_name": "Nina Two", "email": "nina@north.example", "role": "clinician"},
        )
        assert again.status_code == 409
        assert "an account with email nina@north.example exists" in again.text

        promoted = await ann.post(f"/settings/users/{nina['id']}/role", {"role": "clinic_admin"})
        assert promoted.status_code == 200
        assert "Nina Nurse is now clinic administrator" in promoted.text
        role = await world.sql("SELECT role FROM users WHERE id = $1", nina["id"])
        assert role[0]["role"] == "clinic_admin"

        assert (await nora.get("/patients")).status_code == 200
        ended = await ann.post(f"/settings/users/{world.ids[NORA]}/deactivate")
        assert ended.status_code == 200
        assert "Nora Nurse is deactivated: their sessions ended" in ended.text
        gone = await nora.get("/patients")
        assert gone.status_code == 303  # her session ended at once
        assert gone.headers["location"] == "/login"
        self_end = await ann.post(f"/settings/users/{world.ids[ANN]}/deactivate")
        assert self_end.status_code == 409
        assert "You cannot deactivate your own account" in self_end.text
        self_role = await ann.post(f"/settings/users/{world.ids[ANN]}/role", {"role": "clinician"})
        assert self_role.status_code == 409
        assert "You cannot change your own role here" in self_role.text

    assert await world.audited(ANN, "users") == [
        ("post create_user", str(nina["id"]), 201),
        ("patch patch_user", str(nina["id"]), 200),
        ("delete delete_user", str(world.ids[NORA]), 204),
    ]


async def test_a_clinic_admin_sets_thresholds_and_notification_routes(world: World) -> None:
    async with world.signed_in(ANN) as ann:
        page = await ann.get("/settings/alerts")
        assert page.status_code == 200
        assert "Refill due: low priority, days" in page.text
        assert "Default: 14 days." in page.text
        assert "Default: 7 days." in page.text

        bad = await ann.post(
            "/settings/alerts", {"refill_due_low_days": "-1", "silent_max_days": "soon"}
        )
        assert bad.status_code == 422
        assert "Refill due: low priority: Input should be greater than 0" in bad.text
        assert "Pump silent after at most: Input should be a valid number" in bad.text
        assert 'value="soon"' in bad.text  # shown again as typed
        saved = await ann.post(
            "/settings/alerts",
            {"refill_due_low_days": "21", "disabled_rules": ["dose_escalation"]},
        )
        assert saved.status_code == 200
        assert "The alert thresholds are saved." in saved.text
        assert 'value="21"' in saved.text
        stored = await world.sql("SELECT alert_settings FROM clinics WHERE id = $1", world.a)
        assert stored[0]["alert_settings"] == {
            "refill_due_low_days": 21.0,
            "disabled_rules": ["dose_escalation"],
        }

        routes = await ann.get("/settings/notifications")
        assert routes.status_code == 200
        assert "Quiet hours" in routes.text
        base: Form = {
            "email_high": "oncall@north.example, consultant@north.example",
            "email_events": ["alert.opened", "alert.escalated"],
            "patient_names": "on",
            "webhook_priorities": ["high", "medium", "low"],
            "mqtt_priorities": ["high"],
            "escalation_enabled": "on",
            "after_minutes": "30",
            "quiet_enabled": "on",
            "quiet_start": "22:00",
            "quiet_end": "22:00",
            "quiet_channels": ["email"],
            "digest_enabled": "on",
            "digest_hour": "6",
        }
        refused = await ann.post("/settings/notifications", base | {"email_medium": "ward nurses"})
        assert refused.status_code == 422
        assert "Medium-priority addresses: “ward” is not an email address" in refused.text
        assert "Quiet hours: quiet hours must not start and end at the same time" in refused.text
        assert "ward nurses" in refused.text
        saved = await ann.post("/settings/notifications", base | {"quiet_end": "07:00"})
        assert saved.status_code == 200, saved.text
        assert "The notification routes are saved." in saved.text
        raw = (await world.sql("SELECT notification_settings FROM clinics WHERE id = $1", world.a))[
            0
        ]["notification_settings"]
        routed = raw if isinstance(raw, dict) else json.loads(raw)
        assert routed["email"]["high"] == ["oncall@north.example", "consultant@north.example"]
        assert routed["quiet_hours"]["start"] == "22:00:00"
        assert routed["quiet_hours"]["end"] == "07:00:00"
        assert routed["escalation"]["after_minutes"] == 30.0
        assert routed["digest"]["hour"] == 6
        assert routed["mqtt_priorities"] == ["high"]
        shown = await ann.get("/settings/notifications")
        assert "oncall@north.example\nconsultant@north.example" in shown.text
        assert 'value="07:00"' in shown.text

    assert await world.audited(ANN, "clinics") == [
        ("post save_thresholds", world.a, 200),
        ("post save_routes", world.a, 200),
    ]


async def test_a_clinic_admin_adds_rotates_and_deletes_a_webhook(world: World) -> None:
    async with world.signed_in(ANN) as ann:
        assert "No webhooks yet." in (await ann.get("/settings/webhooks")).text
        plain = await ann.post(
            "/settings/webhooks", {"url": "http://ehr.north.example/h", "events": ["alert.opened"]}
        )
        assert plain.status_code == 422
        assert "url refused: the URL must use https" in plain.text
        none = await ann.post("/settings/webhooks", {"url": HOOK})
        assert none.status_code == 422
        assert "Events: List should have at least 1 item" in none.text

        added = await ann.post(
            "/settings/webhooks", {"url": HOOK, "events": ["alert.opened", "refill.recorded"]}
        )
        assert added.status_code == 200, added.text
        first = re.search(r'id="secret-value">(whsec_[^<]+)<', added.text)
        assert first is not None
        hook = (await world.sql("SELECT id, clinic_id, events FROM webhooks"))[0]
        assert str(hook["clinic_id"]) == world.a
        assert sorted(hook["events"]) == ["alert.opened", "refill.recorded"]
        listed = await ann.get("/settings/webhooks")
        assert HOOK in listed.text
        assert first[1] not in listed.text  # shown once

        bad = await ann.post(f"/settings/webhooks/{hook['id']}/rotate", {"overlap_hours": "-3"})
        assert bad.status_code == 422
        assert "Overlap: Input should be greater than or equal to 0" in bad.text
        rotated = await ann.post(f"/settings/webhooks/{hook['id']}/rotate", {"overlap_hours": "2"})
        assert rotated.status_code == 200
        second = re.search(r'id="secret-value">(whsec_[^<]+)<', rotated.text)
        assert second is not None
        assert second[1] != first[1]
        assert "The old secret keeps signing during the overlap" in rotated.text

        deleted = await ann.post(f"/settings/webhooks/{hook['id']}/delete")
        assert deleted.status_code == 200
        assert f"The webhook to {HOOK} is deleted." in deleted.text
        assert await world.sql("SELECT id FROM webhooks WHERE deleted_at IS NULL") == []

    wid = str(hook["id"])
    assert await world.audited(ANN, "webhooks") == [
        ("post add_hook", wid, 201),
        ("post rotate_hook", wid, 200),
        ("post delete_hook", wid, 204),
    ]


GETS = ("/settings", "/settings/users", "/settings/alerts", "/settings/notifications")


def _posts(world: World, hook: str) -> list[tuple[str, Form]]:
    nora = world.ids[NORA]
    return [
        ("/settings/users", {"display_name": "X Y", "email": "x@y.example", "role": "clinician"}),
        (f"/settings/users/{nora}/role", {"role": "clinic_admin"}),
        (f"/settings/users/{nora}/deactivate", {}),
        ("/settings/alerts", {"refill_due_low_days": "30"}),
        ("/settings/notifications", {"email_high": "x@y.example", "digest_enabled": "on"}),
        ("/settings/webhooks", {"url": HOOK, "events": ["alert.opened"]}),
        (f"/settings/webhooks/{hook}/rotate", {"overlap_hours": "1"}),
        (f"/settings/webhooks/{hook}/delete", {}),
    ]


async def _unchanged(world: World, hook: str) -> None:
    users = await world.sql("SELECT role, deactivated_at FROM users WHERE id = $1", world.ids[NORA])
    assert users[0]["role"] == "clinician"
    assert users[0]["deactivated_at"] is None
    assert await world.sql("SELECT id FROM users WHERE email = 'x@y.example'") == []
    clinics = await world.sql(
        "SELECT alert_settings, notification_settings FROM clinics WHERE id = $1", world.a
    )
    assert clinics[0]["alert_settings"] == {}
    assert clinics[0]["notification_settings"] in ({}, None, "{}")
    hooks = await world.sql("SELECT id, secret FROM webhooks WHERE deleted_at IS NULL")
    assert [str(h["id"]) for h in hooks] == [hook]
    assert hooks[0]["secret"].startswith("whsec_dGVzd")


async def test_a_clinician_gets_not_found_for_every_settings_page_and_form(world: World) -> None:
    hook = await _hook_of(world, world.a)
    async with world.signed_in(NORA) as nora:
        assert "Clinic settings" not in (await nora.get("/")).text
        for path in (*GETS, "/settings/webhooks", f"/settings/users?clinic={world.a}"):
            page = await nora.get(path)
            assert page.status_code == 404, path
            assert "Not found" in page.text
        for path, data in _posts(world, hook):
            answer = await nora.post(path, data | {"clinic": world.a})
            assert answer.status_code == 404, path
    await _unchanged(world, hook)


async def test_another_clinics_admin_sees_and_changes_none_of_it(world: World) -> None:
    hook = await _hook_of(world, world.a)
    async with world.signed_in(BEA) as bea:
        own = await bea.get("/settings/users")
        assert own.status_code == 200
        assert "South" in own.text
        assert "Bea South" in own.text
        assert "Nora Nurse" not in own.text
        assert "Ann Admin" not in own.text
        assert HOOK not in (await bea.get("/settings/webhooks")).text
        for path in GETS[1:]:
            page = await bea.get(f"{path}?clinic={world.a}")
            assert page.status_code == 404, path
        for path, data in _posts(world, hook):
            with_clinic = await bea.post(path, data | {"clinic": world.a})
            assert with_clinic.status_code == 404, path
        role = await bea.post(f"/settings/users/{world.ids[NORA]}/role", {"role": "clinic_admin"})
        assert role.status_code == 404
        assert "No such person in this clinic." in role.text
        ended = await bea.post(f"/settings/users/{world.ids[NORA]}/deactivate")
        assert ended.status_code == 404
        rotated = await bea.post(f"/settings/webhooks/{hook}/rotate", {"overlap_hours": "1"})
        assert rotated.status_code == 404
        assert "No such webhook in this clinic" in rotated.text
        assert (await bea.post(f"/settings/webhooks/{hook}/delete")).status_code == 404
    await _unchanged(world, hook)


async def test_every_settings_form_needs_the_csrf_token(world: World) -> None:
    hook = await _hook_of(world, world.a)
    async with world.signed_in(ANN) as ann:
        for path, data in _posts(world, hook):
            refused = await ann.post(path, data, csrf=False)
            assert refused.status_code == 403, path
            assert "CSRF" in refused.text
            wrong = await ann.post(path, data | {"csrf_token": "forged"}, csrf=False)
            assert wrong.status_code == 403, path
    await _unchanged(world, hook)


async def test_an_administrator_picks_the_clinic(world: World) -> None:
    async with world.signed_in(ROOT) as root:
        pick = await root.get("/settings")
        assert pick.status_code == 200
        assert f'href="/settings/users?clinic={world.a}">North' in pick.text
        assert f'href="/settings/users?clinic={world.b}">South' in pick.text
        north = await root.get(f"/settings/users?clinic={world.a}")
        assert "Nora Nurse" in north.text
        assert "Bea South" not in north.text
        assert (await root.get("/settings/users?clinic=nonsense")).status_code == 404
        assert (await root.get(f"/settings/users?clinic={uuid.uuid4()}")).status_code == 404
        invited = await root.post(
            "/settings/users",
            {"display_name": "Sol South", "email": "sol@south.example", "clinic": world.b},
        )
        assert "Sol South is invited" in invited.text
        added = await root.post(
            "/settings/webhooks", {"url": HOOK, "events": ["alert.opened"], "clinic": world.b}
        )
        assert "Webhook added" in added.text
        assert "/settings/webhooks?clinic=" in added.text
    sol = await world.sql("SELECT clinic_id FROM users WHERE email = 'sol@south.example'")
    assert str(sol[0]["clinic_id"]) == world.b
    hooks = await world.sql("SELECT clinic_id FROM webhooks")
    assert [str(h["clinic_id"]) for h in hooks] == [world.b]


async def test_the_invitation_is_emailed_when_smtp_is_set(database_url: str) -> None:
    with smtp_sink() as smtp:
        async with running_api(database_url, smtp_url=smtp.url, smtp_starttls="off") as api:
            world = await _seed(api)
            async with world.signed_in(ANN) as ann:
                invited = await ann.post(
                    "/settings/users",
                    {"display_name": "Nina Nurse", "email": "nina@north.example"},
                )
    assert "It was also emailed to nina@north.example." in invited.text
    link = re.search(r'id="invitation-url">([^<]+)<', invited.text)
    assert link is not None
    mails = smtp.to("nina@north.example")
    assert len(mails) == 1
    assert link[1] in mails[0].message.get_content()
