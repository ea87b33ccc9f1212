"""The fleet-size sweep of ``pumpwatch bench api`` (``--fleet-sizes 1000,10000``): the same read
routes measured on fleets of growing size, to show whether each stays flat as the fleet grows.

For each size, in a scratch database of its own: the fleet seeded as for the other phases
(``seed``) with a short history (``sweep_days`` of readings at ``interval_minutes``: the routes
read a pump's recent past, not the fleet's), the read model as the engine writes it, the real
``pumpwatch api`` process, then each route driven by ``clients`` closed-loop clients for
``seconds`` after a warm-up. The clinic-scoped routes read one clinic of
``worklist_clinic_pumps`` pumps, the same pumps at every size (the first of the fleet: the seed
draws them first, so they are generated alike); the other pumps fill clinics of at most that
size. The admin worklist reads the whole fleet's first page.

The short history has almost no resolved alerts (one per refill in it), where a fleet that has
run a year has one per refill of that year in its alert table, which the alert list reads: so
before the history the sweep adds ``sweep_alert_days`` of them (``_ALERT_HISTORY``), a resolved
refill-due alert 14 days before each refill, a refill each time the reservoir would have emptied
to its low alarm at the pump's rate (at the drug's age limit, 150 days, at the latest).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg
from rich.console import Console
from rich.table import Table

from lab.bench.api.fleet import SeedSpec, World
from lab.bench.api.load import LoadSpec, run_load_with_progress
from lab.bench.api.report import PhaseResult, phase_result
from lab.bench.api.seed import api_keys, history_label, seed_with_progress
from lab.bench.api.worklist import seed_read_model
from lab.bench.ingest import _drop_database, _fresh_database
from lab.processes import ServiceProcess, api_service

if TYPE_CHECKING:
    from lab.bench.api import ApiBenchOptions

# $1: the seeded history's start; $2: days of alerts before it. Each pump's refills from its
# seeded rate and reservoir, a phase of its own from its serial; the engine's two history rows.
_ALERT_HISTORY = """
WITH made AS (
    INSERT INTO alerts (id, serial, rule, priority, status, title, detail, opened_at, updated_at,
                        resolved_at, resolved_by, resolution, condition_at)
    SELECT gen_random_uuid(), s.serial, 'refill_due', 'low', 'resolved', 'Refill due in 14 days',
           'The reservoir reaches its low alarm soon and no visit is booked before it.',
           r.at - interval '14 days', r.at, r.at, 'pumpwatch-alerts', 'the pump was refilled',
           r.at - interval '14 days'
    FROM pump_state s
    CROSS JOIN LATERAL (
        SELECT least(150, (s.capacity_ml - s.low_alarm_ml) / s.rate_ml_per_day)
               * interval '1 day' AS every
    ) c
    CROSS JOIN LATERAL generate_series(
        $1::timestamptz - c.every * (abs(hashtext(s.serial)) % 1000 / 1000.0),
        $1::timestamptz - $2::float8 * interval '1 day',
        -c.every
    ) AS r(at)
    RETURNING id, opened_at, resolved_at
)
INSERT INTO alert_history (alert_id, at, actor, action, from_status, to_status, from_priority,
                           to_priority, reason)
SELECT id, opened_at, 'pumpwatch-alerts', 'opened', NULL, 'open', NULL, 'low', '' FROM made
UNION ALL
SELECT id, resolved_at, 'pumpwatch-alerts', 'resolved', 'open', 'resolved', 'low', 'low',
       'the pump was refilled'
FROM made
"""

FLAT_WITHIN = 1.25
"""A route is flat when its CPU per request on the largest fleet is within this of the
smallest's (the same margin as the history check's)."""


@dataclass(frozen=True)
class SweepRoute:
    name: str
    template: str
    """The route's template in the API's /metrics (server-side latency)."""
    path: str
    """The path, ``{patient_id}`` or ``{serial}`` filled from the measured clinic's."""
    admin: bool = False

    def paths(self, world: World) -> tuple[str, ...]:
        if "{patient_id}" in self.path:
            return tuple(self.path.format(patient_id=p) for p in world.patients[0])
        if "{serial}" in self.path:
            return tuple(self.path.format(serial=s) for s in world.serials[0])
        return (self.path,)


SWEEP_ROUTES = (
    SweepRoute("patient", "/v1/patients/{patient_id}", "/v1/patients/{patient_id}"),
    SweepRoute("pump", "/v1/pumps/{serial}", "/v1/pumps/{serial}"),
    SweepRoute("pumps (clinic)", "/v1/pumps", "/v1/pumps"),
    SweepRoute(
        "dashboard", "/v1/patients/{patient_id}/dashboard", "/v1/patients/{patient_id}/dashboard"
    ),
    SweepRoute("worklist (clinic)", "/v1/refills/due", "/v1/refills/due"),
    SweepRoute("alerts (clinic)", "/v1/alerts", "/v1/alerts"),
    SweepRoute("worklist (all, admin)", "/v1/refills/due", "/v1/refills/due", admin=True),
    SweepRoute("pumps (all, admin)", "/v1/pumps", "/v1/pumps", admin=True),
)


