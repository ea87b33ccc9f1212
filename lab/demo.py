"""``pumpwatch demo``: everything in one process, on embedded servers unless configured.

Starts PostgreSQL (pgserver) and an MQTT broker (mosquitto, else amqtt) when
``PUMPWATCH_DATABASE_URL`` / ``PUMPWATCH_MQTT_URL`` are not set, migrates, runs ingest, the
alert service (its notifications also on MQTT), the API and the fleet simulator, sets up the
demo's two clinics through the API (``lab.demo_clinic``: people, patients, assigned pumps,
unclaimed pumps with live claim codes, booked visits), prints where to look and a status line
now and then. What it needs to resume is kept in the data directory (``lab.demo_state``): a
restart there goes on with the same clinics and fleet; ``--reset`` starts afresh.
The simulated devices answer ``resend`` (backfill): one healthy pump's hub loses a few readings
on the way to the broker early on, and the demo prints ``gap filled …`` once ingest has asked for
them and stored what the hub resent. Ctrl-C or SIGTERM stops it all and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from rich.console import Console

from lab import demo_state, embedded
from lab.demo_clinic import (
    BOOKINGS_PER_CLINIC,
    CLINICS,
    DemoApi,
    FleetPlan,
    book_visits,
    email_of,
    plan_fleet,
    set_up,
    show_claim_codes,
)
from lab.demo_state import DemoState
from lab.sim.command import simulate
from lab.sim.fleet import Fault
from lab.sim.resend import TransitLoss
from services.alerts.service import AlertsService
from services.alerts.settings import AlertsSettings
from services.api import keys
from services.api import sql as api_sql
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
    reset: bool = False


async def run(options: DemoOptions, console: Console) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    settings = IngestSettings()
    # The state is kept beside the embedded database it describes, never for a configured one.
    keeps_state = settings.database_url is None
    if options.reset:
        if demo_state.reset(options.data_dir):
            console.print(f"reset: removed {options.data_dir}")
        if not keeps_state:
            console.print("reset: the configured database is left as it is")
    with contextlib.ExitStack() as servers:
        database_url, mqtt_url, mqtt5 = await _servers(settings, options, servers, console)
        conn = await connect_with_retry(database_url, application_name="pumpwatch-demo")
        try:
            applied = await migrate.apply(conn)
        finally:
            await conn.close()
        console.print(f"database migrated ({len(applied)} migrations applied)")
        state, resumed = _state(options, keeps_state, console)
        state.admin_key = await _admin_key(database_url, state.admin_key)
        if keeps_state:
            demo_state.save(options.data_dir, state)
        await _run_on(
            _On(database_url, mqtt_url, mqtt5, state, keeps_state, resumed),
            settings,
            options,
            stop,
            console,
        )
    console.print("demo stopped")


@dataclass(frozen=True)
class _On:
    """What the demo runs on: its servers and its state."""

    database_url: str
    mqtt_url: str
    mqtt5: bool
    state: DemoState
    keeps_state: bool
    resumed: bool


async def _run_on(
    on: _On,
    settings: IngestSettings,
    options: DemoOptions,
    stop: asyncio.Event,
    console: Console,
) -> None:
    database_url, mqtt_url, mqtt5, state = on.database_url, on.mqtt_url, on.mqtt5, on.state

    def save() -> None:
        if on.keeps_state:
            demo_state.save(options.data_dir, state)

    plan = plan_fleet(state, DEMO_FAULT_RATES)
    assert state.admin_key is not None
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
    # Alert notifications go out on MQTT too (clinics/{clinic_id}/alerts).
    notifier = runner.part(NotifySettings(database_url=database_url, mqtt_url=mqtt_url))
    alerting = asyncio.create_task(
        AlertsService(_alerts_settings(database_url, options), stop, (notifier,)).run(),
        name="alerts",
    )
    api_url = f"http://127.0.0.1:{options.api_port}"
    api = server(ApiSettings(database_url=database_url), "127.0.0.1", options.api_port)
    serving = asyncio.create_task(serve_until(api, stop), name="api")
    sim_stop = threading.Event()
    sim: threading.Thread | None = None
    helpers: list[asyncio.Task[None]] = []
    try:
        async with DemoApi(api_url, state.admin_key) as people:
            await people.ready(serving)
            await set_up(people, state, plan, database_url, save)
            console.print(
                f"clinics ready    {len(CLINICS)} clinics, "
                f"{sum(len(s) for s in plan.assigned.values())} patients with their pumps, "
                f"{len(plan.unclaimed)} unclaimed",
                soft_wrap=True,
            )
            # The fleet starts once ingest is subscribed: what it published before would be
            # lost (ingest's session is new), and with it the readings before the demo's gap.
            await _until_ready(service, ingest)
            transit = TransitLoss(count=DEMO_TRANSIT_LOSS)
            resume_from = await _resume_from(database_url) if on.resumed else None
            if resume_from is not None:
                console.print(
                    f"simulator        resumes at {resume_from:%Y-%m-%d %H:%M} UTC: it first "
                    "runs the history it already sent, without sending it again (a few seconds "
                    "per month of history)",
                    soft_wrap=True,
                )
            sim = _simulator(
                options,
                state,
                plan,
                sim_stop,
                mqtt_url=mqtt_url,
                mqtt5=mqtt5,
                transit=transit,
                resume_from=resume_from,
            )
            sim.start()
            helpers += [
                asyncio.create_task(
                    _helper(book_visits(people, state, database_url, save, console))
                ),
                asyncio.create_task(
                    _helper(show_claim_codes(database_url, plan.unclaimed, console))
                ),
                asyncio.create_task(_watch_gap_filled(database_url, transit, service, console)),
            ]
            _print_links(
                console,
                database_url=database_url,
                mqtt_url=mqtt_url,
                options=options,
                state=state,
                plan=plan,
                keeps_state=on.keeps_state,
            )
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
        if sim is not None:
            sim.join(10)
        for helper in helpers:
            helper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await helper
        await ingest  # re-raises a fatal error
        await alerting
        await serving


def _state(options: DemoOptions, keeps_state: bool, console: Console) -> tuple[DemoState, bool]:
    """The fleet and people of the previous run in this data directory (and True), or new
    ones."""
    state = demo_state.load(options.data_dir) if keeps_state else None
    if state is not None:
        console.print(
            f"resuming the demo in {options.data_dir}: the fleet of {state.pumps} pumps (seed "
            f"{state.seed}) whose history starts {state.started:%Y-%m-%d %H:%M} UTC, and its "
            "clinics (--reset starts afresh)",
            soft_wrap=True,
        )
        return state, True
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(days=options.backfill_days)
    fresh = demo_state.new_state(
        seed=options.seed, pumps=options.pumps, start=start, backfill_days=options.backfill_days
    )
    return fresh, False


async def _resume_from(database_url: str) -> datetime | None:
    """Where the previous run's fleet had got to: the newest stored reading, less one reading
    interval (pumps report staggered across it; what is sent twice is stored once)."""
    conn = await connect_with_retry(database_url, application_name="pumpwatch-demo")
    try:
        newest: datetime | None = await conn.fetchval("SELECT max(recorded_at) FROM readings")
    finally:
        await conn.close()
    return None if newest is None else newest - timedelta(minutes=15)


async def _helper(work: Coroutine[Any, Any, None]) -> None:
    """A side task of the demo: its failure is logged, the demo goes on."""
    try:
        await work
    except (httpx.HTTPError, RuntimeError, OSError, asyncpg.PostgresError) as exc:
        log.warning("demo_helper_failed", error=str(exc))


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
    state: DemoState,
    plan: FleetPlan,
    stop: threading.Event,
    *,
    mqtt_url: str,
    mqtt5: bool,
    transit: TransitLoss,
    resume_from: datetime | None,
) -> threading.Thread:
    first_refill = (
        {} if plan.discrepancy is None else {plan.discrepancy: timedelta(days=state.refill_in_days)}
    )
    return threading.Thread(
        target=simulate,
        name="simulator",
        kwargs={
            "target": parse_mqtt_url(mqtt_url),
            "pumps": state.pumps,
            "seed": state.seed,
            "accelerate": options.accelerate,
            "start": state.started,
            "fault": [f"{serial}:{k}" for serial, kinds in plan.faults.items() for k in kinds],
            "fault_rate": [f"{fault}={share}" for fault, share in DEMO_FAULT_RATES.items()],
            "titrating": plan.titrating,
            "first_refill": first_refill,
            "claimable": plan.unclaimed,
            "resume_from": resume_from,
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


async def _admin_key(database_url: str, kept: str | None) -> str:
    """The admin key the state kept, if the database still takes it; else a new one (shown
    once, like every key, and kept in the state file when there is one)."""
    conn = await connect_with_retry(database_url, application_name="pumpwatch-demo")
    try:
        if kept is not None:
            row = await conn.fetchrow(api_sql.KEY_BY_HASH, keys.hash_key(kept))
            if row is not None and row["revoked_at"] is None:
                return kept
        _, key = await keys.create(
            conn, role="admin", clinic_id=None, label="pumpwatch demo", created_by="demo"
        )
    finally:
        await conn.close()
    return key


def _print_links(
    console: Console,
    *,
    database_url: str,
    mqtt_url: str,
    options: DemoOptions,
    state: DemoState,
    plan: FleetPlan,
    keeps_state: bool,
) -> None:
    port = options.metrics_port
    broker_port = parse_mqtt_url(mqtt_url).port
    api = f"http://127.0.0.1:{options.api_port}"
    first = CLINICS[0]
    nurse = state.person(email_of(first.nurse, first))
    assert nurse is not None
    kept = options.data_dir / demo_state.STATE_FILE
    console.rule("pumpwatch demo is running — Ctrl-C stops it")
    console.print(f"API              {api}   (OpenAPI: {api}/docs)", soft_wrap=True)
    console.print(
        f"web dashboard    {api}/   sign in as {nurse.display_name}, nurse of the {first.name}:",
        soft_wrap=True,
    )
    console.print(f"  nurse email    {nurse.email}", soft_wrap=True)
    console.print(f"  nurse password {nurse.password}", soft_wrap=True)
    others = ", ".join(
        f"{p.email} ({'clinic admin' if p.role == 'clinic_admin' else 'nurse'})"
        for p in state.people
        if p is not nurse
    )
    console.print(
        f"  also           {others}; passwords in {kept} (readable by you only), kept for the "
        "next start"
        if keeps_state
        else f"  also           {others}: "
        + ", ".join(f"{p.email} {p.password}" for p in state.people if p is not nurse)
        + " (passwords set anew at each start)",
        soft_wrap=True,
        highlight=False,
    )
    console.print(f"admin key        {state.admin_key}", soft_wrap=True)
    console.print(
        f"  e.g.           curl -H 'Authorization: Bearer {state.admin_key}' {api}/v1/refills/due",
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
        f"alerts on MQTT   every alert change, e.g. mosquitto_sub -p {broker_port} "
        "-t 'clinics/+/alerts' -v",
        soft_wrap=True,
    )
    days = (datetime.now(UTC) - state.started).total_seconds() / 86400
    console.print(
        f"simulator        {state.pumps} pumps, seed {state.seed}: {days:.0f} days of history "
        f"at x{options.accelerate:g}, then live; dose titration: "
        f"{', '.join(plan.titrating) or 'none'}; a refill with a discrepancy: "
        f"{plan.discrepancy or 'none'}",
        soft_wrap=True,
    )
    console.print(
        f"claims           {', '.join(plan.unclaimed) or 'none'} unclaimed: a 'claim code' line "
        "shows the code its programmer shows now (a new one every 20 minutes)",
        soft_wrap=True,
    )
    console.print(
        f"visits           each nurse books {BOOKINGS_PER_CLINIC} refill visits once the history "
        "is uploaded",
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
