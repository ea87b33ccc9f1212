"""Tenancy, generated from the app's own route table: every route and method x every kind of
caller x {its own clinic's ids, the other clinic's ids}. A new route is covered without editing
this file; a new kind of path parameter fails loudly until it is taught here.

Leaks looked for: a 2xx answer about another clinic's resource; any answer to a clinic key that
carries the other clinic's identifiers or patient data; any answer to the fleet role that
carries a name, MRN or birth date; any route other than the public ones answering without a
valid key; any 5xx at all.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest

from services.api import passwords
from services.api.app import create_app
from services.api.fhir.resources import MEASURES, observation_id
from services.api.keys import hash_key
from services.api.settings import ApiSettings
from tests import alert_fixtures as fx
from tests.api_support import Api, running_api

PUBLIC = frozenset(
    {
        "/healthz",
        "/readyz",
        "/metrics",
        "/v1/schemas/mqtt-v1.json",
        # Signing in and choosing a password with a link need no key (they are the way in).
        "/v1/auth/token",
        "/v1/auth/password-reset",
        "/v1/auth/set-password",
        "/fhir/metadata",
    }
)
PASSWORD = "tenancy matrix walnut 42"
# Callers that belong to clinic A (keys and people) / to clinic B.
CLINIC_A = ("clinician", "integrator", "nurse", "clinic_admin")
CLINIC_B = ("other_clinician", "other_clinic_admin")

# Path or query parameter name -> the kind of id it takes.
ID_KINDS = {
    "serial": "serial",
    "device": "serial",
    "patient_id": "patient",
    "patient": "patient",
    "alert_id": "alert",
    "clinic_id": "clinic",
    "webhook_id": "webhook",
    "key_id": "key",
    "user_id": "user",
    "observation_id": "observation",
}


def _openapi() -> dict[str, Any]:
    """The app's OpenAPI document: its route table, as integrators see it."""
    return create_app(ApiSettings(database_url="postgresql://unused/unused")).openapi()


OPENAPI = _openapi()


def _routes() -> list[tuple[str, str]]:
    return [
        (method.upper(), path)
        for path, operations in OPENAPI["paths"].items()
        for method in operations
    ]


ROUTES = _routes()


@dataclass
class Tenant:
    clinic: str
    patient: str
    serial: str
    alert: str
    webhook: str
    key: str
    user: str
    user_email: str
    observation: str
    name: str
    mrn: str
    birth_date: date

    def ids(self) -> dict[str, str]:
        return {
            "serial": self.serial,
            "patient": self.patient,
            "alert": self.alert,
            "clinic": self.clinic,
            "webhook": self.webhook,
            "key": self.key,
            "user": self.user,
            "observation": self.observation,
        }

    def secrets(self) -> list[str]:
        """What another clinic's key must never see."""
        return [
            self.patient,
            self.serial,
            self.alert,
            self.webhook,
            self.name,
            self.mrn,
            self.user,
            self.user_email,
        ]


async def _tenant(api: Api, tag: str, birth: date) -> tuple[Tenant, str, str]:
    conn = await api.conn()
    try:
        clinic = await fx.clinic(conn, name=f"Clinic {tag}")
        name, mrn = f"Zelda {tag}quist", f"MRN-{tag}-7731"
        patient = str(
            await conn.fetchval(
                "INSERT INTO patients (clinic_id, mrn, display_name, birth_date) "
                "VALUES ($1, $2, $3, $4) RETURNING id",
                uuid.UUID(clinic),
                mrn,
                name,
                birth,
            )
        )
        serial = f"NGP{tag}{tag}{tag}01"
        await fx.pump(conn, serial, patient_id=patient)
        now = datetime.now(UTC)
        await fx.refill_event(conn, serial, now - timedelta(days=3), residual_ml=2.0, added_ml=20.0)
        for hours in (30, 20, 10, 1):
            await fx.reading(
                conn, serial, now - timedelta(hours=hours), volume_ml=19.0 - hours / 50
            )
        alert = str(
            await conn.fetchval(
                """INSERT INTO alerts (serial, rule, priority, status, title, detail, opened_at,
                       updated_at, condition_at)
                   VALUES ($1, 'pump_silent', 'high', 'open', 'No reading for 9 h', 'detail',
                       now(), now(), now()) RETURNING id""",
                serial,
            )
        )
        newest = await conn.fetchrow(
            "SELECT msg_id, recorded_at FROM readings WHERE serial = $1 "
            "ORDER BY recorded_at DESC LIMIT 1",
            serial,
        )
        assert newest is not None
        observation = observation_id(serial, newest["recorded_at"], newest["msg_id"], MEASURES[0])
        webhook = str(
            await conn.fetchval(
                "INSERT INTO webhooks (clinic_id, url, events, secret) "
                "VALUES ($1, 'https://hooks.example.org/x', '{alert.opened}', 'whsec_c2VjcmV0') "
                "RETURNING id",
                uuid.UUID(clinic),
            )
        )
        email = f"pat.{tag.lower()}@clinic-{tag.lower()}.example"
        user = str(await _person(conn, email, f"Pat {tag}person", "clinician", clinic))
    finally:
        await conn.close()
    clinician = await api.key("clinician", clinic)
    integrator = await api.key("integrator", clinic)
    key_id = str(uuid.uuid4())  # key ids are only ever admin business
    return (
        Tenant(
            clinic,
            patient,
            serial,
            alert,
            webhook,
            key_id,
            user,
            email,
            observation,
            name,
            mrn,
            birth,
        ),
        clinician,
        integrator,
    )


