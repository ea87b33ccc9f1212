"""Seeding a scratch database with COPY: the fleet, its history, the events, state and alerts
that ingest and the alert engine would have left (see the package's doc)."""

from __future__ import annotations

import asyncio
import queue
import random
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import asyncpg
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from lab.bench.api.fleet import (
    _ZONES,
    Chunk,
    ChunkQueue,
    SeedSpec,
    World,
    _fleet,
    _Generator,
    _Pump,
)
from services.api import keys
from services.ingest.sql import READING_COLUMNS, STATE_COLUMNS

_ENGINE = "pumpwatch-alerts"
_REFILL_DUE_DAYS = 14.0
"""A resolved refill-due alert opened this long before each past refill."""

HOURLY_COLUMNS = (
    "serial",
    "hour",
    "readings",
    "volume_ml_sum",
    "volume_ml_min",
    "volume_ml_max",
    "last_at",
    "last_volume_ml",
    "flow_readings",
    "flow_ml_per_day_sum",
    "rate_ml_per_day_sum",
)
_EVENT_COLUMNS = ("msg_id", "serial", "type", "recorded_at", "received_at", "body", "payload")
# The owner is the pump's holder (migration 0008); the condition follows from the rule.
_ALERT_COLUMNS = (
    "id",
    "serial",
    "rule",
    "priority",
    "status",
    "title",
    "detail",
    "opened_at",
    "updated_at",
    "resolved_at",
    "resolved_by",
    "resolution",
    "condition_at",
)
_HISTORY_COLUMNS = (
    "alert_id",
    "at",
    "actor",
    "action",
    "from_status",
    "to_status",
    "from_priority",
    "to_priority",
    "reason",
)


@dataclass
class Seeded:
    history: str
    days: float
    readings: int
    hourly: int
    events: int
    alerts_open: int
    alerts_resolved: int
    seconds: float
    vacuum_seconds: float
    size_bytes: int


def history_label(days: float) -> str:
    if days == 365:
        return "1 year"
    if days == 30:
        return "1 month"
    return f"{days:g} day" if days == 1 else f"{days:g} days"


async def seed(
    url: str, spec: SeedSpec, progress: Callable[[str, int, int], None] | None = None
) -> tuple[World, Seeded]:
    """Fill a migrated database with ``spec``'s fleet and history (see the package's doc)."""
    started = time.perf_counter()
    rng = random.Random(spec.seed)
    world, pumps = _fleet(spec, rng)
    conn = await asyncpg.connect(url)
    try:
        await _copy_fleet(conn, spec, world, pumps, rng)
        month = spec.start.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        while month <= spec.now:
            await conn.execute("SELECT ensure_readings_partition($1)", month)
            month = (month + timedelta(days=32)).replace(day=1)
        generator = _Generator(spec, pumps)
        done = await _copy_history(conn, url, generator, progress)
        await conn.copy_records_to_table("events", records=generator.events, columns=_EVENT_COLUMNS)
        await conn.copy_records_to_table(
            "pump_state", records=[_state_row(p) for p in pumps], columns=STATE_COLUMNS
        )
        await conn.copy_records_to_table(
            "dose_history",
            records=[(p.serial, spec.start, p.dose, "reading") for p in pumps],
            columns=("serial", "at", "daily_dose_mcg", "source"),
        )
        alerts, history, open_count = _alerts(pumps, world, spec, rng)
        await conn.copy_records_to_table("alerts", records=alerts, columns=_ALERT_COLUMNS)
        await conn.copy_records_to_table("alert_history", records=history, columns=_HISTORY_COLUMNS)
        await conn.executemany(
            "UPDATE pumps SET refill_appointment_at = $2 WHERE serial = $1",
            _bookings(pumps, spec, rng),
        )
        seeded_s = time.perf_counter() - started
        if progress is not None:
            progress("vacuum", 0, 0)
        vacuum_started = time.perf_counter()
        await conn.execute("VACUUM (ANALYZE)")
        vacuum_s = time.perf_counter() - vacuum_started
        size = int(await conn.fetchval("SELECT pg_database_size(current_database())"))
    finally:
        await conn.close()
    return world, Seeded(
        history=history_label(spec.days),
        days=spec.days,
        readings=done["readings"],
        hourly=done["hourly"],
        events=len(generator.events),
        alerts_open=open_count,
        alerts_resolved=len(alerts) - open_count,
        seconds=seeded_s,
        vacuum_seconds=vacuum_s,
        size_bytes=size,
    )


