"""The demo's clinics: who works there, their patients and pumps, booked visits, claim codes.

Everything goes through the HTTP API as people would do it: an administrator's key creates the
two clinics and their people (a clinic administrator and a nurse each, with passwords) and
provisions the clinics' pumps; each clinic's nurse, signed in with her password, registers the
patients, assigns the pumps to them and, once the fleet's history is uploaded, books the first
refill visits from the worklist. The pumps' past (readings, refills, prescription changes, the
titration) comes from the simulator through MQTT and ingest like any device's. A few pumps stay
unclaimed: their programmers show claim codes (``claim`` events) that a nurse enters to take
custody.
"""

from __future__ import annotations

import asyncio
import random
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import httpx
from rich.console import Console

from lab.demo_state import DemoState, Person
from lab.sim.fleet import Fault, Fleet
from services.api import passwords
from services.logs import get
from services.storage.database import connect_with_retry

log = get(__name__)


@dataclass(frozen=True)
class DemoClinic:
    name: str
    domain: str
    timezone: str
    admin: str
    nurse: str
    mrn_prefix: str


CLINICS = (
    DemoClinic(
        "North spinal unit", "north.example", "Europe/Berlin", "Amira Haddad", "Nora Lindqvist", "N"
    ),
    DemoClinic(
        "South pain clinic", "south.example", "Europe/Lisbon", "Grace Okafor", "Mateo Rossi", "S"
    ),
)
BOOKINGS_PER_CLINIC = 3
"""Refill visits each nurse books from the worklist once the history is uploaded."""
MAX_UNCLAIMED = 4


def email_of(name: str, clinic: DemoClinic) -> str:
    return f"{name.lower().replace(' ', '.')}@{clinic.domain}"


@dataclass(frozen=True)
class FleetPlan:
    """Which simulated pump is whose: derived from the seed and size alone, so that a restart
    finds the same plan."""

    assigned: dict[str, list[str]]
    """Clinic name → its pumps' serials (each implanted in a patient of the clinic)."""
    unclaimed: list[str]
    titrating: list[str]
    """One patient per clinic whose dose is raised every few weeks (tolerance)."""
    discrepancy: str | None
    """The pump whose refill finds less drug than expected (it over-infuses)."""
    models: dict[str, str]

    @property
    def faults(self) -> dict[str, list[Fault]]:
        return {} if self.discrepancy is None else {self.discrepancy: [Fault.OVER_INFUSION]}


