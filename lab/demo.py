"""``pumpwatch demo``: everything in one process, on embedded servers unless configured.

Starts PostgreSQL (pgserver) and an MQTT broker (mosquitto, else amqtt) when
``PUMPWATCH_DATABASE_URL`` / ``PUMPWATCH_MQTT_URL`` are not set, migrates, runs ingest, the
alert service and the fleet simulator, prints where to look and a status line now and then.
The simulated devices answer ``resend`` (backfill): one healthy pump's hub loses a few readings
on the way to the broker early on, and the demo prints ``gap filled …`` once ingest has asked for
them and stored what the hub resent. Ctrl-C or SIGTERM stops it all and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import asyncpg
from rich.console import Console

from lab import embedded
from lab.sim.command import simulate
from lab.sim.fleet import Fault
from lab.sim.resend import TransitLoss
from services.alerts.service import AlertsService
from services.alerts.settings import AlertsSettings
from services.api import keys, passwords
from services.api.server import serve_until, server
from services.api.settings import ApiSettings
from services.ingest.service import IngestService
from services.ingest.settings import IngestSettings
from services.logs import get
from services.notify import runner
from services.notify.settings import NotifySettings
from services.settings import parse_mqtt_url
from services.storage import migrate
from services.storage.database import connect_with_retry

log = get(__name__)

# Enough of every fault that the demo shows what pumpwatch catches, and mostly healthy pumps.
DEMO_FAULT_RATES = {
    Fault.MOTOR_STALL: 0.04,
    Fault.OCCLUSION: 0.04,
    Fault.OVER_INFUSION: 0.04,
    Fault.MISSED_REFILL: 0.06,
    Fault.BATTERY: 0.04,
    Fault.SILENCE: 0.04,
    Fault.MALFORMED: 0.04,
    Fault.GAP: 0.08,
}
DEMO_TRANSIT_LOSS = 3
"""Readings one healthy pump's hub loses on the way to the broker (and still holds)."""


@dataclass(frozen=True)
class DemoOptions:
    pumps: int
    seed: int | None
    accelerate: float
    backfill_days: float
    data_dir: Path
    metrics_port: int
    alerts_metrics_port: int
    api_port: int = 8000
    status_every_s: float = 10.0


async def run(options: DemoOptions, console: Console) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    settings = IngestSettings()
    with contextlib.ExitStack() as servers:
        database_url, mqtt_url, mqtt5 = await _servers(settings, options, servers, console)
        conn = await connect_with_retry(database_url, application_name="pumpwatch-demo")
        try:
            applied = await migrate.apply(conn)
        finally:
            await conn.close()
        console.print(f"database migrated ({len(applied)} migrations applied)")
        admin_key = await _admin_key(database_url)
        nurse = await _people(database_url)

        ingest_settings = settings.model_copy(
            update={
                "database_url": database_url,
                "mqtt_url": mqtt_url,
                "mqtt_client_id": "pumpwatch-demo-ingest",
                "metrics_port": options.metrics_port,
                "metrics_host": "127.0.0.1",
                **({} if mqtt5 else {"mqtt_protocol": "3.1.1", "mqtt_share_group": ""}),
            }
        )
        service = IngestService(ingest_settings, stop)
        ingest = asyncio.create_task(service.run(), name="ingest")
        notifier = runner.part(NotifySettings(database_url=database_url))
        alerting = asyncio.create_task(
            AlertsService(_alerts_settings(database_url, options), stop, (notifier,)).run(),
            name="alerts",
        )
        api = server(ApiSettings(database_url=database_url), "127.0.0.1", options.api_port)
        serving = asyncio.create_task(serve_until(api, stop), name="api")
        seed = options.seed if options.seed is not None else secrets.randbelow(1_000_000)
        # The fleet starts once ingest is subscribed: what it published before would be lost
        # (ingest's session is new), and with it the readings before the demo's gap.
        await _until_ready(service, ingest)
        sim_stop = threading.Event()
        transit = TransitLoss(count=DEMO_TRANSIT_LOSS)
        sim = _simulator(options, mqtt_url, mqtt5, seed, sim_stop, transit=transit)
        sim.start()
        provisioning = asyncio.create_task(_provision(database_url), name="provision")
        watching = asyncio.create_task(
            _watch_gap_filled(database_url, transit, service, console), name="gap"
        )
        _print_links(
            console,
            database_url=database_url,
            mqtt_url=mqtt_url,
            options=options,
            seed=seed,
            admin_key=admin_key,
            nurse=nurse,
        )
        try:
            await _report_until_stopped(
                service,
                database_url,
                workers=(ingest, alerting, serving),
                stop=stop,
                sim=sim,
                options=options,
                console=console,
            )
        finally:
            console.print("stopping: simulator, ingest (draining), alerts, API, servers…")
            sim_stop.set()
            stop.set()
            sim.join(10)
            for helper in (provisioning, watching):
                helper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await helper
            await ingest  # re-raises a fatal error
            await alerting
            await serving
    console.print("demo stopped")


