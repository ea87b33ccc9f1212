"""People sign in as themselves (issue 17), against ``pumpwatch api`` as a process: accounts,
invitations (emailed, single use, expiring), sign-in, named actions in history and audit,
lockout and its release, deactivation, token expiry and idle timeout. Time moves with the
API's test clock (``PUMPWATCH_API_TEST_CLOCK``), never by sleeping.

Several sources are simulated through a trusted proxy: the API believes ``X-Forwarded-For``
from 127.0.0.1 here, so each test request can say where it comes from."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from services.api import keys
from services.storage.database import prepare_connection
from tests import alert_fixtures as fx
from tests.api_support import api_process
from tests.notify_support import SmtpSink, smtp_sink

NURSE_PASSWORD = "violet kettle harbour 41"
ADMIN_PASSWORD = "granite orchard lantern 7"
HOME, WARD, STRANGER = "198.51.100.10", "198.51.100.20", "203.0.113.66"


@dataclass
class World:
    base: str
    db: str
    smtp: SmtpSink
    admin_key: str
    clinic_a: str
    clinic_b: str
    alert_a: str
    patient_a: str

    def client(self, source: str = HOME) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.base, headers={"X-Forwarded-For": source}, timeout=30
        )

    async def sql(self, query: str, *args: Any) -> Any:
        conn = await asyncpg.connect(self.db)
        try:
            return await conn.fetch(query, *args)
        finally:
            await conn.close()

    async def advance(self, seconds: float) -> None:
        """Move the API's clock forward."""
        await self.sql(
            "INSERT INTO api_test_clock VALUES (true, $1) ON CONFLICT (singleton) "
            "DO UPDATE SET offset_s = api_test_clock.offset_s + EXCLUDED.offset_s",
            seconds,
        )

    async def user(self, role: str, email: str, name: str, clinic: str | None, **more: Any) -> Any:
        async with self.client() as c:
            made = await c.post(
                "/v1/users",
                headers=_bearer(self.admin_key),
                json={"email": email, "display_name": name, "role": role, "clinic_id": clinic}
                | more,
            )
        assert made.status_code == 201, made.text
        return made.json()


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _sign_in(c: httpx.AsyncClient, email: str, password: str) -> httpx.Response:
    return await c.post("/v1/auth/token", data={"username": email, "password": password})


async def _token(c: httpx.AsyncClient, email: str, password: str) -> str:
    answer = await _sign_in(c, email, password)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["token_type"] == "bearer"
    assert body["expires_in"] > 0
    token: str = body["access_token"]
    return token


async def _seed(url: str) -> tuple[str, str, str, str, str]:
    conn = await asyncpg.connect(url)
    await prepare_connection(conn)
    try:
        a = await fx.clinic(conn, name="North")
        b = await fx.clinic(conn, name="South")
        patient = await fx.patient(conn, a, mrn="MRN-P1")
        await fx.pump(conn, "NGPPEOPLE1", patient_id=patient)
        alert = await conn.fetchval(
            """INSERT INTO alerts (serial, rule, priority, status, title, detail, opened_at,
                   updated_at, condition_at)
               VALUES ('NGPPEOPLE1', 'dose_escalation', 'low', 'open', 'Dose up 55 %',
                   'Review the titration.', now(), now(), now()) RETURNING id"""
        )
        _, admin = await keys.create(
            conn, role="admin", clinic_id=None, label="bootstrap", created_by="test"
        )
    finally:
        await conn.close()
    return a, b, str(alert), patient, admin


