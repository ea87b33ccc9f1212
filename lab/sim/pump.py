"""One simulated pump over time: its reservoir, battery, faults, and the messages it sends.

Time is integer Unix seconds throughout; nothing here reads the wall clock. The pump keeps two
volumes: ``true_ml``, the drug really in the reservoir, and ``calculated_ml``, what the pump
believes (volume at the last refill minus programmed delivery). A calculated-basis pump reports
the second, a pump with a sensor the first; the difference is what refills reveal.
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Literal

import msgspec

from lab.sim.faults import Fault
from lab.sim.malform import malform
from lab.sim.outgoing import Kind, Lost, Outgoing
from lab.sim.profiles import PumpProfile
from lab.sim.program import DAY_S, Program

# Clinic behaviour: our own choices, within the clinical figures (refills every 1-6 months).
_REFILL_LEAD_DAYS = (3.0, 10.0)
"""Clinics refill this many days before the projected low-reservoir alarm (at least three:
more than a healthy pump's 1 % inaccuracy can bring it forward)."""
_LEAD_SHARE = 0.15
_DRUG_MAX_DAYS = (170.0, 178.0)
"""Drug must be replaced at least every 180 days: the latest refill lands in this range."""
_MIN_REFILL_DAYS = 7.0
_WORST_CASE_FACTOR = 1.145
_WORST_CASE_MARGIN_DAYS = 1.0
"""Clinics book the visit at least this long before the worst-case empty date pumpwatch shows
(the reservoir at 1.145 x the programmed rate since the last refill)."""
_CLINIC_HOURS = (9 * 3600, 16 * 3600)
"""Visits (refills, boluses, prescription changes) happen in local clinic hours."""
_BOLUS_MEAN_DAYS = 45.0
_BOLUS_MCG = (25, 100)
_CHANGE_MEAN_DAYS = 90.0
_CHANGE_MIN_DAYS = 14.0
_DOSE_STEPS = (0.85, 0.9, 0.95, 1.05, 1.1, 1.15)
"""Titration: a prescription change moves the dose by 5-15 %, up or down ..."""
_DOSE_DRIFT = (0.75, 1.35)
"""... staying within this factor of the initial dose (a maintenance patient, not escalating)."""
_TITRATION_MEAN_DAYS, _TITRATION_MIN_DAYS = 21.0, 10.0
_TITRATION_STEPS = (0.9, 1.1, 1.1, 1.1, 1.15, 1.15, 1.2, 1.2)
_TITRATION_DRIFT = (0.75, 3.0)
"""A titrating patient (tolerance): the dose is raised every few weeks, mostly by 10-20 %."""

# Measurement and device accuracy.
_ACCURACY = (0.99, 1.01)
"""A healthy pump delivers within 1 % of its programme (labelled limit 14.5 %)."""
_RESIDUAL_NOISE_ML = 0.04
"""Standard deviation of the residual the clinician measures in the syringe."""
_FLOW_NOISE = 0.02
"""Relative standard deviation of a flow sensor's reading."""
_FLOW_ZERO_NOISE = 0.001
"""Its absolute noise, mL/day: a blocked catheter reads near 0, not exactly 0."""

# Battery: SynchroMed II lasts up to 7 years; ERI gives up to 90 days before EOS.
_BATTERY_DAYS = 7 * 365
_ERI_PCT = 10.0
_EOS_PCT = 2.0
_ERI_TO_EOS_DAYS = 90.0

# Faults.
_OVER_INFUSION = (1.17, 1.24)
_STALL_FIRST_DAYS, _STALL_DAYS, _STALL_GAP_DAYS = (0.5, 3.0), (0.5, 3.0), (2.0, 10.0)
_OCCLUSION_FIRST_DAYS, _OCCLUSION_DAYS, _OCCLUSION_GAP_DAYS = (1.0, 6.0), (2.0, 10.0), (5.0, 20.0)
_BATTERY_ERI_DAYS, _BATTERY_EOS_DAYS = (2.0, 15.0), (3.0, 20.0)
_SILENCE_DAYS = (1.0, 10.0)
_MALFORMED_SHARE = 0.1
_GAP_BURST_CHANCE = 0.02
_GAP_BURST_LENGTH = (1, 5)

_encode = msgspec.json.encode
_NEVER = 2**62


def uuid4_text(bits: int) -> str:
    """``str(uuid.UUID(int=bits, version=4))``, several times faster."""
    bits = (bits & ~(0xF000 << 64) | (0x4000 << 64)) & ~(0xC000 << 48) | (0x8000 << 48)
    h = f"{bits:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


Crossing = Literal["reported_low", "reported_empty", "true_empty"]
"""A level the reservoir fell to: the volume the pump reports (measured, or calculated) at its
low alarm, the same at 0, and the drug really in it at 0."""


@dataclass(frozen=True, slots=True)
class RefillMark:
    """What one refill found, as the simulation knew it (ground truth for the refill rules)."""

    at: int
    expected_residual_ml: float
    """What the refill message says the pump expected (its calculated volume, rounded)."""
    residual_ml: float
    """What the clinician withdrew (the true volume plus measurement noise, rounded)."""
    should_have_delivered_ml: float | None
    """What should have been delivered since the refill before, reckoned as the refill-
    discrepancy rule does: the programme in force at this refill over the whole period, plus the
    boluses given. None for the first refill of the simulation (no refill before it in the
    data)."""


class _Episodes:
    """Recurring spells (stalls, occlusions) as [start, end) intervals, drawn as time advances."""

    __slots__ = ("_duration", "_gap", "_rng", "end", "spells", "start")

    def __init__(
        self,
        rng: random.Random,
        t0: int,
        first: tuple[float, float],
        duration: tuple[float, float],
        gap: tuple[float, float],
    ) -> None:
        self._rng = rng
        self._duration = duration
        self._gap = gap
        self.start = t0 + _days(rng, first)
        self.end = self.start + _days(rng, duration)
        self.spells: list[tuple[int, int]] = [(self.start, self.end)]
        """Every spell drawn so far, [start, end), in order (the last may lie ahead)."""

    def pieces(self, a: int, b: int) -> list[tuple[int, int]]:
        """The parts of [a, b) inside a spell; spells that end by ``b`` are left behind."""
        out: list[tuple[int, int]] = []
        while self.start < b:
            lo, hi = max(a, self.start), min(b, self.end)
            if lo < hi:
                out.append((lo, hi))
            if self.end > b:
                break
            self.start = self.end + _days(self._rng, self._gap)
            self.end = self.start + _days(self._rng, self._duration)
            self.spells.append((self.start, self.end))
        return out

    def active(self, t: int) -> bool:
        return self.start <= t < self.end


class PumpSim:
    """The state machine of one pump. ``step()`` performs its next action (a reading or a visit)
    at ``next_at`` and returns the message it sent, or None if that message was lost."""

    def __init__(
        self,
        profile: PumpProfile,
        *,
        seed: int,
        t0: int,
        interval_s: int,
        phase_s: int,
        topic_prefix: str,
        lost: list[Lost],
        titrating: bool = False,
        first_refill_in_s: int | None = None,
    ) -> None:
        self.profile = profile
        self._titrating = titrating
        self._first_refill_in_s = first_refill_in_s
        faults = profile.faults
        rng = random.Random(f"pumpwatch-sim:{seed}:{profile.serial}:run")
        self._rng = rng
        self._lost = lost
        self._interval_s = interval_s
        self._offset_s = profile.utc_offset_minutes * 60
        self._tz = UTC if not self._offset_s else timezone(timedelta(seconds=self._offset_s))
        base = f"{topic_prefix}/pumps" if topic_prefix else "pumps"
        self._topics: dict[Kind, str] = {
            "telemetry": f"{base}/{profile.serial}/telemetry",
            "events": f"{base}/{profile.serial}/events",
        }
        # Shared by every message of this pump (encoded, never mutated).
        self._hub = {"kind": "home_hub", "id": profile.hub_id, "firmware": profile.hub_firmware}
        self._programmer = {
            "kind": "clinician_programmer",
            "id": profile.programmer_id,
            "firmware": profile.programmer_firmware,
        }
        self._drug = {
            "name": profile.drug,
            "concentration_mcg_per_ml": profile.concentration_mcg_per_ml,
        }
        self._hub_seq = 0
        self._programmer_seq = 0
        self._measured = profile.basis == "measured"
        self._malformed = Fault.MALFORMED in faults
        self._gap = Fault.GAP in faults
        self._burst = 0
        self.program: Program = profile.program

        # Delivery accuracy; an over-infusing pump has been so since before the simulation began.
        self._factor = rng.uniform(*_ACCURACY)
        if Fault.OVER_INFUSION in faults:
            self._factor *= rng.uniform(*_OVER_INFUSION)
        self._episodes: _Episodes | None = None
        if Fault.MOTOR_STALL in faults:
            self._episodes = _Episodes(rng, t0, _STALL_FIRST_DAYS, _STALL_DAYS, _STALL_GAP_DAYS)
        elif Fault.OCCLUSION in faults:
            self._episodes = _Episodes(
                rng, t0, _OCCLUSION_FIRST_DAYS, _OCCLUSION_DAYS, _OCCLUSION_GAP_DAYS
            )
        self._stall_alarms = Fault.MOTOR_STALL in faults
        self._spell_seen = False

        self._init_truth()
        self._init_battery(t0)
        self._init_schedule(t0)
        self.phase_s = phase_s
        self.next_reading = t0 + phase_s
        self.t = t0
        self._last_reading: int | None = None
        self._delivered_since_reading = 0.0
        self.finished = False
        self.next_at = min(self.next_reading, self.next_refill, self.next_bolus, self.next_change)

    def _init_truth(self) -> None:
        """Ground-truth bookkeeping, read by ``lab.sim.truth`` (the simulation itself never
        depends on it)."""
        self.refill_marks: list[RefillMark] = []
        self.crossings: list[tuple[Crossing, int]] = []
        """Levels the reservoir fell to since the simulation began, with when (interpolated
        within the step that crossed them); each at most once between two refills."""
        self._crossed: set[Crossing] = set()
        self._last_refill_at: int | None = None
        self._boluses_since_refill_ml = 0.0
        self.last_reading_sent: int | None = None
        """When the last telemetry message that the contract accepts was sent..."""
        self.last_reading_volume_ml = 0.0
        """...and the volume it reported."""
        self.first_malformed_at: int | None = None
        self.dropped_events: list[tuple[int, str, Literal["lost", "malformed"]]] = []
        """Events (bolus, refill, ...) that never reached the database: (when, type, how)."""

    # -- read-only views for the ground truth ------------------------------------------------

    @property
    def measured(self) -> bool:
        """Whether the pump reports its measured volume (else the calculated one)."""
        return self._measured

    @property
    def interval_s(self) -> int:
        return self._interval_s

    @property
    def t0(self) -> int:
        return self._t0

    @property
    def spells(self) -> list[tuple[int, int]]:
        """Motor stall or occlusion spells drawn so far, [start, end); empty without either."""
        return [] if self._episodes is None else list(self._episodes.spells)

    @property
    def eri_at(self) -> int:
        """When the battery reaches its elective replacement indicator."""
        return self._eri_at

    @property
    def eos_at(self) -> int:
        """When the battery reaches end of service (the pump stops)."""
        return self._eos_at

    @property
    def delivery_factor(self) -> float:
        """Actual delivery / programmed (accuracy, and over-infusion)."""
        return self._factor

    @property
    def planned_refill_at(self) -> int | None:
        """The clinic's next planned refill visit; None if it never refills (missed refill)
        or the pump has fallen silent."""
        if self.next_refill >= _NEVER or self.finished or self.next_refill >= self.silent_at:
            return None
        return self.next_refill

    def probe(self) -> PumpSim:
        """An independent copy to run ahead (what would happen), leaving this one untouched;
        messages it loses go to a list of its own."""
        return copy.deepcopy(self, {id(self._lost): []})

    @property
    def lost_messages(self) -> list[Lost]:
        """Messages the gap fault lost (the fleet's shared list; a probe's own)."""
        return self._lost

    def catch_up(self, t: int) -> None:
        """Deliver up to ``t`` without sending anything (a probe's last partial step)."""
        if t > self.t:
            self._advance(t)

    def reported_ml(self) -> float:
        """The volume the pump reports now: measured, or calculated."""
        return self.true_ml if self._measured else self.calculated_ml

    def _init_battery(self, t0: int) -> None:
        """Battery: a straight line to ERI, then to EOS (when the pump stops), then to 0."""
        rng = self._rng
        pct0 = rng.uniform(35.0, 98.0)
        if Fault.BATTERY in self.profile.faults:
            self._eri_at = t0 + _days(rng, _BATTERY_ERI_DAYS)
            self._eos_at = self._eri_at + _days(rng, _BATTERY_EOS_DAYS)
        else:
            drain_per_day = 100.0 / _BATTERY_DAYS * rng.uniform(0.8, 1.2)
            self._eri_at = t0 + int((pct0 - _ERI_PCT) / drain_per_day * DAY_S)
            self._eos_at = self._eri_at + int(_ERI_TO_EOS_DAYS * DAY_S)
        self._t0, self._pct0 = t0, pct0

    def _init_schedule(self, t0: int) -> None:
        """The reservoir at ``t0`` and the first visits of the clinic."""
        rng = self._rng
        profile = self.profile
        faults = profile.faults
        self.silent_at = t0 + _days(rng, _SILENCE_DAYS) if Fault.SILENCE in faults else _NEVER

        # The reservoir at t0: part-way through the cycle since the last refill. A pump whose
        # refill will be missed starts late in its cycle so that it runs low within weeks.
        cycle_days = self._plan_days(float(profile.capacity_ml))
        share = rng.uniform(0.5, 0.95) if Fault.MISSED_REFILL in faults else rng.random()
        since_days = share * cycle_days
        if self._first_refill_in_s is not None:
            # The clinic's first visit comes this long after the start (a refill on record).
            since_days = max(0.0, cycle_days - self._first_refill_in_s / DAY_S)
        programmed = profile.rate_ml_per_day * since_days
        self.calculated_ml = max(0.0, profile.capacity_ml - programmed)
        self.true_ml = max(0.0, profile.capacity_ml - programmed * self._factor)
        self._refills = Fault.MISSED_REFILL not in faults
        self.next_refill = (
            self._clinic_time(t0 + int((cycle_days - since_days) * DAY_S), not_before=t0)
            if self._refills
            else _NEVER
        )
        self.next_bolus = self._clinic_time(
            t0 + int(rng.expovariate(1.0 / _BOLUS_MEAN_DAYS) * DAY_S), not_before=t0
        )
        self.next_change = self._clinic_time(
            t0 + int(rng.expovariate(1.0 / self._change_mean_days) * DAY_S), not_before=t0
        )

    @property
    def _change_mean_days(self) -> float:
        return _TITRATION_MEAN_DAYS if self._titrating else _CHANGE_MEAN_DAYS

    # -- the step --------------------------------------------------------------------------

    def step(self) -> Outgoing | None:
        """Do what is due at ``next_at``; afterwards ``next_at`` (or ``finished``) is updated."""
        t = self.next_at
        if t >= self.silent_at:
            self.finished = True
            return None
        self._advance(t)
        if t == self.next_refill:
            message = self._refill(t)
        elif t == self.next_change:
            message = self._prescription_change(t)
        elif t == self.next_bolus:
            message = self._bolus(t)
        else:
            message = self._reading(t)
            self.next_reading = t + self._interval_s
        self.next_at = min(self.next_reading, self.next_refill, self.next_bolus, self.next_change)
        return message

    # -- physics ---------------------------------------------------------------------------

    def _advance(self, t: int) -> None:
        """Deliver drug from ``self.t`` to ``t``: programmed (what the pump counts) and actual."""
        a, b = self.t, min(t, self._eos_at)  # at end of service the pump stops
        if b > a:
            reported, true = self.reported_ml(), self.true_ml
            off = self._offset_s
            program = self.program
            programmed = program.delivered_ml(a + off, b + off)
            self.calculated_ml = max(0.0, self.calculated_ml - programmed)
            running = programmed
            if self._episodes is not None:
                for lo, hi in self._episodes.pieces(a, b):
                    self._spell_seen = True
                    running -= program.delivered_ml(lo + off, hi + off)
            actual = min(self.true_ml, running * self._factor)
            self.true_ml -= actual
            self._delivered_since_reading += actual
            self._note_crossings(a, b, reported, true)
        self.t = max(self.t, t)

    def _note_crossings(self, a: int, b: int, reported: float, true: float) -> None:
        """Record the levels the reservoir fell to between ``a`` and ``b``, given its volumes at
        ``a`` (linear within the step: one reading interval at most)."""
        now_reported, now_true = self.reported_ml(), self.true_ml
        low = self.profile.low_alarm_ml
        if now_reported > low + 1e-9 and now_true > 1e-9:
            return  # the common case: nothing crossed
        levels: tuple[tuple[Crossing, float, float, float], ...] = (
            ("reported_low", low, reported, now_reported),
            ("reported_empty", 0.0, reported, now_reported),
            ("true_empty", 0.0, true, now_true),
        )
        for name, level, before, after in levels:
            if name in self._crossed or after > level + 1e-9:
                continue
            self._crossed.add(name)
            if before <= level + 1e-9 or before <= after:
                at = a  # already there when the step began (the simulation's first step)
            else:
                at = a + math.ceil((before - level) / (before - after) * (b - a))
            self.crossings.append((name, min(max(at, a), b)))

    def _delivering(self, t: int) -> bool:
        stopped = self._episodes is not None and self._episodes.active(t)
        return not stopped and t < self._eos_at and self.true_ml > 0

    def _battery(self, t: int) -> tuple[float, str]:
        if t < self._eri_at:
            pct = self._pct0 + (_ERI_PCT - self._pct0) * (t - self._t0) / (self._eri_at - self._t0)
            return pct, "ok"
        if t < self._eos_at:
            pct = _ERI_PCT + (_EOS_PCT - _ERI_PCT) * (t - self._eri_at) / (
                self._eos_at - self._eri_at
            )
            return pct, "eri"
        return max(0.0, _EOS_PCT - (t - self._eos_at) / (5 * DAY_S) * _EOS_PCT), "eos"

    # -- messages --------------------------------------------------------------------------

    def _reading(self, t: int) -> Outgoing | None:
        profile = self.profile
        volume = round(self.true_ml if self._measured else self.calculated_ml, 2)
        alarms: list[str] = []
        if volume <= 0.0:
            volume = 0.0
            alarms.append("empty_reservoir")
        elif volume <= profile.low_alarm_ml:
            alarms.append("low_reservoir")
        if self._stall_alarms and self._episodes is not None:
            if self._episodes.active(t):
                alarms.append("motor_stall")
            elif self._spell_seen:
                alarms.append("motor_stall_recovered")
        self._spell_seen = False
        pct, status = self._battery(t)
        if status != "ok":
            alarms.append(status)
        doc: dict[str, Any] = {
            "model": profile.model,
            "reservoir": {
                "volume_ml": volume,
                "capacity_ml": profile.capacity_ml,
                "low_alarm_ml": profile.low_alarm_ml,
                "basis": profile.basis,
            },
            "drug": self._drug,
            "infusion": self.program.body,
        }
        if profile.has_flow_sensor and self._last_reading is not None and t > self._last_reading:
            days = (t - self._last_reading) / DAY_S
            rng = self._rng
            flow = self._delivered_since_reading / days * rng.gauss(1.0, _FLOW_NOISE)
            flow += rng.gauss(0.0, _FLOW_ZERO_NOISE)
            doc["flow"] = {"measured_ml_per_day": round(max(0.0, flow), 4)}
        doc["battery"] = {"remaining_pct": round(pct, 1), "status": status}
        doc["alarms"] = alarms
        self._last_reading = t
        self._delivered_since_reading = 0.0
        message = self._send(t, "telemetry", doc)
        if message is not None and message.valid:
            self.last_reading_sent, self.last_reading_volume_ml = t, volume
        return message

    def _refill(self, t: int) -> Outgoing | None:
        rng = self._rng
        profile = self.profile
        residual = max(0.0, round(self.true_ml + rng.gauss(0.0, _RESIDUAL_NOISE_ML), 2))
        expected = round(self.calculated_ml, 2)
        added = float(profile.capacity_ml)
        should: float | None = None
        if self._last_refill_at is not None:
            off = self._offset_s
            should = self.program.delivered_ml(self._last_refill_at + off, t + off)
            should += self._boluses_since_refill_ml
        self.refill_marks.append(RefillMark(t, expected, residual, should))
        self._last_refill_at, self._boluses_since_refill_ml = t, 0.0
        self._crossed.clear()
        self.true_ml = self.calculated_ml = added
        self.next_refill = self._clinic_time(
            t + int(self._plan_days(added) * DAY_S), not_before=t + DAY_S
        )
        doc: dict[str, Any] = {
            "type": "refill",
            "refill": {
                "residual_ml": residual,
                "added_ml": added,
                "drug": profile.drug,
                "concentration_mcg_per_ml": profile.concentration_mcg_per_ml,
                "expected_residual_ml": expected,
            },
        }
        return self._send(t, "events", doc)

    def _prescription_change(self, t: int) -> Outgoing | None:
        rng = self._rng
        initial = self.profile.daily_dose_mcg
        drift, steps, least = (
            (_TITRATION_DRIFT, _TITRATION_STEPS, _TITRATION_MIN_DAYS)
            if self._titrating
            else (_DOSE_DRIFT, _DOSE_STEPS, _CHANGE_MIN_DAYS)
        )
        lo, hi = initial * drift[0], initial * drift[1]
        dose = self.program.daily_dose_mcg * rng.choice(steps)
        dose = float(round(min(hi, max(lo, dose)) / 5) * 5)
        self.program = self.program.with_dose(dose)
        self.next_change = self._clinic_time(
            t + int(rng.expovariate(1.0 / self._change_mean_days) * DAY_S),
            not_before=t + int(least * DAY_S),
        )
        if self._refills:
            # The clinician sees the new projection and brings the booked refill forward if needed.
            days = self._plan_days(self.calculated_ml, fresh=False)
            sooner = self._clinic_time(t + int(days * DAY_S), not_before=t + DAY_S)
            self.next_refill = min(self.next_refill, sooner)
        return self._send(
            t, "events", {"type": "prescription_change", "infusion": self.program.body}
        )

    def _bolus(self, t: int) -> Outgoing | None:
        rng = self._rng
        self.next_bolus = self._clinic_time(
            t + int(rng.expovariate(1.0 / _BOLUS_MEAN_DAYS) * DAY_S), not_before=t + DAY_S
        )
        if t >= self._eos_at:
            return None  # a pump at end of service cannot deliver a bolus: no visit, no message
        dose = rng.randint(*_BOLUS_MCG) // 5 * 5
        volume = dose / self.program.concentration_mcg_per_ml
        reported, true = self.reported_ml(), self.true_ml
        self.calculated_ml = max(0.0, self.calculated_ml - volume)
        self._boluses_since_refill_ml += volume
        if self._delivering(t):
            delivered = min(self.true_ml, volume * self._factor)
            self.true_ml -= delivered
            self._delivered_since_reading += delivered
        self._note_crossings(t, t, reported, true)
        return self._send(
            t, "events", {"type": "bolus", "bolus": {"dose_mcg": dose, "kind": "clinician"}}
        )

    def _send(self, t: int, kind: Kind, body: dict[str, Any]) -> Outgoing | None:
        """Number, stamp and encode a message; lose or break it as the pump's faults say."""
        hub = kind == "telemetry"
        source = self._hub if hub else self._programmer
        if hub:
            seq = self._hub_seq
            self._hub_seq += 1
        else:
            seq = self._programmer_seq
            self._programmer_seq += 1
        rng = self._rng
        at = datetime.fromtimestamp(t, self._tz)
        if self._gap and self._losing():
            self._lost.append(Lost(self.profile.serial, source["id"], seq, kind, at))
            if not hub:
                self.dropped_events.append((t, str(body["type"]), "lost"))
            return None
        msg_id = uuid4_text(rng.getrandbits(128))
        doc: dict[str, Any] = {
            "v": 1,
            "msg_id": msg_id,
            "serial": self.profile.serial,
            "seq": seq,
            "recorded_at": at.isoformat(),
            "source": source,
        }
        doc.update(body)
        if self._malformed and rng.random() < _MALFORMED_SHARE:
            # A private deep copy: the shared parts (source, drug, infusion) must stay intact.
            private = msgspec.json.decode(_encode(doc))
            payload, reason, parsed_id = malform(private, kind, rng, at)
            if self.first_malformed_at is None:
                self.first_malformed_at = t
            if not hub:
                self.dropped_events.append((t, str(body["type"]), "malformed"))
            return Outgoing(
                self._topics[kind], payload, kind, parsed_id, self.profile.serial, False, at, reason
            )
        return Outgoing(
            self._topics[kind], _encode(doc), kind, msg_id, self.profile.serial, True, at
        )

    def _losing(self) -> bool:
        if self._burst:
            self._burst -= 1
            return True
        if self._rng.random() < _GAP_BURST_CHANCE:
            self._burst = self._rng.randint(*_GAP_BURST_LENGTH) - 1
            return True
        return False

    # -- planning --------------------------------------------------------------------------

    def _plan_days(self, volume_ml: float, *, fresh: bool = True) -> float:
        """Days from now to the next refill: a few days before the projected low alarm, before
        the drug is 180 days old (only counted from a fresh fill), and a day before the
        worst-case empty date the clinic's forecast shows."""
        rng = self._rng
        rate = max(self.program.rate_ml_per_day, 1e-6)
        to_alarm = (volume_ml - self.profile.low_alarm_ml) / rate
        # A pump refilled monthly is not refilled ten days early.
        lo, hi = _REFILL_LEAD_DAYS
        days = to_alarm - min(rng.uniform(lo, hi), max(lo, _LEAD_SHARE * to_alarm))
        if fresh:
            days = min(days, rng.uniform(*_DRUG_MAX_DAYS))
        worst_ml = volume_ml
        if not fresh and self._last_refill_at is not None:
            filled = float(self.profile.capacity_ml)
            worst_ml = max(0.0, filled - _WORST_CASE_FACTOR * max(0.0, filled - volume_ml))
        to_worst_empty = worst_ml / (_WORST_CASE_FACTOR * rate)
        days = min(days, to_worst_empty - _WORST_CASE_MARGIN_DAYS)
        return max(days, _MIN_REFILL_DAYS if fresh else 1.0)

    def _clinic_time(self, target: int, *, not_before: int) -> int:
        """A moment in clinic hours on the local day of ``target``, not before ``not_before``."""
        local = target + self._offset_s
        moment = local - local % DAY_S + self._rng.randint(*_CLINIC_HOURS) - self._offset_s
        while moment < not_before:
            moment += DAY_S
        return moment


def _days(rng: random.Random, bounds: tuple[float, float]) -> int:
    return math.ceil(rng.uniform(*bounds) * DAY_S)
