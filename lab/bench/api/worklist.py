"""The worklist part of ``pumpwatch bench api``: the refill worklist of a clinic of 400 pumps and
the administrator's over a fleet of 10,000, from the alert engine's read model
(``pump_forecasts``, services/storage/forecasts.py), beside a single patient read in the same
run; then the same worklists computed per request (every row stale: the path before the read
model, which the API still takes for pumps the engine has not evaluated).

The fleet is seeded as for the other routes (``seed``) with a short history (the worklist reads
no history), then the read model as the engine writes it: the same functions
(``forecasts.versions``, the snapshot loader, ``forecasts.of``, ``forecasts.write``) over every
pump in batches of 200, as its sweep does.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
from rich.console import Console
from rich.table import Table

from lab.bench.api.fleet import SeedSpec, World
from lab.bench.api.load import LoadSpec, _run_load
from lab.bench.api.report import GOAL_P99_MS, PhaseResult, phase_result
from lab.bench.api.seed import seed
from lab.processes import ServiceProcess, api_service
from services.domain.alerting import RuleSettings
from services.storage import forecasts
from services.storage.database import prepare_connection
from services.storage.snapshots import load

_BATCH = 200
"""Pumps per transaction, as the engine's PUMPWATCH_ALERTS_BATCH_MAX_PUMPS."""


@dataclass(frozen=True)
class WorklistBenchOptions:
    pumps: int = 10_000
    clinic_pumps: int = 400
    days: float = 2.0
    """History seeded (the worklist reads none: short, so seeding is quick)."""
    clients: int = 50
    paced_rate: float = 100.0
    seconds: float = 20.0
    warmup_seconds: float = 2.0
    old_clients: int = 5
    """Clients of the per-request (old) path; 0 skips it."""
    seed: int = 7


@dataclass(frozen=True)
class _Target:
    name: str
    template: str
    """The route's template in the API's /metrics."""


async def seed_read_model(url: str) -> tuple[int, float]:
    """Every pump's row, as the engine's sweep writes it; (pumps, seconds)."""
    started = time.perf_counter()
    conn = await asyncpg.connect(url)
    await prepare_connection(conn)
    try:
        serials = [r["serial"] for r in await conn.fetch("SELECT serial FROM pumps ORDER BY 1")]
        settings = RuleSettings()
        for i in range(0, len(serials), _BATCH):
            batch = serials[i : i + _BATCH]
            async with conn.transaction():
                now = datetime.now(UTC)
                seen = await forecasts.versions(conn, batch)
                loaded = await load(conn, batch, now=now, wall_now=now, settings=settings)
                found = [forecasts.of(snapshot) for snapshot, _ in loaded.values()]
                await forecasts.write(conn, found, seen, wall_now=now)
        await conn.execute("VACUUM (ANALYZE) pump_forecasts")
    finally:
        await conn.close()
    return len(serials), time.perf_counter() - started


