"""``pumpwatch bench alerts``: how well and how fast the alert engine catches what goes wrong.

Phase 1, detection: a simulated fleet (1,000 pumps, one simulated year by default) with faults
injected at known times (a share of the fleet per fault type) is replayed through the real
``pumpwatch ingest`` and ``pumpwatch alerts`` processes, on a broker and a scratch database of
the bench's own (``lab.bench.replay``: chunks of simulated time, a full sweep of the alert
service after each, the alert service on the data's clock). The alerts are judged against the
simulator's ground truth (``Fleet.truth``): per fault type and manifestation, how many were
injected and detected, the median and worst time from onset to the alert (simulated time) and
how many alerts came before the harm; then alerts per pump-year, the share of high priority,
and the alerts no injected condition explains — those of a healthy pump's normal life
(refill due, worst case, drug age, dose escalation) counted apart from false alerts.

Refill visits: the clinic books the visit the simulator plans next for every pump it refills
(``--book``, the default; ``--no-book``: nobody books, so refill due fires before every
refill).

Phase 2, latency: on a fresh database, the alert service on the wall clock and ingest with its
production settings, a fast stream (100,000 messages from 1,000 pumps at 15-minute readings,
a share of the pumps with a stalling motor, so some messages carry a stopping alarm) is
published as fast as the broker takes it — the ingest benchmark's load. The commit → alert
latency is the alert service's ``pumpwatch_alerts_latency_seconds`` histogram (every alert
opened or escalated by fresh data, from ingest's commit to the alert's): its p50 and p99,
interpolated within the buckets like PromQL's ``histogram_quantile``.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import statistics
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lab import embedded
from lab.bench.ingest import _drop_database, _fresh_database, _postgres
from lab.bench.replay import (
    Detection,
    Judgement,
    ReplayResult,
    alerts_process,
    ingest_process,
    judge,
    replay,
    stored,
)
from lab.bench.replay import Progress as ReplayProgress
from lab.sim.fleet import Fault, Fleet, Injected
from lab.sim.publisher import publish_all
from services.domain.alerting import Priority
from services.settings import parse_mqtt_url

DEFAULT_FAULT_SHARE = 0.02
"""Share of the fleet given each fault type (occlusion and motor stall among the pumps that can
have them)."""
_LATENCY_STALL_SHARE = 0.3
_LATENCY_INTERVAL = timedelta(minutes=15)
_LATENCY_BUCKETS = "pumpwatch_alerts_latency_seconds_bucket"


@dataclass(frozen=True)
class AlertBenchOptions:
    pumps: int = 1000
    days: float = 365.0
    seed: int = 7
    interval: timedelta = timedelta(hours=2)
    chunk: timedelta = timedelta(hours=12)
    fault_share: float = DEFAULT_FAULT_SHARE
    book: bool = True
    latency_messages: int = 100_000

    def fault_rates(self) -> dict[Fault, float]:
        return {fault: self.fault_share for fault in Fault}

    def alerts_env(self) -> dict[str, str]:
        """Settings that follow from the reading interval: a pump at its low alarm is silent
        after ``silent_min_hours`` (1 h, for hubs that report every 15 minutes); with readings
        further apart it must be at least two intervals, or every reading gap would be
        silence."""
        hours = self.interval / timedelta(hours=1)
        if hours <= 0.5:
            return {}
        return {"PUMPWATCH_RULES__SILENT_MIN_HOURS": f"{2 * hours:g}"}


@dataclass
class LatencyFigures:
    messages: int = 0
    ingest_rate: float = 0.0
    """Stored messages per second, first publish to last commit."""
    observed: int = 0
    """Alert changes the histogram counted."""
    p50_s: float | None = None
    p99_s: float | None = None
    over_1s: int = 0
    pumps_stalled: int = 0


@dataclass
class BenchReport:
    options: AlertBenchOptions
    result: ReplayResult
    truth: list[Injected]
    judgement: Judgement
    measured: dict[str, bool] = field(default_factory=dict)
    """Serial -> whether the pump reports a measured volume."""
    healthy: frozenset[str] = frozenset()
    """The pumps given no fault: what their alerts cost is the burden of normal life."""
    latency: LatencyFigures | None = None


def run(options: AlertBenchOptions, console: Console) -> BenchReport:
    with contextlib.ExitStack() as stack:
        scratch = Path(tempfile.mkdtemp(prefix="pumpwatch-bench-alerts-"))
        stack.callback(shutil.rmtree, scratch, ignore_errors=True)
        broker = embedded.start_mosquitto(scratch / "mosquitto")
        stack.callback(broker.stop)
        admin_url = _postgres(scratch, stack)

        report = _detection_phase(options, broker.url, admin_url, scratch, console)
        console.print(detection_table(report))
        console.print(overall_table(report))
        if options.latency_messages:
            report.latency = _latency_phase(options, broker.url, admin_url, scratch, console)
            console.print(latency_table(report.latency, options))
        return report


# -- phase 1: detection ---------------------------------------------------------------------------


def _detection_phase(
    options: AlertBenchOptions, broker_url: str, admin_url: str, scratch: Path, console: Console
) -> BenchReport:
    database_url = asyncio.run(_fresh_database(admin_url))
    try:
        # Whole days, midnight UTC: the replay ends before now (ingest refuses the future).
        start = (datetime.now(UTC) - timedelta(days=options.days + 1)).replace(
            hour=0, minute=0, second=0, microsecond=0
        )
        end = start + timedelta(days=options.days)
        fleet = Fleet(
            pumps=options.pumps,
            seed=options.seed,
            start=start,
            interval=options.interval,
            fault_rates=options.fault_rates(),
        )
        faults = ", ".join(f"{f} {n}" for f, n in fleet.fault_counts().items())
        book = set(fleet.planned_refills()) if options.book else set()
        console.print(
            f"phase 1: {options.pumps:,} pumps, {options.days:g} simulated days from "
            f"{start:%Y-%m-%d}, a reading every {_span(options.interval)}, chunks of "
            f"{_span(options.chunk)}; faults: {faults}; visits booked for {len(book):,} pumps"
        )
        with _progress(console) as show:
            result = asyncio.run(
                replay(
                    broker_url=broker_url,
                    database_url=database_url,
                    fleet=fleet,
                    until=end,
                    log_dir=scratch / "replay",
                    chunk=options.chunk,
                    book=book,
                    alerts_env=options.alerts_env(),
                    progress=show,
                    wait_s=600.0,
                )
            )
        started = time.monotonic()
        truth = fleet.truth(end)
        judgement = judge(truth, result.changes, end=end, slack=options.chunk)
        console.print(
            f"replayed {result.messages:,} messages ({result.invalid:,} malformed) in "
            f"{result.wall_s:,.0f} s; {result.evaluations:,} pump evaluations "
            f"({result.evaluation_errors} failed); ground truth and judging "
            f"{time.monotonic() - started:.1f} s"
        )
        measured = {p.serial: p.basis == "measured" for p in fleet.pumps}
        healthy = frozenset(p.serial for p in fleet.healthy())
        return BenchReport(options, result, truth, judgement, measured, healthy)
    finally:
        asyncio.run(_drop_database(admin_url, database_url))


@contextlib.contextmanager
def _progress(console: Console) -> Iterator[Callable[[ReplayProgress], None]]:
    columns = (
        TextColumn("replaying"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("replay", total=None, status="")

        def show(at: ReplayProgress) -> None:
            rate = at.messages / at.wall_s if at.wall_s > 0 else 0.0
            progress.update(
                task,
                total=at.chunks,
                completed=at.chunk,
                status=f"sim {at.sim_now:%Y-%m-%d %H:%M}, {at.messages:,} messages ({rate:,.0f}/s)",
            )

        yield show


def _label(record: Injected, measured: Mapping[str, bool]) -> str:
    words = {
        "stall": "stall spell",
        "occlusion": "occlusion spell",
        "refill": "refill discrepancy",
        "over_infusion": "measured delivery",
        "low_alarm": "reservoir at low alarm",
        "empty": "reservoir empty",
        "ran_dry": "ran dry unseen",
        "eri": "ERI",
        "eos": "EOS",
        "silence": "pump falls silent",
        "gap": "messages lost",
        "malformed": "malformed messages",
        "dropped_event": "event lost or malformed",
    }
    fault = str(record.fault)
    if record.fault is Fault.OVER_INFUSION:
        fault += " (measured)" if measured[record.serial] else " (calculated)"
    return f"{fault}: {words[record.signature]}"


def _span(delta: timedelta) -> str:
    seconds = delta.total_seconds()
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    if seconds >= 2 * 86400:
        return f"{sign}{seconds / 86400:.1f} d"
    if seconds >= 3600:
        return f"{sign}{seconds / 3600:.1f} h"
    return f"{sign}{seconds / 60:.0f} min"


@dataclass
class _Row:
    injected: int = 0
    detected: int = 0
    in_time: int = 0
    delays: list[timedelta] = field(default_factory=list)
    with_harm: int = 0
    before_harm: int = 0
    priority_ok: int = 0
    priority_known: int = 0
    undetectable: int = 0
    pending: int = 0


def _rows(report: BenchReport) -> dict[str, _Row]:
    measured = report.measured
    rows: dict[str, _Row] = defaultdict(_Row)
    for found in report.judgement.detections:
        row = rows[_label(found.record, measured)]
        _count(row, found)
    for record in report.judgement.pending:
        rows[_label(record, measured)].pending += 1
    for record in report.truth:
        if not record.detectable and record.signature not in ("gap", "malformed"):
            row = rows[_label(record, measured)]
            row.undetectable += 1
            if record.harm_at is not None:
                row.with_harm += 1
    return dict(sorted(rows.items()))


def _count(row: _Row, found: Detection) -> None:
    record = found.record
    row.injected += 1
    if found.detected and found.delay is not None:
        row.detected += 1
        row.delays.append(found.delay)
    if found.in_time:
        row.in_time += 1
    if record.harm_at is not None:
        row.with_harm += 1
        if found.before_harm:
            row.before_harm += 1
    if record.priority is not None:
        row.priority_known += 1
        if found.priority == record.priority:
            row.priority_ok += 1


def detection_table(report: BenchReport) -> Table:
    options = report.options
    table = Table(
        title=f"pumpwatch bench alerts — detection: {options.pumps:,} pumps, "
        f"{options.days:g} days, readings every {_span(options.interval)}, "
        f"chunks of {_span(options.chunk)}, seed {options.seed}",
        title_justify="left",
    )
    for name, justify in (
        ("fault: manifestation", "left"),
        ("injected", "right"),
        ("detected", "right"),
        ("in time", "right"),
        ("median onset → alert", "right"),
        ("worst", "right"),
        ("before harm", "right"),
        ("priority as expected", "right"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for label, row in _rows(report).items():
        if row.injected:
            ordered = sorted(row.delays)
            table.add_row(
                label,
                f"{row.injected:,}" + (f" (+{row.pending} pending)" if row.pending else ""),
                _share(row.detected, row.injected),
                _share(row.in_time, row.injected),
                _span(statistics.median_low(ordered)) if ordered else "-",
                _span(ordered[-1]) if ordered else "-",
                _share(row.before_harm, row.with_harm) if row.with_harm else "-",
                _share(row.priority_ok, row.priority_known) if row.priority_known else "-",
            )
        else:
            table.add_row(
                label,
                f"{row.undetectable:,}",
                "not detectable",
                "-",
                "-",
                "-",
                f"harm in {row.with_harm}" if row.with_harm else "-",
                "-",
            )
    return table


def _share(part: int, whole: int) -> str:
    return f"{part:,}/{whole:,}" if whole else "-"


def overall_table(report: BenchReport) -> Table:
    options = report.options
    openings = report.judgement.openings
    years = options.pumps * options.days / 365.0
    table = Table(title="alerts overall", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("alerts opened (incl. reopened)", f"{len(openings):,}")
    table.add_row("alerts per pump-year", f"{len(openings) / years:.2f}")
    high = sum(o.highest is Priority.HIGH for o in openings)
    table.add_row("high priority", _percent(high, len(openings)))
    by_verdict = Counter(o.verdict for o in openings)
    table.add_row("explained by an injected condition", f"{by_verdict['explained']:,}")
    life = Counter(o.change.rule.value for o in report.judgement.life_alerts())
    table.add_row(
        "healthy life (no injected cause)",
        f"{by_verdict['life']:,}  " + ", ".join(f"{r} {n:,}" for r, n in life.most_common()),
    )
    false = Counter(o.change.rule.value for o in report.judgement.false_alerts())
    table.add_row(
        "false (matched no condition)",
        f"{by_verdict['false']:,}  " + ", ".join(f"{r} {n:,}" for r, n in false.most_common()),
    )
    healthy = [o for o in openings if o.change.serial in report.healthy]
    healthy_years = len(report.healthy) * options.days / 365.0
    if healthy_years:
        by_rule = Counter(o.change.rule.value for o in healthy)
        table.add_row(
            f"healthy pumps ({len(report.healthy):,}): alerts per pump-year",
            f"{len(healthy) / healthy_years:.2f}  "
            + ", ".join(f"{r} {n / healthy_years:.2f}" for r, n in by_rule.most_common()),
        )
        table.add_row(
            "healthy pumps: high priority",
            _percent(sum(o.highest is Priority.HIGH for o in healthy), len(healthy)),
        )
    reopened = sum(o.change.action == "reopened" for o in openings)
    table.add_row("of which reopened an older alert", f"{reopened:,}")
    result = report.result
    table.add_row("messages replayed", f"{result.messages:,} (+{result.invalid:,} malformed)")
    table.add_row(
        "wall time",
        f"{result.wall_s:,.0f} s ({result.messages / max(result.wall_s, 1e-9):,.0f} msg/s)",
    )
    table.add_row(
        "pump evaluations (failed)", f"{result.evaluations:,} ({result.evaluation_errors})"
    )
    return table


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f} % ({part:,})" if whole else "-"


# -- phase 2: commit -> alert latency under load ---------------------------------------------------


def _latency_phase(
    options: AlertBenchOptions, broker_url: str, admin_url: str, scratch: Path, console: Console
) -> LatencyFigures:
    figures = LatencyFigures(messages=options.latency_messages)
    database_url = asyncio.run(_fresh_database(admin_url))
    ingest = ingest_process(database_url, broker_url, scratch / "latency-ingest.log")
    alerts = alerts_process(database_url, broker_url, scratch / "latency-alerts.log")
    try:
        pumps = 1000
        per_pump = -(-options.latency_messages // pumps)
        span = _LATENCY_INTERVAL * (per_pump + 2)
        fleet = Fleet(
            pumps=pumps,
            seed=options.seed,
            start=datetime.now(UTC) - span,
            interval=_LATENCY_INTERVAL,
            fault_rates={Fault.MOTOR_STALL: _LATENCY_STALL_SHARE},
        )
        stream = fleet.take(options.latency_messages)
        figures.pumps_stalled = len(
            {m.serial for m in stream if m.kind == "telemetry" and b'"motor_stall"' in m.payload}
        )
        console.print(
            f"phase 2: {len(stream):,} messages from {pumps:,} pumps (15-minute readings, "
            f"{figures.pumps_stalled} pumps reporting a motor stall), published as fast as "
            "the broker takes them; ingest and alerts with production settings, wall clock"
        )
        ingest.start()
        alerts.start()
        valid = sum(m.valid for m in stream)
        first = time.time()
        publish_all(parse_mqtt_url(broker_url), stream, client_id="bench-alerts-latency")
        deadline = time.monotonic() + 600
        while stored(ingest.metrics()) < valid:
            ingest.check()
            if time.monotonic() > deadline:
                raise RuntimeError("ingest did not store the stream within 10 minutes")
            time.sleep(0.1)
        last_commit = ingest.metrics().get("pumpwatch_ingest_last_commit_timestamp_seconds", 0.0)
        figures.ingest_rate = valid / max(last_commit - first, 1e-9)
        while alerts.metrics().get("pumpwatch_alerts_pending_pumps", 1.0) > 0:
            alerts.check()
            if time.monotonic() > deadline:
                raise RuntimeError("the alert service did not catch up within 10 minutes")
            time.sleep(0.1)
        buckets = _buckets(alerts.metrics())
        figures.observed = int(buckets[-1][1]) if buckets else 0
        figures.p50_s = histogram_quantile(0.5, buckets)
        figures.p99_s = histogram_quantile(0.99, buckets)
        at_1s = next((count for bound, count in buckets if bound == 1.0), 0.0)
        figures.over_1s = figures.observed - int(at_1s)
    finally:
        alerts.stop()
        ingest.stop()
        asyncio.run(_drop_database(admin_url, database_url))
    return figures


def _buckets(metrics: Mapping[str, float]) -> list[tuple[float, float]]:
    """(upper bound, cumulative count) of the latency histogram, +Inf last."""
    out = []
    for name, value in metrics.items():
        if name.startswith(_LATENCY_BUCKETS + "{"):
            bound = name.split('le="', 1)[1].split('"', 1)[0]
            out.append((float("inf") if bound == "+Inf" else float(bound), value))
    return sorted(out)


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """PromQL's ``histogram_quantile``: linear within the bucket holding the q-th observation
    (the lowest bucket from 0; one in +Inf reports the highest finite bound)."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    return lower_bound


def latency_table(figures: LatencyFigures, options: AlertBenchOptions) -> Table:
    table = Table(
        title="commit → alert latency under ingest load (wall clock)",
        show_header=False,
        title_justify="left",
    )
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("messages", f"{figures.messages:,}")
    table.add_row("ingest stored msg/s", f"{figures.ingest_rate:,.0f}")
    table.add_row("alert changes observed", f"{figures.observed:,}")
    table.add_row("p50", _seconds(figures.p50_s))
    table.add_row("p99", _seconds(figures.p99_s))
    table.add_row("over 1 s", f"{figures.over_1s:,}")
    return table


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"
