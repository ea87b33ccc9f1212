"""Scenario 7: PHI hygiene. Canary patients (seeded, unmistakable names, MRNs and birth dates)
are created through the API and used the way a clinic uses them; then their identifying strings
are looked for where they must never be.

Setup: `pumpwatch ingest`, `alerts` and `api` as real processes, all logging JSON at debug
level; a clinic, a canary patient per pump (POST /v1/patients), the pumps assigned (PUT
/v1/pumps/{serial}); a simulated fleet with faults published, so alerts open; then a clinician
searches patients by a canary name (the name in the query string), reads patients, dashboards,
alerts, acknowledges an alert with a note naming the patient, sends refused requests that carry
canaries (a duplicate MRN, a bad birth date), signs in to the web pages and opens the patient
page.

Looked in: every log line of the three processes; every /metrics (API, ingest, alerts); every
answer to the fleet role on every GET route of the OpenAPI document (path and query ids filled
with real ones) and the web fleet page. A canary found anywhere there is a leak.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx

from lab.bench.faults.common import (
    Lab,
    Outcome,
    Size,
    days_before_now,
    fetchval,
    ingest_service,
    publish,
    total,
    wait_until,
)
from lab.processes import ServiceProcess, api_service, metrics_service
from lab.sim.fleet import Fault, Fleet, Outgoing

ADMIN_TOKEN = "faults-phi-admin-token-7d20b1"  # noqa: S105 - a scratch API's bootstrap token

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
"""Path and query parameter names → the kind of id they take (as in the tenancy test)."""


@dataclass(frozen=True)
class PhiSize:
    pumps: int
    messages: int


SIZES: dict[Size, PhiSize] = {
    "reduced": PhiSize(pumps=8, messages=1_500),
    "full": PhiSize(pumps=40, messages=20_000),
}


@dataclass
class Canary:
    name: str
    mrn: str
    birth_date: date

    def needles(self) -> list[str]:
        """What gives the patient away, each checked case-insensitively: each word of the name
        (so a URL-encoded or split name is caught too), the MRN, the birth date."""
        return [*self.name.split(), self.mrn, self.birth_date.isoformat()]


def canaries(count: int, rng: random.Random) -> list[Canary]:
    made = []
    for _ in range(count):
        tag = f"{rng.getrandbits(32):08x}"
        made.append(
            Canary(
                name=f"Quillon{tag} Zarkwright{tag[::-1]}",
                mrn=f"CANARYMRN{tag.upper()}",
                # Long before any reading: no timestamp of the data can contain it.
                birth_date=date(1901, 1, 1) + timedelta(days=rng.randrange(3000)),
            )
        )
    return made


@dataclass
class Findings:
    checked: dict[str, int] = field(default_factory=dict)
    """Place → how many texts (lines, answers) were searched."""
    leaks: list[str] = field(default_factory=list)

    def search(self, place: str, text: str, pattern: re.Pattern[str]) -> None:
        kind = (
            "log lines"
            if place.endswith(" log")
            else "/metrics"
            if place.endswith("/metrics")
            else "fleet web pages"
            if place.startswith("fleet web")
            else "fleet API answers"
        )
        self.checked[kind] = self.checked.get(kind, 0) + 1
        found = pattern.search(text)
        if found:
            start = max(0, found.start() - 60)
            self.leaks.append(f"{place}: …{text[start : found.end() + 40]!r}")


def run(lab: Lab, size: Size, seed: int) -> Outcome:
    spec = SIZES[size]
    outcome = Outcome("phi", f"canary patients ({spec.pumps}) through ingest, alerts and the API")
    started = time.monotonic()
    rng = random.Random(seed)
    planted = canaries(spec.pumps, rng)
    needles = sorted({n for c in planted for n in c.needles()}, key=len, reverse=True)
    pattern = re.compile("|".join(re.escape(n) for n in needles), re.IGNORECASE)

    database_url = lab.database()
    broker = lab.broker("phi-mosquitto")
    debug = {"PUMPWATCH_LOG_LEVEL": "debug", "PUMPWATCH_LOG_FORMAT": "json"}
    ingest = ingest_service(lab, database_url, broker.url, name="phi-ingest", **debug)
    alerts = lab.service(
        metrics_service(
            "alerts",
            {"PUMPWATCH_DATABASE_URL": database_url, "PUMPWATCH_MQTT_URL": broker.url, **debug},
            lab.path("phi-alerts.log"),
        )
    )
    api = lab.service(
        api_service(
            {"PUMPWATCH_DATABASE_URL": database_url, "PUMPWATCH_ADMIN_TOKEN": ADMIN_TOKEN, **debug},
            lab.path("phi-api.log"),
        )
    )
    for service in (ingest, alerts, api):
        service.start(wait_ready=False)
    for service in (ingest, alerts, api):
        service.wait_ready()

    findings = Findings()
    fleet = Fleet(
        pumps=spec.pumps,
        seed=seed,
        start=days_before_now(spec.messages / spec.pumps / 96 + 2),
        fault_rates={Fault.MOTOR_STALL: 0.3, Fault.BATTERY: 0.3, Fault.MISSED_REFILL: 0.3},
    )
    base = api.base_url
    with httpx.Client(base_url=base, timeout=30) as client:
        world = _setup(client, fleet, planted, outcome)
        stream = [m for m in fleet.take(spec.messages) if m.valid]
        stream += _stalled_now(stream, rng)
        publish(broker.url, stream, client="phi-pub")
        try:
            wait_until(
                lambda: (
                    int(
                        asyncio.run(
                            fetchval(database_url, "SELECT count(*) FROM ingested_messages")
                        )
                    )
                    >= len(stream)
                ),
                "the stream to be stored",
                timeout_s=300,
                every_s=0.25,
                alive=ingest,
            )
            wait_until(
                lambda: (
                    _alerts_settled(alerts)
                    and int(asyncio.run(fetchval(database_url, "SELECT count(*) FROM alerts")))
                    >= spec.pumps
                ),
                "an alert on every pump",
                timeout_s=120,
                every_s=0.25,
                alive=alerts,
            )
        except (TimeoutError, RuntimeError) as exc:
            outcome.problems.append(str(exc).splitlines()[0])
        world.alerts = [
            a["id"]
            for a in _get(client, world.admin, "/v1/alerts?limit=500").json().get("items", [])
        ]
        requests = _clinic_activity(client, world, planted, outcome)
        _walk_fleet(client, world, findings, pattern, outcome)
        _fleet_web(client, world, findings, pattern)
        for service in (api, ingest, alerts):
            status, text = service.get("/metrics")
            outcome.check(status == 200, f"{service.command} /metrics answered {status}")
            findings.search(f"{service.command} /metrics", text, pattern)

    for service in (ingest, alerts, api):
        outcome.check(
            service.terminate() == 0, f"{service.command} did not stop cleanly on SIGTERM"
        )
        for line in service.log_path.read_text(errors="replace").splitlines():
            findings.search(f"{service.command} log", line, pattern)

    outcome.attempted = len(needles)
    outcome.figures["canaries planted (names, MRNs, birth dates)"] = (
        f"{len(planted)} patients, {len(needles)} strings"
    )
    outcome.figures["clinic requests carrying canaries"] = f"{requests}"
    outcome.figures["alerts opened on canary patients"] = f"{len(world.alerts)}"
    outcome.figures["searched"] = ", ".join(f"{k} {v:,}" for k, v in findings.checked.items())
    outcome.figures["leaks"] = f"{len(findings.leaks)}"
    for leak in findings.leaks[:10]:
        outcome.problems.append(f"leak: {leak}")
    outcome.check(len(world.alerts) >= spec.pumps, "not every canary patient got an alert")
    outcome.elapsed_s = time.monotonic() - started
    return outcome


@dataclass
class World:
    admin: str
    clinic: str
    clinician: str
    fleet: str
    patients: list[str]
    serials: list[str]
    webhook: str = ""
    key: str = ""
    alerts: list[str] = field(default_factory=list)


def _get(client: httpx.Client, key: str, path: str) -> httpx.Response:
    return client.get(path, headers={"Authorization": f"Bearer {key}"})


def _send(  # noqa: PLR0917 - a request: who, how, where, what, and where to report
    client: httpx.Client, key: str, method: str, path: str, body: Any, outcome: Outcome
) -> httpx.Response:
    answer = client.request(method, path, json=body, headers={"Authorization": f"Bearer {key}"})
    outcome.check(answer.status_code < 500, f"{method} {path} answered {answer.status_code}")
    return answer


def _setup(client: httpx.Client, fleet: Fleet, planted: list[Canary], outcome: Outcome) -> World:
    admin = ADMIN_TOKEN
    clinic = _send(
        client, admin, "POST", "/v1/clinics", {"name": "Canary Clinic", "timezone": "UTC"}, outcome
    ).json()["id"]
    keys = {}
    for role in ("clinician", "fleet"):
        answer = _send(
            client,
            admin,
            "POST",
            f"/v1/clinics/{clinic}/keys",
            {"role": role, "label": f"phi {role}"},
            outcome,
        )
        keys[role] = answer.json()
    patients, serials = [], []
    for pump, canary in zip(fleet.pumps, planted, strict=True):
        patient = _send(
            client,
            admin,
            "POST",
            "/v1/patients",
            {
                "clinic_id": clinic,
                "mrn": canary.mrn,
                "display_name": canary.name,
                "birth_date": canary.birth_date.isoformat(),
                "withdrawal_risk": "high",
            },
            outcome,
        ).json()["id"]
        _send(
            client,
            admin,
            "PUT",
            f"/v1/pumps/{pump.serial}",
            {"patient_id": patient, "model": pump.model},
            outcome,
        )
        patients.append(patient)
        serials.append(pump.serial)
    world = World(admin, clinic, keys["clinician"]["key"], keys["fleet"]["key"], patients, serials)
    world.key = keys["fleet"]["id"]
    hook = _send(
        client,
        world.clinician,
        "POST",
        "/v1/webhooks",
        {"url": "https://hooks.example.org/pumpwatch", "events": ["alert.opened"]},
        outcome,
    )
    world.webhook = hook.json().get("id", "") if hook.status_code < 300 else ""
    return world


def _stalled_now(stream: list[Outgoing], rng: random.Random) -> list[Outgoing]:
    """Each pump's newest reading again, a minute old, with its motor stalled: an alert on
    every canary patient (the alert path and the notification outbox carry them all)."""
    newest: dict[str, Outgoing] = {}
    for message in stream:
        if message.kind == "telemetry":
            newest[message.serial] = message
    stalled = []
    for message in newest.values():
        doc = json.loads(message.payload)
        doc["msg_id"] = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        doc["seq"] = doc.get("seq", 0) + 1
        doc["recorded_at"] = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
        doc["alarms"] = ["motor_stall"]
        stalled.append(
            Outgoing(
                topic=message.topic,
                payload=json.dumps(doc).encode(),
                kind="telemetry",
                msg_id=doc["msg_id"],
                serial=message.serial,
                valid=True,
                at=datetime.now(UTC),
            )
        )
    return stalled


def _alerts_settled(alerts: ServiceProcess) -> bool:
    samples = alerts.samples()
    return (
        samples is not None
        and total(samples, "pumpwatch_alerts_evaluations_total") > 0
        and samples.get("pumpwatch_alerts_pending_pumps", 1) == 0
    )


def _clinic_activity(
    client: httpx.Client, world: World, planted: list[Canary], outcome: Outcome
) -> int:
    """What a clinic does with its patients: every request names or reads a canary."""
    key = world.clinician
    count = 0
    for canary, patient in zip(planted, world.patients, strict=True):
        word = canary.name.split()[0]
        for path in (
            f"/v1/patients?q={word}",
            f"/v1/patients?q={canary.mrn}",
            f"/v1/patients/{patient}",
            f"/v1/patients/{patient}/dashboard",
        ):
            answer = _get(client, key, path)
            outcome.check(answer.status_code == 200, f"GET {path} answered {answer.status_code}")
            count += 1
        refused = [
            {"mrn": canary.mrn, "display_name": canary.name},  # the MRN exists: a conflict
            {"mrn": f"{canary.mrn}-2", "display_name": canary.name, "birth_date": "31.02.1901"},
        ]
        for body in refused:
            answer = _send(client, key, "POST", "/v1/patients", body, outcome)
            outcome.check(
                400 <= answer.status_code < 500, f"a refused patient answered {answer.status_code}"
            )
            count += 1
    for alert in world.alerts[:5]:
        canary = planted[0]
        _send(
            client,
            key,
            "POST",
            f"/v1/alerts/{alert}/acknowledge",
            {"note": f"called {canary.name} ({canary.mrn}) about the refill"},
            outcome,
        )
        _get(client, key, f"/v1/alerts/{alert}")
        count += 2
    # The web pages: sign in with the clinician key, open the worklist and a patient page.
    client.cookies.clear()
    form = client.get("/login")
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
    outcome.check(csrf is not None, "no CSRF token on the sign-in form")
    if csrf is not None:
        signed = client.post("/login", data={"key": key, "csrf_token": csrf[1]})
        outcome.check(signed.status_code == 303, f"web sign-in answered {signed.status_code}")
        for path in ("/", f"/patients/{world.patients[0]}"):
            page = client.get(path)
            outcome.check(page.status_code == 200, f"web {path} answered {page.status_code}")
            outcome.check(
                planted[0].name in page.text or path == "/", "the patient page lacks the name"
            )
            count += 1
    client.cookies.clear()
    return count


def _ids(world: World, kind: str) -> list[str]:
    return {
        "serial": world.serials[:2],
        "patient": world.patients[:2],
        "alert": world.alerts[:2],
        "clinic": [world.clinic],
        "webhook": [world.webhook] if world.webhook else [],
        "key": [world.key],
        # No person and no Observation id of the canaries' is made here: the routes are walked
        # with an id that names nothing (a 404 must not carry a canary either).
        "user": [],
        "observation": [],
    }[kind]


def _walk_fleet(
    client: httpx.Client,
    world: World,
    findings: Findings,
    pattern: re.Pattern[str],
    outcome: Outcome,
) -> None:
    """Every GET route of the OpenAPI document, as the fleet role, with real ids."""
    document = client.get("/openapi.json").json()
    routes = 0
    answered: dict[int, int] = {}
    for template, operations in document["paths"].items():
        operation = operations.get("get")
        if operation is None:
            continue
        parameters = operation.get("parameters", [])
        path_names = [p["name"] for p in parameters if p["in"] == "path"]
        unknown = [n for n in path_names if n not in ID_KINDS]
        if unknown:
            outcome.problems.append(f"{template}: unknown path parameter {unknown}")
            continue
        query = {
            p["name"]: _ids(world, ID_KINDS[p["name"]])
            for p in parameters
            if p["in"] == "query" and p["name"] in ID_KINDS
        }
        routes += 1
        variants = _fill(template, path_names, world)
        for path in variants:
            for name, values in [("", [""]), *query.items()]:
                for value in values:
                    full = f"{path}?{name}={value}" if name else path
                    answer = _get(client, world.fleet, full)
                    answered[answer.status_code] = answered.get(answer.status_code, 0) + 1
                    outcome.check(
                        answer.status_code < 500, f"fleet GET {full} answered {answer.status_code}"
                    )
                    findings.search(f"fleet GET {template}", answer.text, pattern)
    outcome.figures["fleet role: GET routes walked (answers by status)"] = (
        f"{routes} ({', '.join(f'{s} x {n}' for s, n in sorted(answered.items()))})"
    )
    outcome.check(answered.get(200, 0) > 0, "the fleet role was answered 200 nowhere")


def _fill(template: str, names: list[str], world: World) -> list[str]:
    paths = [template]
    for name in names:
        values = _ids(world, ID_KINDS[name]) or [str(uuid.UUID(int=0))]
        paths = [p.replace("{" + name + "}", v) for p in paths for v in values]
    return paths


def _fleet_web(
    client: httpx.Client, world: World, findings: Findings, pattern: re.Pattern[str]
) -> None:
    client.cookies.clear()
    form = client.get("/login")
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
    if csrf is None:
        findings.leaks.append("web: no CSRF token on the sign-in form (fleet page not checked)")
        return
    client.post("/login", data={"key": world.fleet, "csrf_token": csrf[1]})
    for path in ("/fleet", "/", f"/patients/{world.patients[0]}"):
        page = client.get(path)
        findings.search(f"fleet web {path}", page.text, pattern)
    client.cookies.clear()