async def _person(conn: Any, email: str, name: str, role: str, clinic: str | None) -> Any:
    return await conn.fetchval(
        "INSERT INTO users (email, display_name, role, clinic_id, password_hash, created_by) "
        "VALUES ($1, $2, $3, $4, $5, 'test') RETURNING id",
        email,
        name,
        role,
        None if clinic is None else uuid.UUID(clinic),
        HASHED,
    )


HASHED = passwords.hash_password(PASSWORD)


async def _signed_in(api: Api, role: str, clinic: str, tag: str) -> str:
    """A person's bearer token (a person of ``role`` in ``clinic``)."""
    email = f"{role}.{tag}@people.example"
    conn = await api.conn()
    try:
        await _person(conn, email, f"{role} {tag}", role, clinic)
    finally:
        await conn.close()
    answer = await api.client.post("/v1/auth/token", data={"username": email, "password": PASSWORD})
    assert answer.status_code == 200, answer.text
    token: str = answer.json()["access_token"]
    return token


@dataclass
class Setup:
    api: Api
    a: Tenant
    b: Tenant
    callers: dict[str, str | None]


@pytest.fixture
async def setup(database_url: str) -> AsyncIterator[Setup]:
    async with running_api(database_url, api_auth_failures_per_minute=10_000) as api:
        a, a_clinician, a_integrator = await _tenant(api, "A", date(1961, 7, 13))
        b, _, _ = await _tenant(api, "B", date(1958, 2, 27))
        revoked = await api.key("clinician", a.clinic)
        conn = await api.conn()
        try:
            await conn.execute(
                "UPDATE api_keys SET revoked_at = now() WHERE key_hash = $1", hash_key(revoked)
            )
        finally:
            await conn.close()
        callers: dict[str, str | None] = {
            "clinician": a_clinician,
            "integrator": a_integrator,
            "other_clinician": await api.key("clinician", b.clinic),
            "nurse": await _signed_in(api, "clinician", a.clinic, "a"),
            "clinic_admin": await _signed_in(api, "clinic_admin", a.clinic, "a"),
            "other_clinic_admin": await _signed_in(api, "clinic_admin", b.clinic, "b"),
            "fleet": await api.key("fleet"),
            "no_key": None,
            "revoked": revoked,
        }
        yield Setup(api, a, b, callers)


def _path(template: str, ids: dict[str, str]) -> str:
    def fill(match: re.Match[str]) -> str:
        name = match.group(1)
        kind = ID_KINDS.get(name)
        if kind is None:
            raise AssertionError(f"teach the tenancy test the path parameter {{{name}}}")
        return ids[kind]

    return re.sub(r"\{(\w+)(?::\w+)?\}", fill, template)


def _query(method: str, template: str, ids: dict[str, str]) -> dict[str, str]:
    operation = OPENAPI["paths"][template][method.lower()]
    return {
        p["name"]: ids[ID_KINDS[p["name"]]]
        for p in operation.get("parameters", ())
        if p["in"] == "query" and p["name"] in ID_KINDS
    }


def _body(method: str, template: str, ids: dict[str, str]) -> dict[str, Any] | None:
    if method not in ("POST", "PUT", "PATCH"):
        return None
    bodies: dict[str, dict[str, Any]] = {
        "/v1/pumps/{serial}/refills": {
            "refill": {
                "residual_ml": 1.0,
                "added_ml": 20.0,
                "drug": "baclofen",
                "concentration_mcg_per_ml": 2000,
            }
        },
        "/v1/pumps/{serial}": {"patient_id": ids["patient"]},
        "/v1/pumps/{serial}/refill-appointment": {"scheduled_for": "2027-01-05T09:00:00Z"},
        "/v1/patients": {"mrn": f"NEW-{uuid.uuid4().hex[:6]}", "display_name": "New Patient"},
        "/v1/webhooks": {"url": "https://hooks.example.org/y", "events": ["alert.opened"]},
        "/v1/clinics": {"name": "Another"},
        "/v1/clinics/{clinic_id}/keys": {"role": "clinician"},
        "/v1/clinics/{clinic_id}/alert-settings": {"refill_due_low_days": 20},
        "/v1/users": {
            "email": f"{uuid.uuid4().hex[:8]}@new.example",
            "display_name": "New Person",
            "role": "clinician",
            "clinic_id": ids["clinic"],
        },
        "/v1/users/{user_id}": {"display_name": "Renamed Person"},
        "/v1/auth/password": {"current_password": "not it", "new_password": PASSWORD + "!"},
        "/v1/alerts/{alert_id}/snooze": {
            "until": (datetime.now(UTC) + timedelta(hours=1)).isoformat(),
            "note": "called the patient",
        },
    }
    return bodies.get(template, {})