@pytest.fixture
def world(database_url: str, tmp_path: Path) -> Iterator[World]:
    a, b, alert, patient, admin = asyncio.run(_seed(database_url))
    with smtp_sink() as sink:
        env = {
            "PUMPWATCH_API_TEST_CLOCK": "true",
            "PUMPWATCH_API_TRUSTED_PROXIES": "127.0.0.1",
            "PUMPWATCH_SMTP_URL": sink.url,
            "PUMPWATCH_SMTP_STARTTLS": "off",
            "PUMPWATCH_API_KEY_TOUCH_INTERVAL_S": "0",
            "PUMPWATCH_API_TOKEN_LIFETIME_S": "3600",
            "PUMPWATCH_API_IDLE_TIMEOUT_S": "900",
        }
        with api_process(database_url, tmp_path, env) as api:
            yield World(api.base, database_url, sink, admin, a, b, alert, patient)
        assert not api.unhandled_errors()
        log = api.log.read_text()
        for secret in (NURSE_PASSWORD, ADMIN_PASSWORD, "argon2id"):
            assert secret not in log  # no password or hash in any log


@pytest.fixture
async def nurse(world: World) -> dict[str, Any]:
    made: dict[str, Any] = await world.user(
        "clinician", "Nora.Nurse@north.example", "Nora Nurse", world.clinic_a
    )
    made["password"] = NURSE_PASSWORD
    async with world.client() as c:
        invited = await c.post(
            f"/v1/users/{made['id']}/invitation", headers=_bearer(world.admin_key)
        )
        token = invited.json()["invitation_url"].rsplit("/", 1)[1]
        done = await c.post(
            "/v1/auth/set-password", json={"token": token, "password": NURSE_PASSWORD}
        )
        assert done.status_code == 204, done.text
    return made


async def test_invited_nurse_signs_in_acts_and_history_and_audit_name_her(world: World) -> None:
    async with world.client(WARD) as c:
        # The clinic's administrator, with an initial password.
        await world.user(
            "clinic_admin",
            "ada@north.example",
            "Ada Admin",
            world.clinic_a,
            password=ADMIN_PASSWORD,
        )
        ada = await _token(c, "ada@north.example", ADMIN_PASSWORD)
        # She invites a nurse: the answer carries the link once, and it is emailed.
        made = await c.post(
            "/v1/users",
            headers=_bearer(ada),
            json={"email": "nora@north.example", "display_name": "Nora Nurse", "role": "clinician"},
        )
        assert made.status_code == 201, made.text
        body = made.json()
        assert body["clinic_id"] == world.clinic_a
        assert "password" not in body  # no password or hash field
        url = body["invitation_url"]
        assert url.startswith(world.base + "/set-password/")
        mails = world.smtp.to("nora@north.example")
        assert len(mails) == 1
        assert url in mails[0].message.get_content()
        token = url.rsplit("/", 1)[1]

        page = await c.get(url)
        assert page.status_code == 200
        assert "Choose your password" in page.text
        weak = await c.post(
            "/v1/auth/set-password", json={"token": token, "password": "Password2024!"}
        )
        assert weak.status_code == 422
        assert "Password2024" not in weak.text
        short = await c.post("/v1/auth/set-password", json={"token": token, "password": "short"})
        assert short.status_code == 422
        done = await c.post(
            "/v1/auth/set-password", json={"token": token, "password": NURSE_PASSWORD}
        )
        assert done.status_code == 204, done.text
        again = await c.post(
            "/v1/auth/set-password", json={"token": token, "password": NURSE_PASSWORD + "x"}
        )
        assert again.status_code == 400  # single use

        nora = await _token(c, "NORA@north.example", NURSE_PASSWORD)  # email: any case
        acked = await c.post(
            f"/v1/alerts/{world.alert_a}/acknowledge",
            headers=_bearer(nora),
            json={"note": "called the patient"},
        )
        assert acked.status_code == 200, acked.text
        alert = acked.json()
        assert alert["acknowledged_by"]["display_name"] == "Nora Nurse"
        entry = alert["history"][-1]
        assert entry["action"] == "acknowledged"
        assert entry["actor"] == {
            "type": "user",
            "id": body["id"],
            "display_name": "Nora Nurse",
            "label": None,
        }
        # A key's actions name the key.
        await world.sql("UPDATE alerts SET status = 'open' WHERE id = $1", uuid.UUID(world.alert_a))
        by_key = await c.post(
            f"/v1/alerts/{world.alert_a}/acknowledge", headers=_bearer(world.admin_key)
        )
        assert by_key.json()["history"][-1]["actor"]["type"] == "key"
        assert by_key.json()["history"][-1]["actor"]["label"] == "bootstrap"

        rows = await world.sql(
            "SELECT action, resource_type, resource_id, user_id, outcome, source FROM audit_log "
            "WHERE user_id = $1 ORDER BY id",
            uuid.UUID(body["id"]),
        )
        seen = [(r["action"], r["resource_type"], r["resource_id"], r["outcome"]) for r in rows]
        assert ("post sign-in", "users", body["id"], "ok") in seen
        assert ("post acknowledge", "alerts", world.alert_a, "ok") in seen
        assert {r["source"] for r in rows} == {WARD}
        created = await world.sql(
            "SELECT a.user_id, u.email FROM audit_log a JOIN users u ON u.id = a.user_id "
            "WHERE a.action = 'post create_user' AND a.resource_id = $1",
            body["id"],
        )
        assert [r["email"] for r in created] == ["ada@north.example"]

        out = await c.post("/v1/auth/logout", headers=_bearer(nora))
        assert out.status_code == 204
        after = await c.get(f"/v1/alerts/{world.alert_a}", headers=_bearer(nora))
        assert after.status_code == 401