def spec_for(options: ApiBenchOptions, pumps: int) -> SeedSpec:
    """``pumps`` with the measured clinic first, the rest in clinics of at most its size."""
    clinic = min(options.worklist_clinic_pumps, pumps)
    return SeedSpec(
        pumps,
        1 + math.ceil((pumps - clinic) / options.worklist_clinic_pumps),
        options.sweep_days,
        options.interval_minutes,
        options.seed,
        datetime.now(UTC).replace(microsecond=0),
        first_clinic_pumps=clinic,
    )


def run(options: ApiBenchOptions, admin: str, scratch: Path, console: Console) -> list[PhaseResult]:
    """Every route on a fresh fleet of each size; prints the tables, returns the phases."""
    phases: list[PhaseResult] = []
    for size in options.fleet_sizes:
        console.rule(f"fleet of {size:,} pumps")
        phases += _one_fleet(options, size, admin, scratch, console)
    print_report(options, phases, console)
    return phases


def _one_fleet(
    options: ApiBenchOptions, size: int, admin: str, scratch: Path, console: Console
) -> list[PhaseResult]:
    url = asyncio.run(_fresh_database(admin))
    with contextlib.ExitStack() as stack:
        stack.callback(lambda: asyncio.run(_drop_database(admin, url)))
        spec = spec_for(options, size)
        world, _ = seed_with_progress(url, spec, console)
        if options.sweep_alert_days > 0:
            with console.status(f"adding {options.sweep_alert_days:g} days of resolved alerts"):
                added, took = asyncio.run(_alert_history(url, spec, options.sweep_alert_days))
            console.print(
                f"alert history: {added:,} resolved alerts of the {options.sweep_alert_days:g} "
                f"days before the readings in {took:.0f} s"
            )
        with console.status(f"writing the read model of {size:,} pumps as the engine does"):
            pumps, took = asyncio.run(seed_read_model(url))
        console.print(f"read model: {pumps:,} rows written as the engine does in {took:.0f} s")
        clinician_keys, admin_key = asyncio.run(api_keys(url, world))
        api = api_service(
            {"PUMPWATCH_DATABASE_URL": url, "PUMPWATCH_LOG_LEVEL": "warning"},
            scratch / f"api-sweep-{size}.log",
        )
        stack.callback(api.stop)
        api.start()
        found = []
        for route in SWEEP_ROUTES:
            key = admin_key if route.admin else clinician_keys[0]
            found.append(_phase(api, url, route, key, world, size, options, console))
        return found


async def _alert_history(url: str, spec: SeedSpec, days: float) -> tuple[int, float]:
    """Resolved refill-due alerts of ``days`` before the seeded history; (alerts, seconds)."""
    started = time.perf_counter()
    conn = await asyncpg.connect(url)
    try:
        before = int(await conn.fetchval("SELECT count(*) FROM alerts"))
        await conn.execute(_ALERT_HISTORY, spec.start, days)
        added = int(await conn.fetchval("SELECT count(*) FROM alerts")) - before
        await conn.execute("VACUUM (ANALYZE) alerts, alert_history")
    finally:
        await conn.close()
    return added, time.perf_counter() - started


def _phase(  # noqa: PLR0917 - one module's helper
    api: ServiceProcess,
    url: str,
    route: SweepRoute,
    key: str,
    world: World,
    size: int,
    options: ApiBenchOptions,
    console: Console,
) -> PhaseResult:
    paths = route.paths(world)
    spec = LoadSpec(
        base_url=api.base_url,
        clients=tuple((key, paths) for _ in range(options.clients)),
        seconds=options.seconds,
        warmup_s=options.warmup_seconds,
        seed=options.seed,
        api_pid=api.pid,
        database_url=url,
        route_template=route.template,
    )
    total = options.warmup_seconds + options.seconds
    description = f"{route.name} · {size:,} pumps · {options.clients} clients · closed loop"
    found = run_load_with_progress(spec, description, total, console, api)
    phase = phase_result(
        found,
        route=route.name,
        history=f"{size:,} pumps",
        history_days=options.sweep_days,
        clients=options.clients,
        offered=None,
        fleet_pumps=size,
    )
    errors = f"[bold red]{phase.errors:,} ERRORS[/]" if phase.errors else "0 errors"
    console.print(
        f"{description}: {phase.requests:,} requests, {phase.rate:,.0f}/s, "
        f"p50 {phase.percentile(50):.1f} ms, p99 {phase.percentile(99):.1f} ms, "
        f"CPU/req api {_cpu_ms(phase, 'api'):.2f} ms · pg {_cpu_ms(phase, 'postgres'):.2f} ms, "
        f"{errors}"
    )
    return phase


def _cpu_ms(phase: PhaseResult, what: str) -> float:
    """CPU milliseconds per request of ``api``, ``postgres`` or ``load``."""
    return 1000 * phase.cpu_s.get(what, 0.0) / max(phase.requests, 1)