async def _copy_fleet(
    conn: asyncpg.Connection, spec: SeedSpec, world: World, pumps: list[_Pump], rng: random.Random
) -> None:
    """Clinics, their patients, and a pump for each patient."""
    await conn.copy_records_to_table(
        "clinics",
        records=[
            (world.clinic_ids[i], f"Bench clinic {i + 1}", _ZONES[i % len(_ZONES)])
            for i in range(spec.clinics)
        ],
        columns=("id", "name", "timezone"),
    )
    await conn.copy_records_to_table(
        "patients",
        records=[
            (
                p.patient_id,
                world.clinic_ids[p.clinic],
                f"MRN-{p.index:06d}",
                f"Patient {p.index:04d}",
                date(1950, 1, 1) + timedelta(days=rng.randrange(20_000)),
                "high" if rng.random() < 0.1 else "standard",
                1.0 if rng.random() < 0.05 else None,
            )
            for p in pumps
        ],
        columns=(
            "id",
            "clinic_id",
            "mrn",
            "display_name",
            "birth_date",
            "withdrawal_risk",
            "low_alarm_margin_ml",
        ),
    )
    await conn.copy_records_to_table(
        "pumps",
        records=[
            (
                p.serial,
                p.model,
                spec.start,
                p.patient_id,
                (spec.start - timedelta(days=rng.randrange(30, 3000))).date(),
            )
            for p in pumps
        ],
        columns=("serial", "model", "first_seen_at", "patient_id", "implanted_on"),
    )


async def _copy_history(
    conn: asyncpg.Connection,
    url: str,
    generator: _Generator,
    progress: Callable[[str, int, int], None] | None,
) -> dict[str, int]:
    """Readings and hourly rollups, two COPY streams at once fed by the generator's thread."""
    done = {"readings": 0, "hourly": 0}
    expected = generator.spec.expected_readings

    async def chunks(source: ChunkQueue, name: str) -> AsyncIterator[bytes]:
        while True:
            item = await asyncio.to_thread(_take, source, generator.stop)
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            data, rows = item
            done[name] += rows
            if progress is not None:
                progress(name, done[name], expected)
            yield data

    copier = await asyncpg.connect(url)
    generator.thread.start()
    try:
        await asyncio.gather(
            conn.copy_to_table(
                "readings",
                source=chunks(generator.readings, "readings"),
                columns=READING_COLUMNS,
                format="text",
            ),
            copier.copy_to_table(
                "readings_hourly",
                source=chunks(generator.hourly, "hourly"),
                columns=HOURLY_COLUMNS,
                format="text",
            ),
        )
    finally:
        generator.stop.set()
        generator.thread.join()
        await copier.close()
    return done


def _take(source: ChunkQueue, stop: threading.Event) -> Chunk | BaseException | None:
    while True:
        try:
            return source.get(timeout=0.2)
        except queue.Empty:
            if stop.is_set():
                return None


def _state_row(pump: _Pump) -> tuple[object, ...]:
    msg_id, epoch, offset, volume, flow, battery, status, low = pump.state
    return (
        pump.serial,
        uuid.UUID(msg_id),
        datetime.fromtimestamp(epoch, UTC),
        offset,
        datetime.fromtimestamp(epoch + 1 + pump.index % 29, UTC),
        pump.model,
        volume,
        pump.capacity,
        pump.low_alarm,
        pump.basis,
        "baclofen",
        pump.concentration,
        pump.mode,
        pump.rate,
        pump.dose,
        pump.schedule_json if pump.schedule else None,
        flow,
        float(battery),
        status,
        ["low_reservoir"] if low else [],
        "2.4.1",  # the source firmware of every reading the fleet generates
    )


def _days_to_low(pump: _Pump) -> float:
    return (pump.volume - pump.low_alarm) / pump.rate