def plan_fleet(state: DemoState, fault_rates: Mapping[Fault, float]) -> FleetPlan:
    fleet = Fleet(pumps=state.pumps, seed=state.seed, start=state.started, fault_rates=fault_rates)
    pumps = fleet.pumps
    unclaimed_count = min(MAX_UNCLAIMED, max(1, len(pumps) // 10)) if len(pumps) > 1 else 0
    held = pumps[: len(pumps) - unclaimed_count]
    assigned: dict[str, list[str]] = {c.name: [] for c in CLINICS}
    for i, pump in enumerate(held):
        assigned[CLINICS[i % len(CLINICS)].name].append(pump.serial)
    # Healthy pumps of each clinic (the fault rates drew the others' faults): the first one of
    # the first clinic over-infuses (its refill finds the discrepancy), the next one of each
    # clinic titrates.
    healthy = [
        [p.serial for p in held[i :: len(CLINICS)] if not p.faults] for i in range(len(CLINICS))
    ]
    discrepancy = healthy[0].pop(0) if healthy[0] else None
    titrating = [serials[0] for serials in healthy if serials]
    return FleetPlan(
        assigned=assigned,
        unclaimed=[p.serial for p in pumps[len(held) :]],
        titrating=titrating,
        discrepancy=discrepancy,
        models={p.serial: p.model for p in pumps},
    )


_FIRST = (
    "Aino", "Bruno", "Chiara", "Dmitri", "Elif", "Farah", "Gustav", "Hana", "Ingrid", "Jonas",
    "Keiko", "Lars", "Marta", "Nikolai", "Olga", "Pedro", "Quentin", "Rosa", "Stefan", "Tereza",
    "Ulrich", "Vera", "Wiktor", "Ximena", "Yusuf", "Zofia",
)  # fmt: skip
_LAST = (
    "Andersen", "Baptiste", "Costa", "Duarte", "Eriksen", "Ferreira", "Galli", "Horvat", "Ivanova",
    "Jansen", "Kowalski", "Laine", "Moreau", "Novak", "Oliveira", "Petersen", "Quaresma", "Ricci",
    "Sousa", "Takahashi", "Urban", "Vidal", "Weber", "Yilmaz", "Zeller",
)  # fmt: skip


@dataclass(frozen=True)
class DemoPatient:
    mrn: str
    display_name: str
    birth_date: date
    withdrawal_risk: str
    implanted_on: date


def patients_of(
    plan: FleetPlan, clinic: DemoClinic, seed: int, start: datetime
) -> dict[str, DemoPatient]:
    """Serial → the (fictional) patient it is implanted in."""
    rng = random.Random(f"pumpwatch-demo:{seed}:{clinic.name}:patients")
    names = [f"{f} {last}" for f in _FIRST for last in _LAST]
    rng.shuffle(names)
    out: dict[str, DemoPatient] = {}
    for i, serial in enumerate(plan.assigned[clinic.name]):
        born = date(rng.randint(1948, 1998), rng.randint(1, 12), rng.randint(1, 28))
        implanted = start.date() - timedelta(days=rng.randint(120, 6 * 365))
        out[serial] = DemoPatient(
            mrn=f"{clinic.mrn_prefix}-{10_001 + i}",
            display_name=names[i],
            birth_date=born,
            withdrawal_risk="high" if rng.random() < 0.15 else "standard",
            implanted_on=implanted,
        )
    return out


class DemoApi:
    """The API as the demo's people use it (the admin key; a nurse signed in by password)."""

    def __init__(self, base_url: str, admin_key: str) -> None:
        self.client = httpx.AsyncClient(base_url=base_url, timeout=60)
        self.admin = {"Authorization": f"Bearer {admin_key}"}

    async def __aenter__(self) -> DemoApi:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.aclose()

    async def call(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        *,
        ok: tuple[int, ...] = (),
        **kw: Any,
    ) -> httpx.Response:
        response = await self.client.request(method, path, headers=dict(headers), **kw)
        if response.status_code >= 400 and response.status_code not in ok:
            raise RuntimeError(
                f"demo setup: {method} {path} answered {response.status_code}: {response.text}"
            )
        return response

    async def sign_in(self, person: Person) -> dict[str, str]:
        answer = await self.call(
            "POST",
            "/v1/auth/token",
            {},
            data={"username": person.email, "password": person.password},
        )
        return {"Authorization": f"Bearer {answer.json()['access_token']}"}

    async def ready(self, serving: asyncio.Task[None], timeout_s: float = 60.0) -> None:
        """Until the API answers /readyz (``serving``: the demo's own server, which must still
        be running: another process on its port would answer too)."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            if serving.done():
                await serving  # its error
                raise RuntimeError("the demo's API stopped")
            try:
                if (await self.client.get("/readyz")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError("the demo's API did not become ready")
            await asyncio.sleep(0.2)


async def set_up(
    api: DemoApi,
    state: DemoState,
    plan: FleetPlan,
    database_url: str,
    save: Callable[[], None],
) -> None:
    """The clinics, their people, patients and pumps (what exists already is kept)."""
    clinics, created = await _clinics(api)
    if created:  # a database without the demo's clinics (its state file outlived it)
        state.set_up = state.booked = False
    for clinic in CLINICS:
        await _people(api, state, clinic, clinics[clinic.name], database_url)
    save()
    if state.set_up:
        return
    for clinic in CLINICS:
        nurse = state.person(email_of(clinic.nurse, clinic))
        assert nurse is not None
        as_nurse = await api.sign_in(nurse)
        patients = patients_of(plan, clinic, state.seed, state.started)
        for serial, patient in patients.items():
            patient_id = await _patient(api, as_nurse, patient)
            # The administrator provisions the pump to the clinic, the nurse assigns it.
            await api.call(
                "PUT",
                f"/v1/pumps/{serial}",
                api.admin,
                json={"clinic_id": clinics[clinic.name], "model": plan.models[serial]},
            )
            await api.call(
                "PUT",
                f"/v1/pumps/{serial}",
                as_nurse,
                json={"patient_id": patient_id, "implanted_on": patient.implanted_on.isoformat()},
            )
    state.set_up = True
    save()


async def _clinics(api: DemoApi) -> tuple[dict[str, str], bool]:
    """The demo clinics' ids by name (and whether any had to be created)."""
    listed = await api.call("GET", "/v1/clinics", api.admin, params={"limit": 200})
    found = {c["name"]: c["id"] for c in listed.json()["items"]}
    created = False
    for clinic in CLINICS:
        if clinic.name not in found:
            created = True
            made = await api.call(
                "POST",
                "/v1/clinics",
                api.admin,
                json={"name": clinic.name, "timezone": clinic.timezone},
            )
            found[clinic.name] = made.json()["id"]
    return found, created


_WORDS = (
    "amber", "basil", "cedar", "delta", "ember", "fjord", "grove", "harbor", "indigo", "juniper",
    "kelp", "lagoon", "meadow", "nectar", "orchid", "pebble", "quartz", "river", "saffron",
    "tundra", "umber", "violet", "willow", "yarrow", "zephyr",
)  # fmt: skip


def _password() -> str:
    return "-".join(secrets.choice(_WORDS) for _ in range(4))


async def _people(
    api: DemoApi, state: DemoState, clinic: DemoClinic, clinic_id: str, database_url: str
) -> None:
    """The clinic's administrator and nurse. Created with a password the state keeps; one who
    exists without a kept password (a configured database, no state file) gets a new one."""
    for role, name in (("clinic_admin", clinic.admin), ("clinician", clinic.nurse)):
        email = email_of(name, clinic)
        person = state.person(email)
        if person is None:
            person = Person(email, name, role, clinic.name, _password())
            state.people.append(person)
        made = await api.call(
            "POST",
            "/v1/users",
            api.admin,
            ok=(409,),
            json={
                "email": email,
                "display_name": name,
                "role": role,
                "clinic_id": clinic_id,
                "password": person.password,
            },
        )
        if made.status_code == 409 and not state.set_up:
            await _reset_password(database_url, email, person.password)


async def _reset_password(database_url: str, email: str, password: str) -> None:
    hashed = await asyncio.to_thread(passwords.hash_password, password)
    conn = await connect_with_retry(database_url, application_name="pumpwatch-demo")
    try:
        await conn.execute(_NEW_HASH, email, hashed)
    finally:
        await conn.close()


_NEW_HASH = """
UPDATE users SET password_hash = $2, password_changed_at = now(), deactivated_at = NULL
WHERE email = $1
"""


async def _patient(api: DemoApi, headers: dict[str, str], patient: DemoPatient) -> str:
    made = await api.call(
        "POST",
        "/v1/patients",
        headers,
        ok=(409,),
        json={
            "mrn": patient.mrn,
            "display_name": patient.display_name,
            "birth_date": patient.birth_date.isoformat(),
            "withdrawal_risk": patient.withdrawal_risk,
        },
    )
    if made.status_code != 409:
        return str(made.json()["id"])
    found = await api.call("GET", "/v1/patients", headers, params={"q": patient.mrn})
    return str(next(p["id"] for p in found.json()["items"] if p["mrn"] == patient.mrn))


async def book_visits(
    api: DemoApi,
    state: DemoState,
    database_url: str,
    save: Callable[[], None],
    console: Console,
) -> None:
    """Once the fleet's history is uploaded (its readings reach the present), each nurse books
    refill visits for the first pumps of her worklist that have none: a few days before the
    refill deadline, at 10:00 in the clinic's time zone, never in the past."""
    if state.booked:
        return
    await _until_caught_up(database_url)
    total = 0
    for clinic in CLINICS:
        nurse = state.person(email_of(clinic.nurse, clinic))
        assert nurse is not None
        as_nurse = await api.sign_in(nurse)
        due = await api.call(
            "GET", "/v1/refills/due", as_nurse, params={"within_days": 365, "limit": 50}
        )
        zone = ZoneInfo(clinic.timezone)
        booked = 0
        for item in due.json()["items"]:
            if booked >= BOOKINGS_PER_CLINIC:
                break
            if item["refill_appointment_at"] or not item["patient"]:
                continue
            if not item["refill_deadline_at"]:
                continue
            deadline = datetime.fromisoformat(item["refill_deadline_at"])
            day = max(
                (deadline - timedelta(days=3)).astimezone(zone).date(),
                (datetime.now(UTC) + timedelta(days=1)).astimezone(zone).date(),
            )
            visit = datetime.combine(day, time(10, 0), zone)
            await api.call(
                "PUT",
                f"/v1/pumps/{item['serial']}/refill-appointment",
                as_nurse,
                json={"scheduled_for": visit.isoformat()},
            )
            booked += 1
            total += 1
    state.booked = True
    save()
    console.print(
        f"visits booked    {total} refill visits, on the nurses' worklists (the history is in)",
        soft_wrap=True,
    )


async def _until_caught_up(database_url: str) -> None:
    conn = await connect_with_retry(database_url, application_name="pumpwatch-demo")
    try:
        while True:
            if await conn.fetchval(_CAUGHT_UP):
                return
            await asyncio.sleep(1.0)
    finally:
        await conn.close()


_CAUGHT_UP = "SELECT max(recorded_at) > now() - interval '1 hour' FROM readings"


async def show_claim_codes(database_url: str, unclaimed: list[str], console: Console) -> None:
    """Print the code an unclaimed pump's programmer shows, each time a new one appears (the
    programmer shows a new code every 20 minutes, each valid for an hour)."""
    if not unclaimed:
        return
    shown: str | None = None
    conn = await connect_with_retry(database_url, application_name="pumpwatch-demo")
    try:
        while True:
            row = await conn.fetchrow(_LIVE_CLAIM, unclaimed)
            if row is not None and row["code"] != shown:
                shown = row["code"]
                left = await conn.fetch(_UNHELD, unclaimed)
                until = row["expires_at"].astimezone(UTC)
                console.print(
                    f"claim code       {row['serial']} shows {row['code']} until "
                    f"{until:%H:%M} UTC (sign in as a nurse and claim the pump with it; "
                    f"unclaimed: {', '.join(r['serial'] for r in left)})",
                    soft_wrap=True,
                    highlight=False,
                )
            await asyncio.sleep(2.0)
    except (asyncpg.PostgresError, OSError) as exc:
        log.warning("demo_claim_codes_failed", error=str(exc))
    finally:
        await conn.close()


# The newest claim code of an unclaimed pump that stays valid for at least ten more minutes.
_LIVE_CLAIM = """
SELECT e.serial, e.body ->> 'code' AS code, (e.body ->> 'expires_at')::timestamptz AS expires_at
FROM events e LEFT JOIN pumps p ON p.serial = e.serial
WHERE e.serial = ANY($1::text[]) AND e.type = 'claim' AND p.clinic_id IS NULL
  AND (e.body ->> 'expires_at')::timestamptz > now() + interval '10 minutes'
  AND NOT EXISTS (SELECT 1 FROM pump_claims c WHERE c.msg_id = e.msg_id)
ORDER BY e.serial = ($1::text[])[1] DESC, e.recorded_at DESC
LIMIT 1
"""
_UNHELD = """
SELECT s.serial FROM unnest($1::text[]) AS s(serial) LEFT JOIN pumps p USING (serial)
WHERE p.clinic_id IS NULL ORDER BY s.serial
"""
