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
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import os
import queue
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import asyncpg
import httpx
import psutil
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from lab.bench.ingest import _backend_cpu, _drop_database, _fresh_database, _postgres
from lab.embedded import free_port
from services.api import keys
from services.ingest.sql import READING_COLUMNS, STATE_COLUMNS

GOAL_P99_MS = 50.0
"""Issue 6: the dashboard's p99 at 50 concurrent clients on the 2-core machine."""

_ZONES = (
    "Europe/Berlin",
    "Europe/London",
    "America/New_York",
    "Europe/Paris",
    "America/Chicago",
    "Europe/Madrid",
    "Australia/Sydney",
    "Asia/Tokyo",
    "Europe/Rome",
    "America/Los_Angeles",
)
_MODELS = (("SynchroMed II 8637-40", 40.0), ("SynchroMed II 8637-20", 20.0), ("Prometra II", 20.0))
_CONCENTRATIONS = (500.0, 1000.0, 2000.0)
_DRUG_AGE_REFILL_S = 150 * 86400
"""Clinics refill at this drug age at the latest, however much is left."""
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
_ALERT_COLUMNS = (
    "id",
    "serial",
    "patient_id",
    "clinic_id",
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


# -- options and results --------------------------------------------------------------------------


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


@dataclass(frozen=True)
class Route:
    name: str
    key: str
    """Which key: ``clinician`` (a clinic of each client's own) or ``admin``."""
    label: str

    def paths(self, world: World, clinic: int) -> tuple[str, ...]:
        if self.key == "dashboard":
            return tuple(f"/v1/patients/{p}/dashboard" for p in world.patients[clinic])
        if self.key == "worklist":
            return ("/v1/refills/due",)
        if self.key == "telemetry":
            return tuple(f"/v1/pumps/{s}/telemetry?limit=100" for s in world.serials[clinic])
        if self.key == "hourly":
            since = (datetime.now(UTC) - timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
            return tuple(
                f"/v1/pumps/{s}/telemetry?bucket=1h&since={since}&limit=500"
                for s in world.serials[clinic]
            )
        raise ValueError(self.key)


DASHBOARD = Route("dashboard", "dashboard", "GET /v1/patients/{id}/dashboard")
ROUTES = (
    DASHBOARD,
    Route("worklist (clinic)", "worklist", "GET /v1/refills/due"),
    Route("telemetry", "telemetry", "GET /v1/pumps/{serial}/telemetry?limit=100"),
    Route(
        "telemetry 1h",
        "hourly",
        "GET /v1/pumps/{serial}/telemetry?bucket=1h&since=<30 d ago>&limit=500",
    ),
)
ADMIN_WORKLIST = Route("worklist (all, admin)", "worklist", "GET /v1/refills/due (admin key)")


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


@dataclass
class BenchReport:
    options: ApiBenchOptions
    seeded: list[Seeded] = field(default_factory=list)
    phases: list[PhaseResult] = field(default_factory=list)

    @property
    def errors(self) -> int:
        return sum(p.errors for p in self.phases)

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


def history_label(days: float) -> str:
    if days == 365:
        return "1 year"
    if days == 30:
        return "1 month"
    return f"{days:g} day" if days == 1 else f"{days:g} days"


# -- seeding --------------------------------------------------------------------------------------


@dataclass
class World:
    """What the seed made that the load needs: per clinic index, its id, patients and serials."""

    clinic_ids: list[uuid.UUID]
    patients: list[list[uuid.UUID]]
    serials: list[list[str]]


@dataclass(frozen=True)
class SeedSpec:
    pumps: int
    clinics: int
    days: float
    interval_minutes: float
    seed: int
    now: datetime

    @property
    def interval_s(self) -> int:
        return max(1, round(self.interval_minutes * 60))

    @property
    def start_epoch(self) -> int:
        end = int(self.now.timestamp())
        start = end - round(self.days * 86400)
        return start - start % self.interval_s

    @property
    def start(self) -> datetime:
        return datetime.fromtimestamp(self.start_epoch, UTC)

    @property
    def steps(self) -> int:
        return (int(self.now.timestamp()) - self.start_epoch) // self.interval_s + 1

    @property
    def expected_readings(self) -> int:
        return self.pumps * self.steps


class _Pump:
    """One simulated pump while its history is generated."""

    __slots__ = (
        "added",
        "basis",
        "battery",
        "battery_drain",
        "capacity",
        "clinic",
        "concentration",
        "dose",
        "flow_sensor",
        "hour_acc",
        "hub",
        "index",
        "last_refill",
        "low_alarm",
        "measured",
        "mode",
        "model",
        "offset_s",
        "patient_id",
        "rate",
        "refill_at_ml",
        "refills",
        "schedule",
        "schedule_json",
        "seq",
        "serial",
        "state",
        "volume",
    )

    def __init__(self, index: int, clinic: int, rng: random.Random, start: int) -> None:
        self.index = index
        self.clinic = clinic
        self.serial = f"BNCH{index:06d}"
        self.hub = f"HUB-{index:06d}"
        self.model, self.capacity = _MODELS[rng.choices((0, 1, 2), weights=(6, 2, 2))[0]]
        self.low_alarm = 2.0
        # Daily doses of intrathecal baclofen: ~50 to ~1,000 mcg/day, most 200-600; the clinic
        # picks the weakest concentration that keeps refills some 2 months apart or more.
        dose = min(max(rng.lognormvariate(math.log(350), 0.5), 40.0), 1200.0)
        self.concentration = next(
            (c for c in _CONCENTRATIONS if self.capacity * c / dose >= 70), _CONCENTRATIONS[-1]
        )
        self.rate = round(min(max(dose / self.concentration, 0.04), 1.5), 4)
        self.dose = round(self.rate * self.concentration, 2)
        self.mode = "flex" if rng.random() < 0.1 else "continuous"
        self.schedule: tuple[tuple[int, float], ...] = ()
        self.schedule_json = NULL
        if self.mode == "flex":  # more by day (07:00-22:00), less at night, same mean
            day = round(self.rate * 1.2, 4)
            night = round((24 * self.rate - 15 * day) / 9, 4)
            self.schedule = ((0, night), (7 * 60, day), (22 * 60, night))
            self.schedule_json = json.dumps(
                [
                    {"start": "07:00", "rate_ml_per_day": day},
                    {"start": "22:00", "rate_ml_per_day": night},
                ]
            )
        self.measured = rng.random() < 0.1
        self.basis = "measured" if self.measured else "calculated"
        self.flow_sensor = rng.random() < 0.15
        self.offset_s = 0
        self.patient_id = uuid.UUID(int=0)
        self.battery = rng.uniform(45.0, 98.0)
        self.battery_drain = rng.uniform(0.01, 0.04)  # percent a day
        self.seq = rng.randrange(1, 50_000)
        self.refill_at_ml = self._next_refill_ml(rng)
        self.volume = rng.uniform(self.refill_at_ml, self.capacity)
        self.added = self.capacity
        days_since = (self.capacity - self.volume) / self.rate
        self.last_refill = start - int(days_since * 86400)
        self.refills: list[tuple[int, float, float]] = []
        self.hour_acc: list[float] | None = None
        self.state: tuple[str, int, int, float, float | None, int, str, bool] = (
            "",
            0,
            0,
            0.0,
            None,
            0,
            "ok",
            False,
        )
        """The newest reading: msg_id, epoch, UTC offset, volume, flow, battery, status, low."""

    def _next_refill_ml(self, rng: random.Random) -> float:
        """Clinics book the refill some 5-25 days before the low alarm."""
        return self.low_alarm + self.rate * rng.uniform(5.0, 25.0)

    def rate_at(self, local_minute: int) -> float:
        if not self.schedule:
            return self.rate
        found = self.schedule[0][1]
        for start, rate in self.schedule:
            if local_minute >= start:
                found = rate
        return found


class _Stamps:
    """RFC 3339 text for epoch seconds, fast: the minute's prefix is cached."""

    def __init__(self) -> None:
        self._minutes: dict[int, str] = {}

    def text(self, epoch: int) -> str:
        minute, second = divmod(epoch, 60)
        prefix = self._minutes.get(minute)
        if prefix is None:
            if len(self._minutes) > 50_000:
                self._minutes.clear()
            prefix = datetime.fromtimestamp(minute * 60, UTC).strftime("%Y-%m-%dT%H:%M")
            self._minutes[minute] = prefix
        return f"{prefix}:{second:02d}"


def _offset_text(minutes: int) -> str:
    sign = "+" if minutes >= 0 else "-"
    hours, mins = divmod(abs(minutes), 60)
    return f"{sign}{hours:02d}:{mins:02d}"


def _zone_offset(zone: ZoneInfo, epoch: int) -> int:
    found = datetime.fromtimestamp(epoch, zone).utcoffset()
    return 0 if found is None else int(found.total_seconds() // 60)


Chunk = tuple[bytes, int]
ChunkQueue = queue.Queue[Chunk | BaseException | None]
NULL = "\\N"
LOW_JSON = '"low_reservoir"'
"""NULL in COPY's text format."""


class _Generator:
    """Generates the readings and their hourly rollups in time order (all pumps interleaved, as
    ingest stores them), as COPY text chunks into two bounded queues, in a thread of its own so
    that PostgreSQL parses one chunk while the next is made."""

    def __init__(self, spec: SeedSpec, pumps: list[_Pump]) -> None:
        self.spec = spec
        self.pumps = pumps
        self.zones = [ZoneInfo(_ZONES[i % len(_ZONES)]) for i in range(spec.clinics)]
        self.readings: ChunkQueue = queue.Queue(maxsize=8)
        self.hourly: ChunkQueue = queue.Queue(maxsize=8)
        self.stop = threading.Event()
        self.rows_readings = 0
        self.rows_hourly = 0
        self.events: list[tuple[object, ...]] = []
        self._rng = random.Random(spec.seed * 7919 + 1)
        self._stamps = _Stamps()
        self.thread = threading.Thread(target=self._run, name="bench-seed", daemon=True)

    def _put(self, target: ChunkQueue, item: object) -> None:
        while not self.stop.is_set():
            try:
                target.put(item, timeout=0.2)  # type: ignore[arg-type]
                return
            except queue.Full:
                continue

    def _run(self) -> None:
        try:
            self._generate()
        except BaseException as exc:
            self._put(self.readings, exc)
            self._put(self.hourly, exc)
            return
        self._put(self.readings, None)
        self._put(self.hourly, None)

    def _generate(self) -> None:  # noqa: PLR0912, PLR0915 - one hot loop, kept flat
        spec = self.spec
        interval = spec.interval_s
        now_epoch = int(spec.now.timestamp())
        dt_days = interval / 86400
        stamps = self._stamps.text
        gauss = self._rng.gauss
        lines: list[str] = []
        hourly: list[str] = []
        parts = {id(p): _row_parts(p) for p in self.pumps}
        n_lines = n_hourly = 0
        for step in range(spec.steps):
            base = spec.start_epoch + step * interval
            offsets = [_zone_offset(z, base) for z in self.zones]
            ends = [_zone_offset(z, base + interval) for z in self.zones]
            texts = [_offset_text(o) for o in offsets]
            step_id = f"-{step >> 12:04x}-4{step & 0xFFF:03x}-8000-"
            for pump in self.pumps:
                epoch = base + pump.offset_s
                if epoch > now_epoch:
                    continue
                offset = offsets[pump.clinic]
                offset_text = texts[pump.clinic]
                if ends[pump.clinic] != offset:  # a DST change inside this step
                    offset = _zone_offset(self.zones[pump.clinic], epoch)
                    offset_text = _offset_text(offset)
                local = epoch + offset * 60
                local_minute = (local % 86400) // 60
                rate_now = pump.rate_at(local_minute) if pump.schedule else pump.rate
                # Delivery since the previous reading, then a refill if one is due (clinic hours).
                pump.volume = max(0.0, pump.volume - rate_now * dt_days)
                if (
                    pump.volume <= pump.refill_at_ml
                    or epoch - pump.last_refill >= _DRUG_AGE_REFILL_S
                ) and 540 <= local_minute < 960:
                    self._refill(pump, epoch - 600, offset)
                pump.seq += 1
                seq = pump.seq
                pump.battery = max(0.0, pump.battery - pump.battery_drain * dt_days)
                msg_id = f"{pump.index:08x}{step_id}{seq:012x}"
                volume = pump.volume
                if pump.measured:
                    volume = max(0.0, volume + gauss(0.0, 0.03))
                volume = round(volume, 3)
                battery = round(pump.battery)
                status = "ok" if battery > 8 else "eri"
                low = volume <= pump.low_alarm
                p = parts[id(pump)]
                if pump.flow_sensor:
                    flow: float | None = round(rate_now * (1.0 + gauss(0.0, 0.02)), 4)
                    flow_text = str(flow)
                    flow_json = f', "flow": {{"measured_ml_per_day": {flow}}}'
                else:
                    flow = None
                    flow_text = NULL
                    flow_json = ""
                lines.append(
                    f"{msg_id}{p[0]}{stamps(epoch)}+00\t{offset}\t"
                    f"{stamps(epoch + p[5])}+00\t{seq}{p[1]}{volume}{p[2]}{flow_text}\t"
                    f"{battery}\t{status}\t{'{low_reservoir}' if low else '{}'}\t"
                    f'{{"v": 1, "msg_id": "{msg_id}{p[3]}{seq}, "recorded_at": '
                    f'"{stamps(local)}{offset_text}{p[4]}{volume}{p[6]}{flow_json}, '
                    f'"battery": {{"remaining_pct": {battery}, "status": "{status}"}}, '
                    f'"alarms": [{LOW_JSON if low else ""}]}}\n'
                )
                pump.state = (msg_id, epoch, offset, volume, flow, battery, status, low)
                # The hour's rollup, as STORE_READINGS adds each reading to it.
                hour = epoch - epoch % 3600
                acc = pump.hour_acc
                if acc is not None and acc[0] != hour:
                    hourly.append(_hourly_line(pump.serial, acc, stamps))
                    acc = None
                if acc is None:
                    acc = pump.hour_acc = [hour, 1, volume, volume, volume, epoch, volume, 0, 0, 0]
                else:
                    acc[1] += 1
                    acc[2] += volume
                    acc[3] = min(acc[3], volume)
                    acc[4] = max(acc[4], volume)
                    acc[5] = epoch
                    acc[6] = volume
                if flow is not None:
                    acc[7] += 1
                    acc[8] += flow
                acc[9] += pump.rate
            if len(lines) >= 2000 or step == spec.steps - 1:
                n_lines += len(lines)
                self._put(self.readings, ("".join(lines).encode(), len(lines)))
                lines = []
            if len(hourly) >= 2000 or step == spec.steps - 1:
                n_hourly += len(hourly)
                self._put(self.hourly, ("".join(hourly).encode(), len(hourly)))
                hourly = []
            if self.stop.is_set():
                return
        tail = [_hourly_line(p.serial, p.hour_acc, stamps) for p in self.pumps if p.hour_acc]
        if tail:
            n_hourly += len(tail)
            self._put(self.hourly, ("".join(tail).encode(), len(tail)))
        self.rows_readings = n_lines
        self.rows_hourly = n_hourly

    def _refill(self, pump: _Pump, epoch: int, offset: int) -> None:
        rng = self._rng
        residual = round(max(0.0, pump.volume + rng.gauss(0.0, 0.25)), 2)
        added = pump.capacity
        body = {
            "residual_ml": residual,
            "added_ml": added,
            "drug": "baclofen",
            "concentration_mcg_per_ml": pump.concentration,
        }
        msg_id = uuid.UUID(int=rng.getrandbits(128), version=4)
        local = datetime.fromtimestamp(epoch, UTC) + timedelta(minutes=offset)
        payload = {
            "v": 1,
            "msg_id": str(msg_id),
            "serial": pump.serial,
            "recorded_at": local.replace(tzinfo=None).isoformat() + _offset_text(offset),
            "source": {"kind": "clinician_programmer", "id": f"CP-{pump.clinic:03d}"},
            "type": "refill",
            "refill": body,
        }
        at = datetime.fromtimestamp(epoch, UTC)
        self.events.append(
            (
                msg_id,
                pump.serial,
                "refill",
                at,
                at + timedelta(seconds=5),
                json.dumps(body),
                json.dumps(payload),
            )
        )
        pump.refills.append((epoch, residual, added))
        pump.volume = added
        pump.last_refill = epoch
        pump.refill_at_ml = pump._next_refill_ml(rng)


def _row_parts(pump: _Pump) -> tuple[str, str, str, str, str, int, str]:
    """The constant stretches of a pump's COPY line and payload, between the values."""
    schedule = f', "schedule": {pump.schedule_json}' if pump.schedule else ""
    return (
        f"\t{pump.serial}\t",
        f"\thome_hub\t{pump.hub}\t{pump.model}\t",
        f"\t{pump.capacity}\t{pump.low_alarm}\t{pump.basis}\tbaclofen\t{pump.concentration}"
        f"\t{pump.mode}\t{pump.rate}\t{pump.dose}\t{pump.schedule_json}\t",
        f'", "serial": "{pump.serial}", "seq": ',
        f'", "source": {{"kind": "home_hub", "id": "{pump.hub}", "firmware": "2.4.1"}}, '
        f'"model": "{pump.model}", "reservoir": {{"volume_ml": ',
        1 + pump.index % 29,  # seconds from recording to reception
        f', "capacity_ml": {pump.capacity}, "low_alarm_ml": {pump.low_alarm}, '
        f'"basis": "{pump.basis}"}}, "drug": {{"name": "baclofen", '
        f'"concentration_mcg_per_ml": {pump.concentration}}}, "infusion": {{"mode": '
        f'"{pump.mode}", "rate_ml_per_day": {pump.rate}, "daily_dose_mcg": {pump.dose}'
        f"{schedule}}}",
    )


def _hourly_line(serial: str, acc: list[float], stamps: Callable[[int], str]) -> str:
    hour, count, vsum, vmin, vmax, last_at, last_volume, flow_n, flow_sum, rate_sum = acc
    return (
        f"{serial}\t{stamps(int(hour))}+00\t{int(count)}\t{vsum}\t{vmin}\t{vmax}\t"
        f"{stamps(int(last_at))}+00\t{last_volume}\t{int(flow_n)}\t{flow_sum}\t{rate_sum}\n"
    )


async def seed(
    url: str, spec: SeedSpec, progress: Callable[[str, int, int], None] | None = None
) -> tuple[World, Seeded]:
    """Fill a migrated database with ``spec``'s fleet and history (see the module's doc)."""
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


def _fleet(spec: SeedSpec, rng: random.Random) -> tuple[World, list[_Pump]]:
    world = World(
        clinic_ids=[uuid.UUID(int=rng.getrandbits(128), version=4) for _ in range(spec.clinics)],
        patients=[[] for _ in range(spec.clinics)],
        serials=[[] for _ in range(spec.clinics)],
    )
    pumps = [_Pump(i, i % spec.clinics, rng, spec.start_epoch) for i in range(spec.pumps)]
    for pump in pumps:
        pump.offset_s = rng.randrange(spec.interval_s)
        pump.patient_id = uuid.UUID(int=rng.getrandbits(128), version=4)
        world.patients[pump.clinic].append(pump.patient_id)
        world.serials[pump.clinic].append(pump.serial)
    return world, pumps


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
        patient_id = pump.patient_id
        clinic_id = world.clinic_ids[pump.clinic]
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
                    patient_id,
                    clinic_id,
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
        patient_id = pump.patient_id
        clinic_id = world.clinic_ids[pump.clinic]
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
                    patient_id,
                    clinic_id,
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


# -- the API process ------------------------------------------------------------------------------


@dataclass
class ApiProcess:
    database_url: str
    log_path: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> None:
        env = dict(os.environ)
        env.update(
            PUMPWATCH_DATABASE_URL=self.database_url,
            PUMPWATCH_LOG_FORMAT="json",
            PUMPWATCH_LOG_LEVEL="warning",
        )
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "services",
                    "api",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                ],
                env=env,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the API exited: {self.log()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"the API was not ready after {timeout_s:.0f} s: {self.log()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""


# -- the load (runs in a process of its own) ------------------------------------------------------


@dataclass(frozen=True)
class LoadSpec:
    base_url: str
    clients: tuple[tuple[str, tuple[str, ...]], ...]
    """Per client: its key and the paths it picks from at random."""
    seconds: float
    warmup_s: float
    seed: int
    api_pid: int
    database_url: str
    route_template: str
    """The route's template in the API's /metrics (server-side latency)."""
    interval_s: float = 0.0
    """Paced: the mean time between a client's requests (exponential, so all clients together
    are a Poisson stream), latency counted from when a request was due, so a late answer
    delays the next request without hiding its wait. 0: closed loop (no think time)."""


@dataclass
class LoadResult:
    latencies_ms: list[float]
    statuses: dict[int, int]
    failures: dict[str, int]
    error_sample: str | None
    elapsed_s: float
    server_sum_s: float
    server_count: float
    cpu_s: dict[str, float]


def drive(spec: LoadSpec) -> LoadResult:
    return asyncio.run(_drive(spec))


def load_main() -> None:
    """The load process: a :class:`LoadSpec` as JSON on stdin, its :class:`LoadResult` as JSON
    on stdout."""
    raw = json.load(sys.stdin)
    raw["clients"] = tuple((key, tuple(paths)) for key, paths in raw["clients"])
    found = drive(LoadSpec(**raw))
    json.dump(dataclasses.asdict(found), sys.stdout)


def _run_load(spec: LoadSpec, tick: Callable[[], None]) -> LoadResult:
    """:func:`load_main` in a process of its own (the load generator must not share the
    measuring process, or the API's event loop); ``tick`` is called while it runs."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from lab.bench.api import load_main; load_main()"],
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=err,
        )
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(dataclasses.asdict(spec)).encode())
        proc.stdin.close()
        while proc.poll() is None:
            tick()
            time.sleep(0.2)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            detail = err.read().decode(errors="replace")[-3000:]
            raise RuntimeError(f"the load generator exited with {proc.returncode}: {detail}")
        raw = json.loads(out.read())
    raw["statuses"] = {int(k): v for k, v in raw["statuses"].items()}
    return LoadResult(**raw)


async def _drive(spec: LoadSpec) -> LoadResult:
    clients = [
        httpx.AsyncClient(
            base_url=spec.base_url,
            headers={"Authorization": f"Bearer {key}"},
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
            timeout=httpx.Timeout(60.0),
        )
        for key, _ in spec.clients
    ]
    result = LoadResult([], {}, {}, None, 0.0, 0.0, 0.0, {})
    try:
        if spec.warmup_s > 0:
            await _round(spec, clients, spec.warmup_s, None)
        async with httpx.AsyncClient(base_url=spec.base_url, timeout=30.0) as plain:
            before = _route_seconds(await plain.get("/metrics"), spec.route_template)
            cpu_before = _cpu_now(spec)
            started = time.perf_counter()
            ended = await _round(spec, clients, spec.seconds, result)
            # Paced: the schedule's window (answers due late in it may end after it).
            result.elapsed_s = max(ended - started, spec.seconds if spec.interval_s else 0.0)
            cpu_after = _cpu_now(spec)
            after = _route_seconds(await plain.get("/metrics"), spec.route_template)
        result.server_sum_s = after[0] - before[0]
        result.server_count = after[1] - before[1]
        result.cpu_s = {k: cpu_after[k] - cpu_before[k] for k in cpu_before}
        busy = result.cpu_s.pop("busy")
        ours = sum(result.cpu_s.values())
        result.cpu_s["other"] = max(0.0, busy - ours)
        result.cpu_s["machine"] = result.elapsed_s * (psutil.cpu_count() or 1)
    finally:
        for client in clients:
            await client.aclose()
    result.latencies_ms.sort()
    return result


async def _round(
    spec: LoadSpec, clients: list[httpx.AsyncClient], seconds: float, into: LoadResult | None
) -> float:
    """Every client requests until ``seconds`` have passed; returns when the last answered."""
    deadline = time.perf_counter() + seconds
    ends: list[float] = []

    async def one(index: int, client: httpx.AsyncClient, paths: tuple[str, ...]) -> None:
        rng = random.Random(spec.seed * 1000 + index)
        # A Poisson stream: exponential gaps from the start too.
        due = time.perf_counter() + (rng.expovariate(1 / spec.interval_s) if spec.interval_s else 0)
        while True:
            if spec.interval_s > 0:
                if due >= deadline:
                    break
                wait = due - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
                sent = due
                due += rng.expovariate(1 / spec.interval_s)
            else:
                if time.perf_counter() >= deadline:
                    break
                sent = time.perf_counter()
            path = rng.choice(paths)
            try:
                response = await client.get(path)
            except httpx.HTTPError as exc:
                if into is not None:
                    name = type(exc).__name__
                    into.failures[name] = into.failures.get(name, 0) + 1
                    into.error_sample = into.error_sample or f"{name}: {exc} ({path})"
                continue
            answered = time.perf_counter()
            if into is None:
                continue
            into.latencies_ms.append((answered - sent) * 1000)
            code = response.status_code
            into.statuses[code] = into.statuses.get(code, 0) + 1
            if not 200 <= code < 300 and into.error_sample is None:
                into.error_sample = f"{code} {path}: {response.text[:300]}"
        ends.append(time.perf_counter())

    await asyncio.gather(
        *(one(i, c, spec.clients[i][1]) for i, c in enumerate(clients)),
    )
    return max(ends)


_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:]+)\{(?P<labels>.*)\} (?P<value>\S+)$")


def _route_seconds(response: httpx.Response, template: str) -> tuple[float, float]:
    """(sum, count) of the API's request-latency histogram for ``template``, GET."""
    total = count = 0.0
    for line in response.text.splitlines():
        match = _SAMPLE.match(line)
        if match is None:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"]))
        if labels.get("route") != template or labels.get("method") != "GET":
            continue
        if match["name"] == "pumpwatch_api_request_seconds_sum":
            total += float(match["value"])
        elif match["name"] == "pumpwatch_api_request_seconds_count":
            count += float(match["value"])
    return total, count


def _cpu_now(spec: LoadSpec) -> dict[str, float]:
    own = resource.getrusage(resource.RUSAGE_SELF)
    api = psutil.Process(spec.api_pid).cpu_times()
    machine = psutil.cpu_times()
    idle = machine.idle + getattr(machine, "iowait", 0.0)
    guests = getattr(machine, "guest", 0.0) + getattr(machine, "guest_nice", 0.0)
    busy = sum(machine) - idle - guests
    return {
        "api": api.user + api.system,
        "postgres": _backend_cpu(spec.database_url),
        "load": own.ru_utime + own.ru_stime,
        "busy": busy,
    }


# -- the run --------------------------------------------------------------------------------------


def run(options: ApiBenchOptions, console: Console, admin_url: str | None = None) -> BenchReport:
    report = BenchReport(options)
    load_before = os.getloadavg()[0]
    console.print(
        f"machine: {psutil.cpu_count()} cores, load average {load_before:.2f} at start; the load "
        "generator (one process), the API (one uvicorn process) and PostgreSQL share them"
    )
    histories = [d for d in (options.compare_days, options.days) if d > 0]
    with contextlib.ExitStack() as stack:
        scratch = Path(tempfile.mkdtemp(prefix="pumpwatch-bench-api-"))
        stack.callback(shutil.rmtree, scratch, ignore_errors=True)
        admin = admin_url or _postgres(scratch, stack)
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
                world, seeded = _seed_with_progress(url, spec, console)
                report.seeded.append(seeded)
                clinician_keys, admin_key = asyncio.run(_keys(url, world))
                api = ApiProcess(url, scratch / f"api-{days:g}.log")
                per_history.callback(api.stop)
                api.start()
                assert api.proc is not None
                for route, clients, offered in _plan(options, main=days == options.days):
                    phase = _phase(
                        api, url, route, clients, offered, options, world, clinician_keys,
                        admin_key, seeded, console,
                    )  # fmt: skip
                    report.phases.append(phase)
                api.stop()
    _print_report(report, console)
    return report


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


def _seed_with_progress(url: str, spec: SeedSpec, console: Console) -> tuple[World, Seeded]:
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


async def _keys(url: str, world: World) -> tuple[list[str], str]:
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


_TEMPLATES = {
    "dashboard": "/v1/patients/{patient_id}/dashboard",
    "worklist": "/v1/refills/due",
    "telemetry": "/v1/pumps/{serial}/telemetry",
    "hourly": "/v1/pumps/{serial}/telemetry",
}


def _phase(  # noqa: PLR0917 - one call site
    api: ApiProcess,
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
    assert api.proc is not None
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
        api_pid=api.proc.pid,
        database_url=url,
        route_template=_TEMPLATES[route.key],
        interval_s=0.0 if offered is None else clients / offered,
    )
    total = options.warmup_seconds + seconds
    load = "closed loop" if offered is None else f"paced {offered:g}/s"
    description = f"{route.name} · {seeded.history} · {clients} clients · {load}"
    columns = (TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(description, total=total)
        started = time.perf_counter()
        found = _run_load(
            spec,
            lambda: progress.update(task, completed=min(total, time.perf_counter() - started)),
        )
    if api.proc.poll() is not None:
        raise RuntimeError(f"the API exited during {description}: {api.log()}")
    phase = PhaseResult(
        route=route.name,
        history=seeded.history,
        history_days=seeded.days,
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
    )
    errors = f"[bold red]{phase.errors:,} ERRORS[/]" if phase.errors else "0 errors"
    console.print(
        f"{description}: {phase.requests:,} requests, {phase.rate:,.0f}/s, "
        f"p50 {phase.percentile(50):.1f} ms, p99 {phase.percentile(99):.1f} ms, {errors}"
    )
    return phase


# -- the report -----------------------------------------------------------------------------------


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