def _server_cpu_ms(phase: PhaseResult) -> float:
    return _cpu_ms(phase, "api") + _cpu_ms(phase, "postgres")


def print_report(options: ApiBenchOptions, phases: list[PhaseResult], console: Console) -> None:
    sizes = sorted({p.fleet_pumps for p in phases if p.fleet_pumps is not None})
    if not sizes:
        return
    by = {(p.route, p.fleet_pumps): p for p in phases}
    clinic = options.worklist_clinic_pumps
    header = (
        f"{options.clients} clients in a closed loop, {options.seconds:g} s per route after "
        f"{options.warmup_seconds:g} s of warm-up; clinic routes: a clinic of {clinic:,} pumps; "
        f"{history_label(options.sweep_days)} of readings every {options.interval_minutes:g} min"
        f" and {options.sweep_alert_days:g} days of resolved alerts before them"
    )
    table = Table(title=f"fleet-size sweep — {header}")
    for name in ("route", "fleet", "requests", "req/s", "p50 ms", "p99 ms", "max ms", "errors"):
        table.add_column(name, justify="left" if name == "route" else "right")
    for name in ("server mean ms", "CPU ms/req api·pg·load", "other CPU"):
        table.add_column(name, justify="right")
    for route in SWEEP_ROUTES:
        for size in sizes:
            p = by.get((route.name, size))
            if p is None:
                continue
            other = p.cpu_s.get("other", 0.0) / p.cpu_s["machine"] if p.cpu_s.get("machine") else 0
            table.add_row(
                route.name,
                f"{size:,}",
                f"{p.requests:,}",
                f"{p.rate:,.0f}",
                f"{p.percentile(50):,.1f}",
                f"{p.percentile(99):,.1f}",
                f"{p.latencies_ms[-1]:,.1f}" if p.latencies_ms else "-",
                f"[bold red]{p.errors:,}[/]" if p.errors else "0",
                "-" if p.server_mean_ms is None else f"{p.server_mean_ms:,.2f}",
                "·".join(f"{_cpu_ms(p, k):.2f}" for k in ("api", "postgres", "load")),
                f"{100 * other:.0f} %",
            )
        table.add_section()
    console.print(table)
    _print_flat(sizes, by, console)
    labels = [f"{r.name} = GET {r.path}{' (admin key)' if r.admin else ''}" for r in SWEEP_ROUTES]
    console.print(
        "routes: "
        + "; ".join(labels)
        + ". CPU ms/req: CPU time per request of the API process, this database's PostgreSQL "
        "backends and the load generator; other CPU: what the rest of the machine used, as a "
        f"share of all cores. flat: the largest fleet's API + PostgreSQL CPU per request within "
        f"{FLAT_WITHIN:g}x the smallest's (CPU per request is the figure a busy machine disturbs "
        f"least). Load average now {os.getloadavg()[0]:.2f}."
    )


def _print_flat(
    sizes: list[int], by: dict[tuple[str, int | None], PhaseResult], console: Console
) -> None:
    first, last = sizes[0], sizes[-1]
    ratio = f"{last:,} / {first:,}"
    table = Table(title=f"route by fleet size — ratio {ratio} (1.00: flat)")
    table.add_column("route")
    for size in sizes:
        table.add_column(f"{size:,}: req/s", justify="right")
        table.add_column(f"{size:,}: p50 · p99 ms", justify="right")
        table.add_column(f"{size:,}: CPU ms/req api·pg", justify="right")
    for name in ("req/s ratio", "p99 ratio", "CPU/req ratio", "verdict"):
        table.add_column(name, justify="right")
    for route in SWEEP_ROUTES:
        cells = [route.name]
        for size in sizes:
            p = by.get((route.name, size))
            if p is None:
                cells += ["-", "-", "-"]
                continue
            cells += [
                f"{p.rate:,.0f}",
                f"{p.percentile(50):,.1f} · {p.percentile(99):,.1f}",
                f"{_cpu_ms(p, 'api'):.2f}·{_cpu_ms(p, 'postgres'):.2f}",
            ]
        a, b = by.get((route.name, first)), by.get((route.name, last))
        if a is None or b is None or not a.rate or not _server_cpu_ms(a) or len(sizes) < 2:
            cells += ["-", "-", "-", "-"]
        else:
            cpu = _server_cpu_ms(b) / _server_cpu_ms(a)
            flat = cpu <= FLAT_WITHIN
            cells += [
                f"{b.rate / a.rate:.2f}",
                f"{b.percentile(99) / a.percentile(99):.2f}",
                f"{cpu:.2f}",
                "[green]flat[/]" if flat else f"[bold red]grows {cpu:.1f}x[/]",
            ]
        table.add_row(*cells)
    console.print(table)


__all__ = ["FLAT_WITHIN", "SWEEP_ROUTES", "SweepRoute", "print_report", "run", "spec_for"]