async def _servers(
    settings: IngestSettings,
    options: DemoOptions,
    servers: contextlib.ExitStack,
    console: Console,
) -> tuple[str, str, bool]:
    """The configured servers, or embedded ones: (database URL, broker URL, MQTT 5?)."""
    database_url = settings.database_url
    if database_url is None:
        console.print("starting embedded PostgreSQL (pgserver)…")
        postgres = embedded.start_postgres(options.data_dir / "postgres")
        servers.callback(postgres.stop)
        database_url = postgres.url
    if settings.mqtt_url is not None:
        return database_url, settings.mqtt_url, True
    broker = await _start_broker(options.data_dir / "mosquitto")
    servers.callback(broker.stop)
    console.print(f"started embedded MQTT broker ({broker.kind}) at {broker.url}")
    return database_url, broker.url, broker.supports_mqtt5


def _simulator(
    options: DemoOptions,
    mqtt_url: str,
    mqtt5: bool,
    seed: int,
    stop: threading.Event,
    *,
    transit: TransitLoss,
) -> threading.Thread:
    return threading.Thread(
        target=simulate,
        name="simulator",
        kwargs={
            "target": parse_mqtt_url(mqtt_url),
            "pumps": options.pumps,
            "seed": seed,
            "accelerate": options.accelerate,
            "backfill_days": options.backfill_days,
            "fault_rate": [f"{fault}={share}" for fault, share in DEMO_FAULT_RATES.items()],
            "client_id": "pumpwatch-demo-simulator",
            "protocol": "5" if mqtt5 else "3.1.1",
            "progress": False,
            "stop": stop,
            "resend": True,
            "transit_loss": transit,
        },
        daemon=True,
    )


def _alerts_settings(database_url: str, options: DemoOptions) -> AlertsSettings:
    # The simulator replays weeks of history in seconds: judge by the data's clock, so a pump
    # is not "silent" just because its history is still being uploaded.
    return AlertsSettings(
        database_url=database_url,
        metrics_port=options.alerts_metrics_port,
        metrics_host="127.0.0.1",
        alerts_clock="data",
        alerts_sweep_interval_s=10.0,
    )