def _alerts(
    pumps: list[_Pump], world: World, spec: SeedSpec, rng: random.Random
) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]], int]:
    """A resolved refill-due alert before each past refill; open ones where the data says."""
    alerts: list[tuple[object, ...]] = []
    history: list[tuple[object, ...]] = []
    start = spec.start_epoch
    for pump in pumps:
        for epoch, _, _ in pump.refills:
            opened = epoch - int(_REFILL_DUE_DAYS * 86400)
            if opened < start:
                continue
            alert_id = uuid.UUID(int=rng.getrandbits(128), version=4)
            opened_at = datetime.fromtimestamp(opened, UTC)
            resolved_at = datetime.fromtimestamp(epoch, UTC)
            alerts.append(
                (
                    alert_id,
                    pump.serial,
                    "refill_due",
                    "low",
                    "resolved",
                    f"Refill due in {int(_REFILL_DUE_DAYS)} days",
                    "The reservoir reaches its low alarm soon and no visit is booked before it.",
                    opened_at,
                    resolved_at,
                    resolved_at,
                    "pumpwatch-alerts",
                    "the pump was refilled",
                    resolved_at,
                )
            )
            history.append((alert_id, opened_at, _ENGINE, "opened", None, "open", None, "low", ""))
            history.append(
                (
                    alert_id,
                    resolved_at,
                    "pumpwatch-alerts",
                    "resolved",
                    "open",
                    "resolved",
                    "low",
                    "low",
                    "the pump was refilled",
                )
            )
    now = spec.now
    open_count = 0
    for pump in pumps:
        found: list[tuple[str, str, str]] = []
        days = _days_to_low(pump)
        if days <= 0:
            found.append(("reservoir_low", "high", "Reservoir at its low alarm"))
        elif days <= _REFILL_DUE_DAYS:
            priority = "high" if days <= 2 else "medium" if days <= 7 else "low"
            found.append(("refill_due", priority, f"Refill due in {int(days)} days"))
        if pump.battery <= 8:
            found.append(("battery_eri", "medium", "Battery at its replacement indicator"))
        elif rng.random() < 0.02:
            found.append(("telemetry_gap", "low", "Telemetry gap"))
        for rule, priority, title in found:
            alert_id = uuid.UUID(int=rng.getrandbits(128), version=4)
            opened_at = now - timedelta(hours=rng.uniform(1, 96))
            alerts.append(
                (
                    alert_id,
                    pump.serial,
                    rule,
                    priority,
                    "open",
                    title,
                    f"{title}: seeded by pumpwatch bench api.",
                    opened_at,
                    opened_at,
                    None,
                    None,
                    None,
                    opened_at,
                )
            )
            history.append(
                (alert_id, opened_at, _ENGINE, "opened", None, "open", None, priority, "")
            )
            open_count += 1
    return alerts, history, open_count


def _bookings(pumps: list[_Pump], spec: SeedSpec, rng: random.Random) -> list[tuple[str, datetime]]:
    """Half of the pumps due within 30 days have their refill visit booked."""
    booked = []
    for pump in pumps:
        days = _days_to_low(pump)
        if 0 < days <= 30 and rng.random() < 0.5:
            booked.append((pump.serial, spec.now + timedelta(days=days * rng.uniform(0.5, 0.9))))
    return booked


def seed_with_progress(url: str, spec: SeedSpec, console: Console) -> tuple[World, Seeded]:
    """:func:`seed` with a progress bar per COPY stream, and a line of what was seeded."""
    label = history_label(spec.days)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        total = spec.expected_readings
        tasks = {
            "readings": progress.add_task(f"seeding {label}: readings", total=total, rate=""),
            "hourly": progress.add_task(f"seeding {label}: hourly rollups", total=total, rate=""),
        }
        started = time.perf_counter()

        def advance(name: str, done: int, _total: int) -> None:
            if name == "vacuum":
                progress.add_task("VACUUM (ANALYZE)", total=None, rate="")
                return
            elapsed = time.perf_counter() - started
            rate = f"{done / elapsed:,.0f} rows/s" if elapsed > 0 else ""
            progress.update(tasks[name], completed=done, rate=rate)

        world, seeded = asyncio.run(seed(url, spec, advance))
    rows = seeded.readings + seeded.hourly
    console.print(
        f"seeded {label}: {spec.pumps:,} pumps in {spec.clinics} clinics, "
        f"{seeded.readings:,} readings + {seeded.hourly:,} hourly rollups "
        f"({rows / seeded.seconds:,.0f} rows/s), {seeded.events:,} refills, "
        f"{seeded.alerts_open:,} open + {seeded.alerts_resolved:,} resolved alerts in "
        f"{seeded.seconds:.0f} s; VACUUM (ANALYZE) {seeded.vacuum_seconds:.0f} s; "
        f"database {seeded.size_bytes / 2**30:.2f} GiB"
    )
    return world, seeded


async def api_keys(url: str, world: World) -> tuple[list[str], str]:
    """A clinician key per clinic (in the world's order) and an admin key."""
    conn = await asyncpg.connect(url)
    try:
        clinician = []
        for clinic_id in world.clinic_ids:
            _, key = await keys.create(
                conn, role="clinician", clinic_id=clinic_id, label="bench", created_by="bench"
            )
            clinician.append(key)
        _, admin_key = await keys.create(
            conn, role="admin", clinic_id=None, label="bench", created_by="bench"
        )
    finally:
        await conn.close()
    return clinician, admin_key
