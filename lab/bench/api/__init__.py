"""``pumpwatch bench api``: latency and throughput of the HTTP API's read routes on a fleet with a
year of history, and whether the dashboard's cost grows with history.

For each history (1 month, then 1 year by default), in a scratch database of its own on the
configured (or local, or embedded) PostgreSQL:

1. **Seed** with COPY, as ingest and the alert engine would have left the database: clinics,
   patients, pumps assigned to them, a reading per pump every ``interval`` (the reservoir falling
   at the programmed rate, flex schedules step by step in the clinic's local time, refilled
   before the low alarm or at the drug's age limit), a ``refill`` event per refill, the hourly
   rollups (``readings_hourly``) with the aggregates of ingest's ``STORE_READINGS`` statement,
   ``pump_state`` at each pump's newest reading, the dose history, a resolved refill-due alert
   per past refill and open alerts where the data calls for them. Readings are written in time
   order, all pumps interleaved, as ingest writes them (a pump's readings are not contiguous on
   disk). Not seeded: the dedup ledger (``ingested_messages``), which no route reads. Then
   ``VACUUM (ANALYZE)``: the state autovacuum keeps a live database in, and no autovacuum run
   on the fresh tables in the middle of a measurement.
2. **Serve** with the real ``pumpwatch api`` process (``python -m services api``, default
   settings) and one clinician key per clinic and an admin key.
3. **Drive** each route with closed-loop clients in a separate process (``httpx`` with
   keep-alive, one connection per client, each sending its next request as soon as the previous
   answers): a warm-up, then ``seconds`` of measurement. Latency is measured at the client, from
   sending to the whole body read. The load generator, the API and PostgreSQL share the
   machine's cores, so the figures include the generator's share of the CPU.

Every non-2xx answer and every failed request is an error, counted and shown.

Here: the options and the run. The fleet and its generated history are in
``fleet``, the COPY seeding in ``seed``, the routes and the load process in ``load``, the
figures, tables and verdict lines in ``report``; the worklist phases (on a fleet of their own)
in ``worklist``, the fleet-size sweep (``fleet_sizes``: only the sweep runs) in ``sweep``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psutil
from rich.console import Console

from lab.bench.api import sweep, worklist
from lab.bench.api.fleet import SeedSpec, World
from lab.bench.api.load import (
    ADMIN_WORKLIST,
    DASHBOARD,
    ROUTES,
    LoadResult,
    LoadSpec,
    Route,
    drive,
    load_main,
    run_load_with_progress,
)
from lab.bench.api.report import (
    GOAL_P99_MS,
    BenchReport,
    PhaseResult,
    _print_report,
    percentile,
    phase_result,
)
from lab.bench.api.seed import (
    HOURLY_COLUMNS,
    Seeded,
    api_keys,
    history_label,
    seed,
    seed_with_progress,
)
from lab.bench.ingest import _drop_database, _fresh_database, _postgres
from lab.processes import ServiceProcess, api_service

__all__ = [
    "ADMIN_WORKLIST",
    "DASHBOARD",
    "GOAL_P99_MS",
    "HOURLY_COLUMNS",
    "ROUTES",
    "ApiBenchOptions",
    "BenchReport",
    "LoadResult",
    "LoadSpec",
    "PhaseResult",
    "Route",
    "SeedSpec",
    "Seeded",
    "World",
    "drive",
    "history_label",
    "load_main",
    "percentile",
    "run",
    "seed",
]


# -- options --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ApiBenchOptions:
    pumps: int = 1000
    clinics: int = 10
    days: float = 365.0
    """History of the main run."""
    compare_days: float = 30.0
    """History of the comparison run (0 skips it)."""
    interval_minutes: float = 60.0
    clients: int = 50
    seconds: float = 20.0
    """Measured seconds per route (after the warm-up)."""
    warmup_seconds: float = 2.0
    admin_clients: int = 5
    """Clients of the all-pumps (admin) worklist; 0 skips it."""
    paced_rates: tuple[float, ...] = (25.0, 50.0, 100.0, 150.0)
    """Dashboards/s offered in all by ``clients`` paced clients (each a Poisson stream of
    its share, latency counted from when each request was due), with the main history."""
    seed: int = 7
    worklist_pumps: int = 10_000
    """The worklist phases' fleet (lab/bench/api/worklist.py); 0 skips them."""
    worklist_clinic_pumps: int = 400
    worklist_only: bool = False
    """Only the worklist phases (not the history runs)."""
    fleet_sizes: tuple[int, ...] = ()
    """The fleet-size sweep (lab/bench/api/sweep.py): the read routes on a fleet of each size;
    when given, only the sweep runs. Empty: no sweep."""
    sweep_days: float = 3.0
    """History seeded for the sweep, at ``interval_minutes``."""
    sweep_alert_days: float = 365.0
    """The sweep's resolved alerts of this many days before its history (0: none)."""


# -- the run --------------------------------------------------------------------------------------