async def test_clinic_admin_manages_only_their_clinic_and_invitations_expire(
    world: World,
) -> None:
    async with world.client() as c:
        await world.user(
            "clinic_admin",
            "ada@north.example",
            "Ada Admin",
            world.clinic_a,
            password=ADMIN_PASSWORD,
        )
        ada = await _token(c, "ada@north.example", ADMIN_PASSWORD)
        other = await world.user("clinician", "sam@south.example", "Sam South", world.clinic_b)

        def person(role: str, clinic: str | None) -> dict[str, Any]:
            return {
                "email": f"{uuid.uuid4().hex[:8]}@x.example",
                "display_name": "Pat Person",
                "role": role,
                "clinic_id": clinic,
            }

        assert (
            await c.post(
                "/v1/users", headers=_bearer(ada), json=person("clinician", world.clinic_b)
            )
        ).status_code == 404
        assert (
            await c.post("/v1/users", headers=_bearer(ada), json=person("admin", None))
        ).status_code == 403
        assert (
            await c.post("/v1/users", headers=_bearer(ada), json=person("fleet", None))
        ).status_code == 403
        assert (await c.get(f"/v1/users/{other['id']}", headers=_bearer(ada))).status_code == 404
        assert (
            await c.patch(
                f"/v1/users/{other['id']}", headers=_bearer(ada), json={"display_name": "x"}
            )
        ).status_code == 404
        listed = await c.get("/v1/users", headers=_bearer(ada))
        assert {u["email"] for u in listed.json()["items"]} == {"ada@north.example"}
        mine = await c.post("/v1/users", headers=_bearer(ada), json=person("clinician", None))
        assert mine.status_code == 201
        assert mine.json()["clinic_id"] == world.clinic_a
        promote = await c.patch(
            f"/v1/users/{mine.json()['id']}", headers=_bearer(ada), json={"role": "admin"}
        )
        assert promote.status_code == 403
        # A clinician manages nobody.
        await world.user(
            "clinician", "cy@north.example", "Cy Clinician", world.clinic_a, password=NURSE_PASSWORD
        )
        cy = await _token(c, "cy@north.example", NURSE_PASSWORD)
        assert (await c.get("/v1/users", headers=_bearer(cy))).status_code == 403

        # The invitation works for 72 h only.
        token = mine.json()["invitation_url"].rsplit("/", 1)[1]
        await world.advance(72 * 3600 + 1)
        late = await c.post(
            "/v1/auth/set-password", json={"token": token, "password": NURSE_PASSWORD}
        )
        assert late.status_code == 400