async def _report_until_stopped(
    service: IngestService,
    database_url: str,
    *,
    workers: tuple[asyncio.Task[None], ...],
    stop: asyncio.Event,
    sim: threading.Thread,
    options: DemoOptions,
    console: Console,
) -> None:
    stopper = asyncio.create_task(stop.wait())
    started = time.monotonic()
    try:
        while not stop.is_set():
            done, _ = await asyncio.wait(
                {*workers, stopper},
                timeout=options.status_every_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if done - {stopper}:
                return
            console.print(_status(service, time.monotonic() - started, sim.is_alive()))
            console.print(await _alert_status(database_url))
    finally:
        stopper.cancel()


async def _until_ready(
    service: IngestService, ingest: asyncio.Task[None], timeout_s: float = 60.0
) -> None:
    """Until ingest is subscribed and has its database (its /readyz), or has stopped, or the
    time is up (the demo then goes on: the status lines show what ingest is doing)."""
    deadline = time.monotonic() + timeout_s
    while not service.health.readiness()[0] and not ingest.done():
        if time.monotonic() > deadline:
            log.warning("ingest_not_ready", waited_s=timeout_s)
            return
        await asyncio.sleep(0.1)


async def _watch_gap_filled(
    database_url: str, transit: TransitLoss, service: IngestService, console: Console
) -> None:
    """Print one line once every reading the transit loss took is stored: the gap it opened
    was asked for (``resend``) and filled from what the pump's hub held."""
    lost: list[str] = []
    while not lost:
        await asyncio.sleep(0.5)
        held = transit.done()
        lost = [m.msg_id for m in held if m.msg_id is not None]
    lost_at = time.monotonic()
    seqs = sorted(int(json.loads(m.payload)["seq"]) for m in held)
    conn = await connect_with_retry(database_url, application_name="pumpwatch-demo")
    try:
        while True:  # the hub's resent readings, stored (the ledger holds every msg_id)
            if await conn.fetchval(_STORED, lost) >= len(lost):
                break
            await asyncio.sleep(0.5)
    finally:
        await conn.close()
    registry = service.metrics.registry
    asked = int(registry.get_sample_value("pumpwatch_ingest_backfill_requests_total") or 0)
    console.print(
        f"gap filled       {transit.serial}: hub readings seq {seqs[0]} to {seqs[-1]} were lost on "
        f"the way to the broker; ingest asked the hub to resend them ({asked} resend "
        f"command{'s' if asked != 1 else ''} so far), all {len(lost)} stored "
        f"{time.monotonic() - lost_at:.1f} s after the loss",
        soft_wrap=True,
        highlight=False,
    )


_STORED = "SELECT count(*) FROM ingested_messages WHERE msg_id = ANY($1::uuid[])"


async def _start_broker(data_dir: Path) -> embedded.EmbeddedBroker:
    try:
        return embedded.start_mosquitto(data_dir)
    except FileNotFoundError:
        log.info("mosquitto_not_found", using="amqtt (MQTT 3.1.1, in process)")
        return await embedded.start_amqtt()


async def _admin_key(database_url: str) -> str:
    """A fresh admin key for this run (shown once, like every key)."""
    conn = await connect_with_retry(database_url, application_name="pumpwatch-demo")
    try:
        _, key = await keys.create(
            conn, role="admin", clinic_id=None, label="pumpwatch demo", created_by="demo"
        )
    finally:
        await conn.close()
    return key


DEMO_CLINICS = (("North spinal unit", "north"), ("South pain clinic", "south"))


async def _people(database_url: str) -> tuple[str, str]:
    """The demo clinics, each with a clinic administrator and a nurse (random passwords, this
    run's); returns the first nurse's email and password, which the demo prints."""
    conn = await connect_with_retry(database_url, application_name="pumpwatch-demo")
    made: list[tuple[str, str]] = []
    try:
        for name, tag in DEMO_CLINICS:
            clinic = await conn.fetchval("SELECT id FROM clinics WHERE name = $1", name)
            if clinic is None:
                clinic = await conn.fetchval(
                    "INSERT INTO clinics (name, timezone) VALUES ($1, 'Europe/Berlin') "
                    "RETURNING id",
                    name,
                )
            for role, person in (("clinic_admin", "Ada Admin"), ("clinician", "Nora Nurse")):
                email = f"{person.split()[0].lower()}@{tag}.demo"
                password = "-".join(secrets.choice(_WORDS) for _ in range(4))
                hashed = await asyncio.to_thread(passwords.hash_password, password)
                await conn.execute(
                    "INSERT INTO users (email, display_name, role, clinic_id, password_hash, "
                    "password_changed_at, created_by) VALUES ($1, $2, $3, $4, $5, now(), 'demo') "
                    "ON CONFLICT (email) DO UPDATE SET password_hash = EXCLUDED.password_hash, "
                    "deactivated_at = NULL",
                    email,
                    f"{person} ({tag})",
                    role,
                    clinic,
                    hashed,
                )
                made.append((email, password))
    finally:
        await conn.close()
    return made[1]


_WORDS = (
    "amber",
    "basil",
    "cedar",
    "delta",
    "ember",
    "fjord",
    "grove",
    "harbor",
    "indigo",
    "juniper",
    "kelp",
    "lagoon",
    "meadow",
    "nectar",
    "orchid",
    "pebble",
    "quartz",
    "river",
    "saffron",
    "tundra",
    "umber",
    "violet",
    "willow",
    "yarrow",
    "zephyr",
)


async def _provision(database_url: str) -> None:
    """Once the simulator's pumps have reported, give them to the demo clinics in turn, each
    with a patient, so the clinics' people see a worklist (later pumps stay the admin's)."""
    conn = await connect_with_retry(database_url, application_name="pumpwatch-demo")
    try:
        for _ in range(120):
            if await conn.fetchval("SELECT count(*) FROM pumps") > 0:
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(2)  # let the first burst of pumps arrive
        clinics = [
            await conn.fetchval("SELECT id FROM clinics WHERE name = $1", name)
            for name, _ in DEMO_CLINICS
        ]
        serials = await conn.fetch(
            "SELECT serial FROM pumps WHERE clinic_id IS NULL ORDER BY serial"
        )
        for i, row in enumerate(serials):
            clinic = clinics[i % len(clinics)]
            async with conn.transaction():
                patient = await conn.fetchval(
                    "INSERT INTO patients (clinic_id, mrn, display_name) VALUES ($1, $2, $3) "
                    "ON CONFLICT (clinic_id, mrn) DO UPDATE SET mrn = EXCLUDED.mrn RETURNING id",
                    clinic,
                    f"DEMO-{row['serial']}",
                    f"Demo patient {i + 1}",
                )
                await conn.execute(
                    "SELECT set_config('pumpwatch.actor', 'demo', true), "
                    "set_config('pumpwatch.custody', 'provisioned', true)"
                )
                await conn.execute(
                    "UPDATE pumps SET clinic_id = $2, patient_id = $3 WHERE serial = $1",
                    row["serial"],
                    clinic,
                    patient,
                )
    finally:
        await conn.close()


def _print_links(
    console: Console,
    *,
    database_url: str,
    mqtt_url: str,
    options: DemoOptions,
    seed: int,
    admin_key: str,
    nurse: tuple[str, str],
) -> None:
    port = options.metrics_port
    broker_port = parse_mqtt_url(mqtt_url).port
    api = f"http://127.0.0.1:{options.api_port}"
    console.rule("pumpwatch demo is running — Ctrl-C stops it")
    console.print(f"API              {api}   (OpenAPI: {api}/docs)", soft_wrap=True)
    console.print(
        f"web dashboard    {api}/   sign in as a nurse of the first demo clinic:", soft_wrap=True
    )
    console.print(f"  nurse email    {nurse[0]}", soft_wrap=True)
    console.print(f"  nurse password {nurse[1]}", soft_wrap=True)
    console.print(f"admin key        {admin_key}", soft_wrap=True)
    console.print(
        f"  e.g.           curl -H 'Authorization: Bearer {admin_key}' {api}/v1/refills/due",
        soft_wrap=True,
    )
    console.print(f"ingest metrics   http://127.0.0.1:{port}/metrics", soft_wrap=True)
    console.print(f"ingest health    http://127.0.0.1:{port}/healthz and /readyz", soft_wrap=True)
    console.print(
        f"alerts metrics   http://127.0.0.1:{options.alerts_metrics_port}/metrics", soft_wrap=True
    )
    console.print(f"database         psql '{database_url}'", soft_wrap=True)
    console.print(
        f"broker           {mqtt_url}   e.g. mosquitto_sub -p {broker_port} -t 'pumps/#' -v",
        soft_wrap=True,
    )
    console.print(
        f"simulator        {options.pumps} pumps, seed {seed}: "
        f"{options.backfill_days:g} days of history at x{options.accelerate:g}, "
        "then live",
        soft_wrap=True,
    )
    console.print(
        f"backfill         one pump's hub loses {DEMO_TRANSIT_LOSS} readings on the way to the "
        "broker; a line says when backfill has filled that gap (so does "
        "pumpwatch_ingest_backfill_gaps_recovered_total in the ingest metrics)",
        soft_wrap=True,
    )
    console.rule()


async def _alert_status(database_url: str) -> str:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(_OPEN_ALERTS)
    finally:
        await conn.close()
    if not rows:
        return "           no open alerts"
    return "           open alerts: " + " · ".join(
        f"{r['rule']} {r['priority']} x{r['count']}" for r in rows
    )


_OPEN_ALERTS = """
SELECT rule, priority, count(*) FROM alerts WHERE status <> 'resolved'
GROUP BY rule, priority ORDER BY max(CASE priority WHEN 'high' THEN 3 WHEN 'medium' THEN 2
ELSE 1 END) DESC, rule
"""


def _status(service: IngestService, elapsed_s: float, simulating: bool) -> str:
    registry = service.metrics.registry

    def value(name: str, **labels: str) -> int:
        return int(registry.get_sample_value(name, labels) or 0)

    stored = value("pumpwatch_ingest_messages_stored_total", kind="telemetry")
    events = value("pumpwatch_ingest_messages_stored_total", kind="events")
    quarantined = sum(
        int(sample.value)
        for metric in registry.collect()
        if metric.name == "pumpwatch_ingest_messages_quarantined"
        for sample in metric.samples
        if sample.name.endswith("_total")
    )
    gaps = value("pumpwatch_ingest_sequence_gaps_total")
    filled = value("pumpwatch_ingest_backfill_gaps_recovered_total", requested="true")
    return (
        f"[{elapsed_s:6.0f} s] readings {stored:,} · events {events:,} · quarantined "
        f"{quarantined:,} · sequence gaps {gaps:,} (filled by backfill {filled:,}) · duplicates "
        f"{value('pumpwatch_ingest_messages_duplicate_total'):,}"
        + ("" if simulating else " · simulator stopped")
    )
