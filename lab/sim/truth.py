"""Ground truth of a simulated fleet: which faults showed where and when, and what should alert.

``Fleet.truth(until)`` lists one :class:`Injected` per *manifestation* of a fault — a motor
stall or occlusion spell, a refill that reveals a discrepancy, a reservoir reaching its low
alarm, a battery reaching ERI, a pump falling silent — read from the pump simulations' own state
(pure, deterministic, the simulation itself untouched: it runs copies ahead where it must).

The definitions (domain: docs/clinical-background.md; harm times: baclofen withdrawal usually begins
within 1-3 days of an interruption, so the earliest harm is 24 h after delivery stops):

- ``onset``: when the fault's signature first appears in the data. Stall and occlusion: the
  spell's start. Refill discrepancy: the refill. Missed refill: when the volume the pump reports
  reaches its low alarm, and 0 (interpolated within the step, one reading interval at most).
  Over-infusion: on a measured pump its start (the simulation's start: it over-infuses from
  before); on a calculated pump the refill that reveals it. Battery: ERI and EOS. Silence: the
  last reading the pump sent. Gap: each burst of lost messages from one source (consecutive
  sequence numbers), from its first to its last (``ends``). Malformed: the first one sent.
- ``expected_rules``: the rule codes that should fire for it; empty where none can (a calculated
  pump running dry, malformed messages, and ``telemetry_gap``: that rule ages gaps by the wall
  clock, so a replay that runs days in seconds cannot set it off).
- ``priority``: how urgent the alert should be by ``onset + within`` (the rule table); None where
  the data leaves it open (a refill near the discrepancy threshold).
- ``within``: how long after ``onset`` the rule needs with default settings: its own window
  (12 h under-infusion, 24 h over-infusion, the silent limit) plus the next reading(s).
- ``lead``: how long *before* onset an expected alert may come (refill due: 14 days ahead of
  the low-alarm date; a reservoir alert a reading early: readings round the volume to 0.01 mL,
  so one can read empty a little before it is, and the rules project between readings).
- ``harm_at``: the earliest clinical harm. An interruption of delivery: onset + 24 h (a spell of
  24 h or less: None). A missed refill (and an over-infusing pump running dry): when the drug
  really runs out + 24 h, on the low-alarm record; None on the empty record (the same harm). ERI
  and EOS: EOS + 24 h. None where the data can only show it after the fact (a refill's
  discrepancy, over-infusion) or nothing harms (silence, gaps, malformed messages).
- ``explains``: alerts this condition accounts for (the expected ones and their consequences:
  a stopped measured pump also under-infuses, a silent pump's projected reservoir runs low, a
  burst of lost readings is a silence, short past the low-alarm date; a
  bolus whose event was lost or malformed looks like over-infusion to a flow sensor, a lost
  refill leaves the drug looking older than it is).

Alerts that no fault explains but a healthy pump's normal life does are in :data:`LIFE_RULES`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal

from lab.sim.faults import Fault
from lab.sim.outgoing import Lost
from lab.sim.pump import PumpSim, RefillMark
from services.domain.alerting import Priority, Rule, RuleSettings

Signature = Literal[
    "stall",
    "occlusion",
    "refill",
    "over_infusion",
    "low_alarm",
    "empty",
    "ran_dry",
    "eri",
    "eos",
    "silence",
    "gap",
    "malformed",
    "dropped_event",
]

LIFE_RULES = frozenset({Rule.REFILL_DUE, Rule.REFILL_DUE_WORST_CASE, Rule.DOSE_ESCALATION})
"""Rules a healthy pump's normal life sets off: refill due before a refill when no visit is
booked in time (for the low alarm or the drug's age), the worst case when the visit booked comes
after the worst-case empty date, dose escalation when titration raised the dose three times in
a row (the simulated clinic titrates by 5-15 % steps every few months)."""

_DAY = timedelta(days=1)
_HARM_AFTER = timedelta(hours=24)
"""Withdrawal usually begins within 1-3 days of an interruption: the earliest harm."""
_LOOKAHEAD_DAYS = 400
_BORDERLINE = (0.9, 1.1)
"""A refill discrepancy this close to the rule's threshold (as a multiple of it) may go either
way (the rule reads the programme from the last reading before the refill, and the residual is
rounded)."""


@dataclass(frozen=True, slots=True)
class Injected:
    """One manifestation of a fault (module docstring for each field's definition)."""

    serial: str
    fault: Fault
    onset: datetime
    expected_rules: frozenset[Rule]
    harm_at: datetime | None
    note: str
    signature: Signature
    priority: Priority | None = None
    within: timedelta = timedelta(0)
    lead: timedelta = timedelta(0)
    explains: frozenset[Rule] = field(default_factory=frozenset)
    ends: datetime | None = None
    """The end of a spell (stall, occlusion); None for the others."""

    @property
    def deadline(self) -> datetime:
        """By when the data allows the expected alert (with default settings)."""
        return self.onset + self.within

    @property
    def detectable(self) -> bool:
        return bool(self.expected_rules)


def collect(
    probes: Sequence[PumpSim],
    until: int,
    lost: Iterable[Lost],
    settings: RuleSettings,
) -> list[Injected]:
    """Every manifestation up to ``until`` (Unix seconds) of the pumps ``probes`` simulate
    (copies run to ``until``), in onset order. ``lost``: messages lost so far (gap)."""
    bursts = _bursts(lost)
    out: list[Injected] = []
    for probe in probes:
        out.extend(_Pump(probe, until, settings, bursts.get(probe.profile.serial, [])).records())
    return sorted(out, key=lambda r: (r.onset, r.serial, r.signature))


def _bursts(lost: Iterable[Lost]) -> dict[str, list[tuple[datetime, datetime]]]:
    """Per pump, the (first, last) times of each run of lost messages with consecutive sequence
    numbers from one source."""
    by_source: dict[tuple[str, str], list[Lost]] = {}
    for message in lost:
        by_source.setdefault((message.serial, message.source_id), []).append(message)
    out: dict[str, list[tuple[datetime, datetime]]] = {}
    for (serial, _), messages in by_source.items():
        messages.sort(key=lambda m: m.seq)
        runs = [[messages[0]]]
        for message in messages[1:]:
            if message.seq == runs[-1][-1].seq + 1:
                runs[-1].append(message)
            else:
                runs.append([message])
        out.setdefault(serial, []).extend(
            (run[0].at.astimezone(UTC), run[-1].at.astimezone(UTC)) for run in runs
        )
    for found in out.values():
        found.sort()
    return out


def _at(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def _hours(span: timedelta) -> str:
    return f"{span / timedelta(hours=1):.0f} h"


class _Pump:
    def __init__(
        self,
        sim: PumpSim,
        until: int,
        settings: RuleSettings,
        bursts: list[tuple[datetime, datetime]],
    ) -> None:
        self.sim = sim
        self.serial = sim.profile.serial
        self.faults = sim.profile.faults
        self.settings = settings
        self.reading = timedelta(seconds=sim.interval_s)
        # Nothing shows after the pump fell silent.
        self.data_end = min(until, sim.silent_at - 1)
        self.until = until
        self.bursts = bursts

    def records(self) -> list[Injected]:
        out: list[Injected] = []
        if self.sim.spells:
            out.extend(self._spells())
        out.extend(self._refills())
        out.extend(self._reservoir())
        out.extend(self._battery())
        if Fault.OVER_INFUSION in self.faults and self.sim.measured and self.sim.t0 <= self.until:
            out.append(self._over_infusion_live())
        if Fault.SILENCE in self.faults:
            out.extend(self._silence())
        if Fault.GAP in self.faults:
            out.extend(
                Injected(
                    self.serial,
                    Fault.GAP,
                    first,
                    frozenset(),
                    None,
                    "messages lost before the broker open a sequence gap; telemetry_gap ages "
                    "gaps by the wall clock (60 min), so a replay running days in seconds cannot "
                    "set it off: not expected here; lost readings are a silence, which past the "
                    "low-alarm date soon exceeds the silent limit",
                    "gap",
                    explains=frozenset({Rule.TELEMETRY_GAP, Rule.PUMP_SILENT}),
                    ends=last + self.reading,
                )
                for first, last in self.bursts
            )
        out.extend(self._dropped_events())
        malformed_at = self.sim.first_malformed_at
        if (
            Fault.MALFORMED in self.faults
            and malformed_at is not None
            and malformed_at <= self.data_end
        ):
            out.append(
                Injected(
                    self.serial,
                    Fault.MALFORMED,
                    _at(malformed_at),
                    frozenset(),
                    None,
                    "malformed messages are quarantined by ingest; no alert",
                    "malformed",
                )
            )
        return out

    def _dropped_events(self) -> Iterable[Injected]:
        over_window = timedelta(hours=self.settings.over_infusion_min_hours) + _DAY
        for at, kind, how in self.sim.dropped_events:
            if at > self.data_end:
                break
            if kind == "bolus" and self.sim.measured:
                explains, lasts = frozenset({Rule.OVER_INFUSION}), over_window
            elif kind == "refill":
                # The drug looks older than it is: refill due for drug age, and the worst case
                # counted from the refill before.
                explains = frozenset({Rule.REFILL_DUE, Rule.REFILL_DUE_WORST_CASE})
                lasts = timedelta(days=self.settings.drug_stability_days(self.sim.profile.drug))
            else:
                continue
            yield Injected(
                self.serial,
                Fault.GAP if how == "lost" else Fault.MALFORMED,
                _at(at),
                frozenset(),
                None,
                f"a {kind} event was {how} before it reached the database: what it did is "
                "invisible to the rules",
                "dropped_event",
                explains=explains,
                ends=_at(at) + lasts,
            )

    # -- delivery stops ------------------------------------------------------------------------

    def _next_reading(self, at: int) -> int:
        """The first reading at or after ``at`` (readings keep a fixed grid)."""
        sim = self.sim
        first = sim.t0 + sim.phase_s
        if at <= first:
            return first
        steps = -(-(at - first) // sim.interval_s)
        return first + steps * sim.interval_s

    def _spells(self) -> Iterable[Injected]:
        stall = Fault.MOTOR_STALL in self.faults
        fault = Fault.MOTOR_STALL if stall else Fault.OCCLUSION
        for start, end in self.sim.spells:
            if start > self.data_end or start >= self.sim.eos_at:
                break
            span = timedelta(seconds=end - start)
            harm = _at(start) + _HARM_AFTER if span > _HARM_AFTER else None
            harm_words = (
                "withdrawal can begin 24 h into it"
                if harm is not None
                else f"shorter than the {_hours(_HARM_AFTER)} after which withdrawal can begin"
            )
            if stall:
                shows = self._next_reading(start) < end
                rules = frozenset({Rule.FLOW_STOPPED}) if shows else frozenset()
                note = (
                    f"motor stalled for {_hours(span)} (motor_stall alarm on every reading in "
                    f"it); {harm_words}"
                )
                within = self.reading
            else:
                window = timedelta(hours=self.settings.under_infusion_min_hours)
                shows = span > window + 2 * self.reading
                rules = frozenset({Rule.UNDER_INFUSION}) if shows else frozenset()
                note = (
                    f"catheter blocked for {_hours(span)}: measured flow near 0 while the "
                    f"programme runs; {harm_words}"
                )
                within = window + 2 * self.reading
            if not shows:
                note += "; too short to show between readings"
            yield Injected(
                self.serial,
                fault,
                _at(start),
                rules,
                harm,
                note,
                "stall" if stall else "occlusion",
                priority=Priority.HIGH if shows else None,
                within=within,
                explains=frozenset({Rule.FLOW_STOPPED, Rule.UNDER_INFUSION}),
                ends=_at(end),
            )

    # -- refills -------------------------------------------------------------------------------

    def _score(self, mark: RefillMark) -> float:
        """|discrepancy| as a multiple of the rule's threshold (>1: the rule fires)."""
        settings = self.settings
        delta = abs(mark.expected_residual_ml - mark.residual_ml)
        score = delta / settings.discrepancy_limit_ml(float(self.sim.profile.capacity_ml))
        should = mark.should_have_delivered_ml
        if should is not None and should > 0:
            score = max(score, delta / (settings.discrepancy_rel_fraction * should))
        return score

    def _refills(self) -> Iterable[Injected]:
        previous: tuple[float, float] | None = None  # (signed delta, score) of the refill before
        for mark in self.sim.refill_marks:
            if mark.at > self.data_end:
                break
            delta = mark.expected_residual_ml - mark.residual_ml
            score = self._score(mark)
            before, previous = previous, (delta, score)
            low, high = _BORDERLINE
            if score < low:
                continue
            fault = self._refill_fault(delta)
            if fault is None:
                continue
            sure = score > high
            repeated: bool | None = None
            if before is not None and before[1] > high:
                repeated = (before[0] > 0) == (delta > 0)
            elif before is None or before[1] < low:
                repeated = False
            priority = (
                None
                if not sure or repeated is None
                else (Priority.HIGH if repeated else Priority.MEDIUM)
            )
            kind = "less" if delta > 0 else "more"
            note = (
                f"{abs(delta):.2f} mL {kind} left than the pump expected "
                f"({mark.residual_ml:.2f} vs {mark.expected_residual_ml:.2f} mL), "
                f"{score:.2f} x the rule's threshold"
            )
            if not sure:
                note += "; near the threshold: allowed, not required"
            yield Injected(
                self.serial,
                fault,
                _at(mark.at),
                frozenset({Rule.REFILL_DISCREPANCY}) if sure else frozenset(),
                None,
                note,
                "refill",
                priority=priority,
                within=self.reading,
                explains=frozenset({Rule.REFILL_DISCREPANCY}),
            )

    def _refill_fault(self, delta: float) -> Fault | None:
        """The fault that explains a discrepancy of this sign, if the pump has one."""
        if delta > 0:
            return Fault.OVER_INFUSION if Fault.OVER_INFUSION in self.faults else None
        for fault in (Fault.MOTOR_STALL, Fault.OCCLUSION):
            if fault in self.faults:
                return fault
        return None

    # -- the reservoir ---------------------------------------------------------------------------

    def _reservoir(self) -> Iterable[Injected]:
        if Fault.MISSED_REFILL in self.faults:
            fault = Fault.MISSED_REFILL
        elif Fault.OVER_INFUSION in self.faults:
            fault = Fault.OVER_INFUSION
        else:
            return
        explains = frozenset(
            {
                Rule.REFILL_DUE,
                Rule.REFILL_DUE_WORST_CASE,
                Rule.RESERVOIR_LOW,
                Rule.RESERVOIR_EMPTY,
                Rule.UNDER_INFUSION,
                Rule.FLOW_STOPPED,
            }
        )
        crossings = self.sim.crossings
        for index, (name, at) in enumerate(crossings):
            if at > self.data_end:
                break
            dry = next((t for n, t in crossings[index:] if n == "true_empty"), None)
            if name == "true_empty":
                if self.sim.measured or fault is Fault.MISSED_REFILL:
                    continue  # the data shows it: the empty record below
                yield Injected(
                    self.serial,
                    fault,
                    _at(at),
                    frozenset(),
                    _at(at) + _HARM_AFTER,
                    "the drug really ran out while the calculated volume still shows some: "
                    "nothing live can show it; the next refill's residual will",
                    "ran_dry",
                    explains=explains,
                )
                continue
            if dry is None:
                dry = self._dry_after(at)
            if name == "reported_low":
                rules = {Rule.RESERVOIR_LOW}
                lead = self.reading
                if fault is Fault.MISSED_REFILL:
                    rules.add(Rule.REFILL_DUE)
                    lead = timedelta(days=self.settings.refill_due_low_days) + _DAY
                yield Injected(
                    self.serial,
                    fault,
                    _at(at),
                    frozenset(rules),
                    None if dry is None else _at(dry) + _HARM_AFTER,
                    "the reported volume reached the low alarm "
                    f"({self.sim.profile.low_alarm_ml:g} mL)"
                    + ("" if dry is None else f"; the drug runs out at {_at(dry):%Y-%m-%d %H:%M}"),
                    "low_alarm",
                    priority=Priority.HIGH,
                    within=self.reading,
                    lead=lead,
                    explains=explains,
                )
            else:
                yield Injected(
                    self.serial,
                    fault,
                    _at(at),
                    frozenset({Rule.RESERVOIR_EMPTY}),
                    None,
                    "the reported volume reached 0 (the harm is dated on the low-alarm record: "
                    "a calculated volume may reach 0 after the drug really ran out)",
                    "empty",
                    priority=Priority.HIGH,
                    within=self.reading,
                    lead=self.reading,
                    explains=explains,
                )

    def _dry_after(self, at: int) -> int | None:
        """When the drug really runs out after ``at`` if nobody refills first (the simulation
        run ahead on a copy)."""
        probe = self.sim.probe()
        refills = len(probe.refill_marks)
        horizon = at + _LOOKAHEAD_DAYS * 86400
        while not probe.finished and probe.next_at <= horizon:
            probe.step()
            if len(probe.refill_marks) > refills:
                return None
            found = [t for n, t in probe.crossings if n == "true_empty" and t >= at]
            if found:
                return found[0]
        return None

    # -- battery -----------------------------------------------------------------------------------

    def _battery(self) -> Iterable[Injected]:
        sim = self.sim
        if sim.eri_at > self.data_end:
            return
        injected = Fault.BATTERY in self.faults
        origin = "" if injected else "natural battery depletion (not injected); "
        harm = _at(sim.eos_at) + _HARM_AFTER
        yield Injected(
            self.serial,
            Fault.BATTERY,
            _at(sim.eri_at),
            frozenset({Rule.BATTERY_ERI}),
            harm,
            f"{origin}elective replacement indicator; end of service (the pump stops) at "
            f"{_at(sim.eos_at):%Y-%m-%d %H:%M}",
            "eri",
            priority=Priority.MEDIUM,
            within=self.reading,
            explains=frozenset({Rule.BATTERY_ERI}),
        )
        if sim.eos_at > self.data_end:
            return
        yield Injected(
            self.serial,
            Fault.BATTERY,
            _at(sim.eos_at),
            # The eos alarm's "drug delivery stopped" is the battery's condition: one alert
            # (services.domain.conditions), escalated from ERI.
            frozenset({Rule.BATTERY_EOS}),
            harm,
            f"{origin}end of service: the pump stops delivering (eos alarm on every reading)",
            "eos",
            priority=Priority.HIGH,
            within=self.reading,
            explains=frozenset({Rule.BATTERY_EOS, Rule.FLOW_STOPPED, Rule.UNDER_INFUSION}),
        )

    # -- over-infusion seen live ---------------------------------------------------------------

    def _over_infusion_live(self) -> Injected:
        sim = self.sim
        window = timedelta(hours=self.settings.over_infusion_min_hours)
        return Injected(
            self.serial,
            Fault.OVER_INFUSION,
            _at(sim.t0),
            frozenset({Rule.OVER_INFUSION}),
            None,
            f"delivers {sim.delivery_factor:.3f} x the programme (from before the simulation "
            "began); the flow sensor shows it once it covers the rule's window",
            "over_infusion",
            priority=Priority.MEDIUM,
            within=window + 2 * self.reading,
            explains=frozenset({Rule.OVER_INFUSION}),
        )

    # -- silence -----------------------------------------------------------------------------------

    def _silence(self) -> Iterable[Injected]:
        sim = self.sim
        last = sim.last_reading_sent
        if sim.silent_at > self.until or last is None:
            return
        settings = self.settings
        low = sim.profile.low_alarm_ml
        days = (sim.last_reading_volume_ml - low) / max(sim.program.rate_ml_per_day, 1e-9)
        low_at = _at(last) + timedelta(days=days)
        limit = min(timedelta(days=settings.silent_max_days), (low_at - _at(last)) / 2)
        limit = max(limit, timedelta(hours=settings.silent_min_hours))
        past_low = low_at <= _at(last) + limit
        yield Injected(
            self.serial,
            Fault.SILENCE,
            _at(last),
            frozenset({Rule.PUMP_SILENT}),
            None,
            f"the last reading; the pump keeps delivering but sends nothing more (the rule "
            f"waits {_hours(limit)})",
            "silence",
            priority=Priority.MEDIUM if past_low else Priority.LOW,
            within=limit + self.reading,
            explains=frozenset(
                {
                    Rule.PUMP_SILENT,
                    Rule.REFILL_DUE,
                    Rule.REFILL_DUE_WORST_CASE,
                    Rule.RESERVOIR_LOW,
                    Rule.RESERVOIR_EMPTY,
                }
            ),
        )
