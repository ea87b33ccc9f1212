"""The fleet ``pumpwatch bench api`` seeds: its pumps (one patient each, spread over the
clinics), and their readings and hourly rollups generated in time order as COPY text."""

from __future__ import annotations

import json
import math
import queue
import random
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

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
    first_clinic_pumps: int = 0
    """When > 0: the first clinic holds exactly the first this many pumps, the others are spread
    over the other clinics (the fleet-size sweep's measured clinic, the same pumps at every fleet
    size). 0: every clinic in turn."""

    def clinic_of(self, index: int) -> int:
        first = self.first_clinic_pumps
        if first <= 0:
            return index % self.clinics
        if index < first or self.clinics == 1:
            return 0
        return 1 + (index - first) % (self.clinics - 1)

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


def _fleet(spec: SeedSpec, rng: random.Random) -> tuple[World, list[_Pump]]:
    world = World(
        clinic_ids=[uuid.UUID(int=rng.getrandbits(128), version=4) for _ in range(spec.clinics)],
        patients=[[] for _ in range(spec.clinics)],
        serials=[[] for _ in range(spec.clinics)],
    )
    pumps = [_Pump(i, spec.clinic_of(i), rng, spec.start_epoch) for i in range(spec.pumps)]
    for pump in pumps:
        pump.offset_s = rng.randrange(spec.interval_s)
        pump.patient_id = uuid.UUID(int=rng.getrandbits(128), version=4)
        world.patients[pump.clinic].append(pump.patient_id)
        world.serials[pump.clinic].append(pump.serial)
    return world, pumps