async def test_wrong_passwords_slow_then_lock_that_address_not_the_person_elsewhere(
    world: World, nurse: dict[str, Any]
) -> None:
    email = nurse["email"]
    async with world.client(STRANGER) as stranger, world.client(WARD) as ward:
        for _ in range(3):
            assert (await _sign_in(stranger, email, "not her password 1")).status_code == 401
        slowed = await _sign_in(stranger, email, NURSE_PASSWORD)
        assert slowed.status_code == 429  # not even the right one is tried from there now
        assert int(slowed.headers["Retry-After"]) <= 5
        for wait in (5, 10, 20):
            await world.advance(wait)
            assert (await _sign_in(stranger, email, "not her password 2")).status_code == 401
        locked = await _sign_in(stranger, email, NURSE_PASSWORD)
        assert locked.status_code == 429
        assert "locked" in locked.json()["detail"]
        # The nurse, elsewhere, is not locked out by the stranger.
        await _token(ward, email, NURSE_PASSWORD)
        # The lock ends.
        await world.advance(900)
        await _token(stranger, email, NURSE_PASSWORD)
        rows = await world.sql(
            "SELECT status, outcome FROM audit_log WHERE action = 'post sign-in' "
            "AND source = $1 ORDER BY id",
            STRANGER,
        )
        assert [r["status"] for r in rows].count(401) == 6
        assert [r["status"] for r in rows].count(429) == 2
        assert rows[-1]["outcome"] == "ok"


async def test_many_places_lock_the_account_for_new_places_only(
    world: World, nurse: dict[str, Any]
) -> None:
    email = nurse["email"]
    async with world.client(HOME) as home:
        await _token(home, email, NURSE_PASSWORD)  # her usual place
    for i in range(30):  # a distributed guesser: one wrong password from each of 30 addresses
        async with world.client(f"192.0.2.{i + 1}") as bot:
            assert (await _sign_in(bot, email, f"guess number {i}")).status_code == 401
    async with world.client("192.0.2.200") as new_place, world.client(HOME) as home:
        refused = await _sign_in(new_place, email, NURSE_PASSWORD)
        assert refused.status_code == 429
        await _token(home, email, NURSE_PASSWORD)
        # Unknown emails are answered like wrong passwords.
        unknown = await _sign_in(home, "nobody@north.example", NURSE_PASSWORD)
        assert unknown.status_code == 401
        assert unknown.json()["detail"] == "unknown email or wrong password"


async def _web_sign_in(c: httpx.AsyncClient, email: str, password: str) -> httpx.Response:
    form = await c.get("/login")
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
    assert csrf is not None
    return await c.post(
        "/login", data={"email": email, "password": password, "csrf_token": csrf[1]}
    )


async def test_deactivation_ends_tokens_and_web_sessions_at_once(
    world: World, nurse: dict[str, Any]
) -> None:
    async with world.client() as c, world.client() as browser:
        token = await _token(c, nurse["email"], NURSE_PASSWORD)
        signed = await _web_sign_in(browser, nurse["email"], NURSE_PASSWORD)
        assert signed.status_code == 303
        page = await browser.get(f"/patients/{world.patient_a}")
        assert page.status_code == 200
        assert "Nora Nurse" in page.text  # the page names who is signed in
        # The web action audits the alert it changed, in its transaction, naming her.
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
        assert csrf is not None
        acted = await browser.post(
            f"/patients/{world.patient_a}/alerts/{world.alert_a}/acknowledge",
            data={"csrf_token": csrf[1], "note": ""},
        )
        assert acted.status_code == 303
        audited = await world.sql(
            "SELECT resource_type, resource_id FROM audit_log WHERE user_id = $1 "
            "AND action = 'post alert_action'",
            uuid.UUID(nurse["id"]),
        )
        assert [(r["resource_type"], r["resource_id"]) for r in audited] == [
            ("alerts", world.alert_a)
        ]
        page = await browser.get(f"/patients/{world.patient_a}")
        assert "acknowledged by Nora Nurse" in page.text

        gone = await c.delete(f"/v1/users/{nurse['id']}", headers=_bearer(world.admin_key))
        assert gone.status_code == 204
        assert (await c.get("/v1/alerts", headers=_bearer(token))).status_code == 401
        assert (await browser.get(f"/patients/{world.patient_a}")).status_code == 303
        assert (await _sign_in(c, nurse["email"], NURSE_PASSWORD)).status_code == 401
        shown = await c.get(f"/v1/users/{nurse['id']}", headers=_bearer(world.admin_key))
        assert shown.json()["active"] is False


