"""The report of ``pumpwatch bench api``: each phase's figures, the tables, the errors and the
verdict lines."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from lab.bench.api.load import ADMIN_WORKLIST, DASHBOARD, ROUTES, LoadResult
from lab.bench.api.seed import Seeded, history_label

if TYPE_CHECKING:
    from lab.bench.api import ApiBenchOptions

GOAL_P99_MS = 50.0
"""Issue 6: the dashboard's p99 at 50 concurrent clients on the 2-core machine."""


@dataclass
class PhaseResult:
    route: str
    history: str
    history_days: float
    clients: int
    requests: int
    elapsed_s: float
    latencies_ms: list[float]
    statuses: dict[int, int]
    failures: dict[str, int]
    error_sample: str | None
    server_mean_ms: float | None
    cpu_s: dict[str, float]
    """``api``, ``postgres`` (this database's backends), ``load`` (the generator), ``other``
    (everything else on the machine), and ``machine`` (all cores x the phase)."""
    offered_rate: float | None = None
    """Paced clients: the requests/s they offered in all. None: closed loop (no think time)."""
    fleet_pumps: int | None = None
    """The fleet-size sweep's phases: the fleet's size."""

    @property
    def load(self) -> str:
        return "closed loop" if self.offered_rate is None else f"paced {self.offered_rate:g}/s"

    @property
    def errors(self) -> int:
        return sum(n for s, n in self.statuses.items() if not 200 <= s < 300) + sum(
            self.failures.values()
        )

    @property
    def rate(self) -> float:
        return self.requests / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def percentile(self, p: float) -> float:
        return percentile(self.latencies_ms, p)


def phase_result(
    found: LoadResult,
    *,
    route: str,
    history: str,
    history_days: float,
    clients: int,
    offered: float | None,
    fleet_pumps: int | None = None,
) -> PhaseResult:
    """The figures of one phase from what the load process found."""
    return PhaseResult(
        route=route,
        history=history,
        history_days=history_days,
        clients=clients,
        requests=len(found.latencies_ms),
        elapsed_s=found.elapsed_s,
        latencies_ms=found.latencies_ms,
        statuses=found.statuses,
        failures=found.failures,
        error_sample=found.error_sample,
        server_mean_ms=1000 * found.server_sum_s / found.server_count
        if found.server_count
        else None,
        cpu_s=found.cpu_s,
        offered_rate=offered,
        fleet_pumps=fleet_pumps,
    )


@dataclass
class BenchReport:
    options: ApiBenchOptions
    seeded: list[Seeded] = field(default_factory=list)
    phases: list[PhaseResult] = field(default_factory=list)
    worklists: list[PhaseResult] = field(default_factory=list)
    """The worklist phases (lab/bench/api/worklist.py), on a fleet of their own."""
    sweep: list[PhaseResult] = field(default_factory=list)
    """The fleet-size sweep's phases (lab/bench/api/sweep.py), on fleets of their own."""

    @property
    def errors(self) -> int:
        return sum(p.errors for p in (*self.phases, *self.worklists, *self.sweep))

    def phase(
        self, route: str, history_days: float, clients: int, offered: float | None = None
    ) -> PhaseResult | None:
        for p in self.phases:
            if (p.route, p.history_days, p.clients, p.offered_rate) == (
                route,
                history_days,
                clients,
                offered,
            ):
                return p
        return None


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest rank of already sorted values; NaN when there are none."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def _ms(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:,.1f}"


def _print_report(report: BenchReport, console: Console) -> None:
    options = report.options
    table = Table(
        title=f"pumpwatch bench api — {options.pumps:,} pumps, {options.clinics} clinics, a "
        f"reading every {options.interval_minutes:g} min; {options.seconds:g} s per route after "
        f"{options.warmup_seconds:g} s of warm-up; keep-alive",
    )
    for name in ("route", "history", "clients", "load", "requests", "req/s", "p50 ms", "p99 ms"):
        table.add_column(name, justify="left" if name in ("route", "history", "load") else "right")
    for name in ("max ms", "errors", "server mean ms", "CPU ms/req api·pg·load", "other CPU"):
        table.add_column(name, justify="right")
    order = {r.name: i for i, r in enumerate((*ROUTES, ADMIN_WORKLIST))}
    phases = sorted(
        report.phases,
        key=lambda p: (order[p.route], p.clients, p.offered_rate or 0.0, p.history_days),
    )
    previous = None
    for p in phases:
        if previous is not None and (previous.route, previous.clients, previous.offered_rate) != (
            p.route,
            p.clients,
            p.offered_rate,
        ):
            table.add_section()
        previous = p
        n = max(p.requests, 1)
        cpu = "·".join(f"{1000 * p.cpu_s.get(k, 0.0) / n:.1f}" for k in ("api", "postgres", "load"))
        other = p.cpu_s.get("other", 0.0) / p.cpu_s["machine"] if p.cpu_s.get("machine") else 0.0
        table.add_row(
            p.route,
            p.history,
            str(p.clients),
            p.load,
            f"{p.requests:,}",
            f"{p.rate:,.0f}",
            _ms(p.percentile(50)),
            _ms(p.percentile(99)),
            _ms(p.latencies_ms[-1] if p.latencies_ms else None),
            f"[bold red]{p.errors:,}[/]" if p.errors else "0",
            _ms(p.server_mean_ms),
            cpu,
            f"{100 * other:.0f} %",
        )
    console.print(table)
    console.print(
        "route paths: "
        + "; ".join(f"{r.name} = {r.label}" for r in (*ROUTES, ADMIN_WORKLIST))
        + ". Latency at the client, request sent to body read. server mean: the API's own "
        "request histogram. CPU ms/req: CPU time per request of the API process, this "
        "database's PostgreSQL backends and the load generator; other CPU: what the rest of "
        "the machine used, as a share of all cores over the phase. Closed loop: each client sends "
        "its next request as soon as the previous answers (no think time), so at saturation "
        "latency ≈ clients ÷ throughput. Paced N/s: the clients offer N requests/s in all, each "
        "client a Poisson stream of its share (the way users load pages), and latency runs from "
        "when a request was due, so time spent waiting behind a slow answer counts."
    )
    _print_comparison(report, console)
    _print_errors(report, console)
    _print_verdict(report, console)