async def _all_stale(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("UPDATE pump_forecasts SET version = version + 1")
        await conn.execute("VACUUM (ANALYZE) pump_forecasts")
    finally:
        await conn.close()


def run(
    options: WorklistBenchOptions,
    *,
    url: str,
    scratch: Path,
    keys: tuple[list[str], str],
    world: World,
    console: Console,
) -> list[PhaseResult]:
    """The phases on a seeded database ``url`` (``keys``: a clinician key per clinic, admin)."""
    clinician_keys, admin_key = keys
    clinic = _Target("worklist (clinic)", "/v1/refills/due")
    admin = _Target("worklist (all, admin)", "/v1/refills/due")
    patient = _Target("patient", "/v1/patients/{patient_id}")
    n = options.clients

    def clinic_clients(count: int) -> list[tuple[str, tuple[str, ...]]]:
        return [
            (clinician_keys[i % len(clinician_keys)], ("/v1/refills/due",)) for i in range(count)
        ]

    def admin_clients(count: int) -> list[tuple[str, tuple[str, ...]]]:
        return [(admin_key, ("/v1/refills/due",)) for _ in range(count)]

    def patient_clients(count: int) -> list[tuple[str, tuple[str, ...]]]:
        return [
            (
                clinician_keys[i % len(clinician_keys)],
                tuple(f"/v1/patients/{p}" for p in world.patients[i % len(world.patients)]),
            )
            for i in range(count)
        ]

    phases: list[PhaseResult] = []
    api = api_service(
        {"PUMPWATCH_DATABASE_URL": url, "PUMPWATCH_LOG_LEVEL": "warning"},
        scratch / "api-worklist.log",
    )
    with contextlib.ExitStack() as stack:
        stack.callback(api.stop)
        api.start()
        plan: list[tuple[_Target, str, list[tuple[str, tuple[str, ...]]], float | None]] = [
            (patient, "-", patient_clients(n), None),
            (clinic, "read model", clinic_clients(n), None),
            (clinic, "read model", clinic_clients(n), options.paced_rate),
            (admin, "read model", admin_clients(n), None),
            (admin, "read model", admin_clients(n), options.paced_rate),
        ]
        for target, how, clients, offered in plan:
            phases.append(_phase(api, url, target, how, clients, offered, options, console))
        if options.old_clients > 0:
            asyncio.run(_all_stale(url))
            for target, how, clients in (
                (clinic, "computed per request", clinic_clients(options.old_clients)),
                (admin, "computed per request", admin_clients(1)),
            ):
                phases.append(_phase(api, url, target, how, clients, None, options, console))
    return phases


def _phase(  # noqa: PLR0917 - one module's helper
    api: ServiceProcess,
    url: str,
    target: _Target,
    how: str,
    clients: list[tuple[str, tuple[str, ...]]],
    offered: float | None,
    options: WorklistBenchOptions,
    console: Console,
) -> PhaseResult:
    spec = LoadSpec(
        base_url=api.base_url,
        clients=tuple(clients),
        seconds=options.seconds,
        warmup_s=options.warmup_seconds,
        seed=options.seed,
        api_pid=api.pid,
        database_url=url,
        route_template=target.template,
        interval_s=0.0 if offered is None else len(clients) / offered,
    )
    found = _run_load(spec, lambda: None)
    phase = phase_result(
        found,
        route=target.name,
        history=how,
        history_days=options.days,
        clients=len(clients),
        offered=offered,
    )
    console.print(
        f"{target.name} · {how} · {len(clients)} clients · {phase.load}: "
        f"{phase.requests:,} requests, {phase.rate:,.1f}/s, p50 {phase.percentile(50):.1f} ms, "
        f"p99 {phase.percentile(99):.1f} ms, {phase.errors} errors"
    )
    return phase


def print_report(
    options: WorklistBenchOptions, phases: list[PhaseResult], console: Console
) -> None:
    clinics = max(1, options.pumps // options.clinic_pumps)
    table = Table(
        title=f"worklists — {options.pumps:,} pumps in {clinics} clinics of "
        f"{options.clinic_pumps:,}; {options.seconds:g} s per phase after "
        f"{options.warmup_seconds:g} s of warm-up; keep-alive",
    )
    for name in ("route", "read", "clients", "load", "requests", "req/s", "p50 ms", "p99 ms"):
        table.add_column(name, justify="left" if name in ("route", "read", "load") else "right")
    for name in ("max ms", "errors", "server mean ms", "CPU ms/req api·pg·load", "other CPU"):
        table.add_column(name, justify="right")
    for p in phases:
        count = max(p.requests, 1)
        cpu = "·".join(
            f"{1000 * p.cpu_s.get(k, 0.0) / count:.1f}" for k in ("api", "postgres", "load")
        )
        other = p.cpu_s.get("other", 0.0) / p.cpu_s["machine"] if p.cpu_s.get("machine") else 0.0
        table.add_row(
            p.route,
            p.history,
            str(p.clients),
            p.load,
            f"{p.requests:,}",
            f"{p.rate:,.1f}",
            f"{p.percentile(50):,.1f}",
            f"{p.percentile(99):,.1f}",
            f"{p.latencies_ms[-1]:,.1f}" if p.latencies_ms else "-",
            str(p.errors),
            "-" if p.server_mean_ms is None else f"{p.server_mean_ms:,.1f}",
            cpu,
            f"{100 * other:.0f} %",
        )
    console.print(table)
    single = next((p for p in phases if p.route == "patient"), None)
    for p in phases:
        if p.history != "read model":
            continue
        line = f"{p.route} from the read model, {p.clients} clients {p.load}: p99 "
        line += f"{p.percentile(99):,.1f} ms"
        if p.offered_rate is not None:
            met = p.percentile(99) < GOAL_P99_MS
            line += f" (goal < {GOAL_P99_MS:g} ms: {'met' if met else 'not met'})"
        elif single is not None and single.rate > 0:
            line += (
                f"; capacity {p.rate:,.1f}/s, {p.rate / single.rate:.2f}x a single patient "
                f"read's ({single.rate:,.1f}/s, goal at least 0.3x)"
            )
        console.print(line)


def spec_for(options: WorklistBenchOptions) -> SeedSpec:
    return SeedSpec(
        options.pumps,
        max(1, options.pumps // options.clinic_pumps),
        options.days,
        60.0,
        options.seed,
        datetime.now(UTC).replace(microsecond=0),
    )


__all__ = ["WorklistBenchOptions", "print_report", "run", "seed", "seed_read_model", "spec_for"]