async def test_tokens_idle_out_and_expire(world: World, nurse: dict[str, Any]) -> None:
    async with world.client() as c:
        token = await _token(c, nurse["email"], NURSE_PASSWORD)
        await world.advance(901)  # idle timeout 900 s
        assert (await c.get("/v1/alerts", headers=_bearer(token))).status_code == 401

        token = await _token(c, nurse["email"], NURSE_PASSWORD)
        for _ in range(4):  # used every 800 s: never idle, until the 3600 s lifetime ends
            await world.advance(800)
            assert (await c.get("/v1/alerts", headers=_bearer(token))).status_code == 200
        await world.advance(800)
        ended = await c.get("/v1/alerts", headers=_bearer(token))
        assert ended.status_code == 401

        # Dashboard sessions idle out the same way; the page's own refresh is not use.
        await _web_sign_in(c, nurse["email"], NURSE_PASSWORD)
        assert (await c.get("/")).status_code == 200
        for _ in range(2):
            await world.advance(400)
            assert (await c.get("/worklist/fragment")).status_code == 200
        await world.advance(200)  # 1000 s since she last used the page herself
        assert (await c.get("/")).status_code == 303


async def test_a_change_and_its_audit_row_commit_together(
    world: World, nurse: dict[str, Any]
) -> None:
    """Issue 16, item 5: with the audit log locked, the API's connection is ended while the
    acknowledgement waits to write its audit row. Before, the change had committed already
    (the row came after, on another connection): an acknowledged alert with no audit row."""
    async with world.client() as c:
        token = await _token(c, nurse["email"], NURSE_PASSWORD)
        locker = await asyncpg.connect(world.db)
        try:
            tx = locker.transaction()
            await tx.start()
            await locker.execute("LOCK TABLE audit_log IN SHARE ROW EXCLUSIVE MODE")
            pending = asyncio.create_task(
                c.post(f"/v1/alerts/{world.alert_a}/acknowledge", headers=_bearer(token))
            )
            waiting = None
            for _ in range(100):
                waiting = await locker.fetchval(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = 'pumpwatch-api' "
                    "AND wait_event_type = 'Lock'"
                )
                if waiting is not None:
                    break
                await asyncio.sleep(0.05)
            seen = await locker.fetch(
                "SELECT application_name, state, wait_event_type, left(query, 80) AS q "
                "FROM pg_stat_activity WHERE datname = current_database()"
            )
            assert waiting is not None, f"the API never waited for the audit log: {seen}"
            await locker.execute("SELECT pg_terminate_backend($1)", waiting)
            await tx.rollback()
            answer = await pending
        finally:
            await locker.close()
        assert answer.status_code == 503
        status = await world.sql(
            "SELECT status FROM alerts WHERE id = $1", uuid.UUID(world.alert_a)
        )
        assert status[0]["status"] == "open"  # nothing changed without its audit row
        # Done again, the change and its row are both there.
        again = await c.post(f"/v1/alerts/{world.alert_a}/acknowledge", headers=_bearer(token))
        assert again.status_code == 200
        rows = await world.sql(
            "SELECT outcome FROM audit_log WHERE resource_id = $1 AND action = 'post acknowledge'",
            world.alert_a,
        )
        assert "ok" in [r["outcome"] for r in rows]