async def _call(
    s: Setup, method: str, template: str, caller: str, ids: dict[str, str]
) -> tuple[int, str]:
    path = _path(template, ids)
    kwargs: dict[str, Any] = {"params": _query(method, template, ids)}
    body = _body(method, template, ids)
    if body is not None:
        kwargs["json"] = body
    answer = await s.api.call(method, path, s.callers[caller], **kwargs)
    return answer.status_code, answer.text


@pytest.mark.parametrize(("method", "template"), ROUTES, ids=[f"{m} {p}" for m, p in ROUTES])
async def test_no_route_leaks_across_clinics_or_to_the_fleet(
    setup: Setup, method: str, template: str
) -> None:
    s = setup
    leaks: list[str] = []
    # The other clinic's ids first: the own-id calls may change or delete things.
    for which, ids in (("other", s.b.ids()), ("own", s.a.ids())):
        for caller in s.callers:
            status, text = await _call(s, method, template, caller, ids)
            where = f"{caller} {method} {_path(template, ids)} ({which} ids) -> {status}"
            if status >= 500:
                leaks.append(f"{where}: server error {text[:200]}")
            if caller in ("no_key", "revoked") and template not in PUBLIC and status != 401:
                leaks.append(f"{where}: answered without a valid key")
            if caller in CLINIC_A:
                # A route about one resource (an id in its path) must not know B's; lists
                # and creations filtered by B's ids must just show none of B's data (below).
                # ...and a person is not made for another clinic.
                about_b = "{" in template or (method, template) == ("POST", "/v1/users")
                if which == "other" and 200 <= status < 300 and about_b:
                    leaks.append(f"{where}: another clinic's resource answered")
                found = [secret for secret in s.b.secrets() if secret in text]
                if found:
                    leaks.append(f"{where}: shows clinic B's {found}")
            if caller in CLINIC_B and which == "own":
                found = [secret for secret in s.a.secrets() if secret in text]
                if found and 200 <= status < 300:
                    leaks.append(f"{where}: shows clinic A's {found}")
            if caller == "fleet":
                private = [
                    value
                    for t in (s.a, s.b)
                    for value in (t.name, t.mrn, t.birth_date.isoformat())
                    if value in text
                ]
                if private:
                    leaks.append(f"{where}: shows patient data {private} to the fleet role")
    assert not leaks, "\n".join(leaks)


def test_the_route_table_is_what_the_contract_lists() -> None:
    contract = {
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/metrics"),
        ("POST", "/v1/clinics"),
        ("GET", "/v1/clinics/{clinic_id}"),
        ("POST", "/v1/clinics/{clinic_id}/keys"),
        ("POST", "/v1/patients"),
        ("GET", "/v1/patients"),
        ("GET", "/v1/patients/{patient_id}"),
        ("PUT", "/v1/pumps/{serial}"),
        ("GET", "/v1/pumps/{serial}"),
        ("GET", "/v1/pumps/{serial}/telemetry"),
        ("PUT", "/v1/pumps/{serial}/refill-appointment"),
        ("POST", "/v1/pumps/{serial}/refills"),
        ("GET", "/v1/pumps/{serial}/refills"),
        ("GET", "/v1/patients/{patient_id}/dashboard"),
        ("GET", "/v1/refills/due"),
        ("GET", "/v1/alerts"),
        ("GET", "/v1/alerts/{alert_id}"),
        ("POST", "/v1/alerts/{alert_id}/acknowledge"),
        ("POST", "/v1/alerts/{alert_id}/resolve"),
        ("POST", "/v1/webhooks"),
        ("GET", "/v1/webhooks"),
        ("DELETE", "/v1/webhooks/{webhook_id}"),
        ("GET", "/v1/quarantine"),
        # Version 1.1, "Integrators"
        ("GET", "/v1/clinics"),
        ("GET", "/v1/pumps"),
        ("GET", "/v1/pumps/{serial}/telemetry.csv"),
        ("GET", "/fhir/metadata"),
        ("GET", "/fhir/Patient/{patient_id}"),
        ("GET", "/fhir/Observation/{observation_id}"),
    }
    assert contract <= set(ROUTES), contract - set(ROUTES)
    assert len(ROUTES) >= len(contract)  # the parametrised test above ran for every one