def _print_comparison(report: BenchReport, console: Console) -> None:
    histories = [s.days for s in report.seeded]
    if len(histories) < 2:
        return
    short, long = histories[0], histories[-1]
    table = Table(
        title=f"dashboard: {history_label(short)} vs {history_label(long)} of history "
        "(the route must not grow with history)"
    )
    table.add_column("clients", justify="right")
    for label in (history_label(short), history_label(long)):
        table.add_column(f"{label} p50 ms", justify="right")
        table.add_column(f"{label} p99 ms", justify="right")
        table.add_column(f"{label} server mean ms", justify="right")
    table.add_column("p50 ratio", justify="right")
    table.add_column("server mean ratio", justify="right")
    for clients in sorted({p.clients for p in report.phases if p.route == DASHBOARD.name}):
        a = report.phase(DASHBOARD.name, short, clients)
        b = report.phase(DASHBOARD.name, long, clients)
        if a is None or b is None:
            continue
        table.add_row(
            str(clients),
            _ms(a.percentile(50)),
            _ms(a.percentile(99)),
            _ms(a.server_mean_ms),
            _ms(b.percentile(50)),
            _ms(b.percentile(99)),
            _ms(b.server_mean_ms),
            f"{b.percentile(50) / a.percentile(50):.2f}",
            f"{b.server_mean_ms / a.server_mean_ms:.2f}"
            if a.server_mean_ms and b.server_mean_ms
            else "-",
        )
    console.print(table)


def _print_errors(report: BenchReport, console: Console) -> None:
    for p in report.phases:
        if p.errors:
            statuses = ", ".join(
                f"{code}: {n:,}" for code, n in sorted(p.statuses.items()) if not 200 <= code < 300
            )
            failures = ", ".join(f"{k}: {n:,}" for k, n in sorted(p.failures.items()))
            console.print(
                f"[bold red]ERRORS in {p.route} · {p.history} · {p.clients} clients: "
                f"{p.errors:,} of {p.requests + sum(p.failures.values()):,} "
                f"({'; '.join(x for x in (statuses, failures) if x)}). First: {p.error_sample}[/]"
            )


def _print_verdict(report: BenchReport, console: Console) -> None:
    options = report.options
    if report.errors:
        console.print(
            f"[bold red]VERDICT: INVALID — {report.errors:,} requests failed or answered "
            "non-2xx; the figures above are not a measurement of a working API.[/]"
        )
        return
    main = report.phase(DASHBOARD.name, options.days, options.clients)
    if main is None:
        return
    history = history_label(options.days)
    paced = [
        p
        for p in report.phases
        if p.route == DASHBOARD.name and p.history_days == options.days and p.offered_rate
    ]
    for p in sorted(paced, key=lambda p: p.offered_rate or 0.0):
        p99 = p.percentile(99)
        met = p99 < GOAL_P99_MS
        console.print(
            f"[{'green' if met else 'bold red'}]VERDICT: dashboard p99 {p99:,.1f} ms at "
            f"{p.clients} concurrent clients offering {p.offered_rate:g} dashboards/s "
            f"({p.rate:,.0f} served/s), {history} of history — goal p99 < {GOAL_P99_MS:g} ms: "
            f"{'MET' if met else 'NOT MET'}.[/]"
        )
    p99 = main.percentile(99)
    met = p99 < GOAL_P99_MS
    console.print(
        f"[{'green' if met else 'bold red'}]VERDICT: dashboard p99 {p99:,.1f} ms at "
        f"{options.clients} concurrent clients in a closed loop (no think time: the API's "
        f"capacity, {main.rate:,.0f} served/s), {history} of history — goal p99 < "
        f"{GOAL_P99_MS:g} ms: {'MET' if met else 'NOT MET'}.[/]"
    )
    if len(report.seeded) > 1:
        short = report.phase(DASHBOARD.name, report.seeded[0].days, options.clients)
        if short is not None and short.server_mean_ms and main.server_mean_ms:
            ratio = main.server_mean_ms / short.server_mean_ms
            grows = ratio > 1.25
            console.print(
                f"[{'bold red' if grows else 'green'}]History: the dashboard's server time with "
                f"{history_label(options.days)} is {ratio:.2f}x that with "
                f"{history_label(report.seeded[0].days)} "
                f"({'it GROWS with history' if grows else 'flat within 25 %'}).[/]"
            )