def run(options: ApiBenchOptions, console: Console, admin_url: str | None = None) -> BenchReport:
    report = BenchReport(options)
    load_before = os.getloadavg()[0]
    console.print(
        f"machine: {psutil.cpu_count()} cores, load average {load_before:.2f} at start; the load "
        "generator (one process), the API (one uvicorn process) and PostgreSQL share them"
    )
    histories = (
        [] if options.worklist_only else [d for d in (options.compare_days, options.days) if d > 0]
    )
    with contextlib.ExitStack() as stack:
        scratch = Path(tempfile.mkdtemp(prefix="pumpwatch-bench-api-"))
        stack.callback(shutil.rmtree, scratch, ignore_errors=True)
        admin = admin_url or _postgres(scratch, stack)
        if options.fleet_sizes:
            report.sweep = sweep.run(options, admin, scratch, console)
            return report
        for days in histories:
            with contextlib.ExitStack() as per_history:
                url = asyncio.run(_fresh_database(admin))
                per_history.callback(_drop, admin, url)
                spec = SeedSpec(
                    options.pumps,
                    options.clinics,
                    days,
                    options.interval_minutes,
                    options.seed,
                    datetime.now(UTC).replace(microsecond=0),
                )
                world, seeded = seed_with_progress(url, spec, console)
                report.seeded.append(seeded)
                # The read model as the engine keeps it (the dashboard reads its fresh rows).
                pumps, took = asyncio.run(worklist.seed_read_model(url))
                console.print(
                    f"read model: {pumps:,} rows written as the engine does in {took:.0f} s"
                )
                clinician_keys, admin_key = asyncio.run(api_keys(url, world))
                api = api_service(
                    {"PUMPWATCH_DATABASE_URL": url, "PUMPWATCH_LOG_LEVEL": "warning"},
                    scratch / f"api-{days:g}.log",
                )
                per_history.callback(api.stop)
                api.start()
                for route, clients, offered in _plan(options, main=days == options.days):
                    phase = _phase(
                        api, url, route, clients, offered, options, world, clinician_keys,
                        admin_key, seeded, console,
                    )  # fmt: skip
                    report.phases.append(phase)
                api.stop()
        if options.worklist_pumps > 0:
            report.worklists = _worklists(options, admin, scratch, console)
    if histories:
        _print_report(report, console)
    return report


def _worklists(
    options: ApiBenchOptions, admin: str, scratch: Path, console: Console
) -> list[PhaseResult]:
    found = worklist.WorklistBenchOptions(
        pumps=options.worklist_pumps,
        clinic_pumps=options.worklist_clinic_pumps,
        clients=options.clients,
        seconds=options.seconds,
        warmup_seconds=options.warmup_seconds,
        seed=options.seed,
    )
    url = asyncio.run(_fresh_database(admin))
    try:
        spec = worklist.spec_for(found)
        world, _ = seed_with_progress(url, spec, console)
        pumps, seconds = asyncio.run(worklist.seed_read_model(url))
        console.print(
            f"read model: {pumps:,} rows written as the engine writes them in {seconds:.0f} s"
        )
        keys_found = asyncio.run(api_keys(url, world))
        phases = worklist.run(
            found, url=url, scratch=scratch, keys=keys_found, world=world, console=console
        )
        worklist.print_report(found, phases, console)
    finally:
        _drop(admin, url)
    return phases


def _drop(admin_url: str, url: str) -> None:
    asyncio.run(_drop_database(admin_url, url))


def _plan(options: ApiBenchOptions, *, main: bool) -> list[tuple[Route, int, float | None]]:
    """(route, clients, offered requests/s or None for a closed loop) of each phase; the paced
    dashboard phases only with the main history."""
    plan: list[tuple[Route, int, float | None]] = []
    if options.clients != 1:
        plan.append((DASHBOARD, 1, None))
    plan += [(route, options.clients, None) for route in ROUTES]
    if main:
        plan += [(DASHBOARD, options.clients, rate) for rate in options.paced_rates]
    if options.admin_clients > 0:
        plan.append((ADMIN_WORKLIST, options.admin_clients, None))
    return plan


_TEMPLATES = {
    "dashboard": "/v1/patients/{patient_id}/dashboard",
    "worklist": "/v1/refills/due",
    "telemetry": "/v1/pumps/{serial}/telemetry",
    "hourly": "/v1/pumps/{serial}/telemetry",
}


def _phase(  # noqa: PLR0917 - one call site
    api: ServiceProcess,
    url: str,
    route: Route,
    clients: int,
    offered: float | None,
    options: ApiBenchOptions,
    world: World,
    clinician_keys: list[str],
    admin_key: str,
    seeded: Seeded,
    console: Console,
) -> PhaseResult:
    per_client = []
    for i in range(clients):
        clinic = i % len(world.clinic_ids)
        key = admin_key if route is ADMIN_WORKLIST else clinician_keys[clinic]
        per_client.append((key, route.paths(world, clinic)))
    seconds = options.seconds / 2 if clients == 1 and route is DASHBOARD else options.seconds
    spec = LoadSpec(
        base_url=api.base_url,
        clients=tuple(per_client),
        seconds=seconds,
        warmup_s=options.warmup_seconds,
        seed=options.seed,
        api_pid=api.pid,
        database_url=url,
        route_template=_TEMPLATES[route.key],
        interval_s=0.0 if offered is None else clients / offered,
    )
    total = options.warmup_seconds + seconds
    load = "closed loop" if offered is None else f"paced {offered:g}/s"
    description = f"{route.name} · {seeded.history} · {clients} clients · {load}"
    found = run_load_with_progress(spec, description, total, console, api)
    phase = phase_result(
        found,
        route=route.name,
        history=seeded.history,
        history_days=seeded.days,
        clients=clients,
        offered=offered,
    )
    errors = f"[bold red]{phase.errors:,} ERRORS[/]" if phase.errors else "0 errors"
    console.print(
        f"{description}: {phase.requests:,} requests, {phase.rate:,.0f}/s, "
        f"p50 {phase.percentile(50):.1f} ms, p99 {phase.percentile(99):.1f} ms, {errors}"
    )
    return phase
