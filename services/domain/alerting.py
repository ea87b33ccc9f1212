"""What the alert rules see and what they say: the snapshot of one pump, the rule settings, and
the findings. Pure types, no I/O; ``services.domain.rules.evaluate`` turns a snapshot into the
findings that hold *now*, and the alert service (``services.alerts``) turns the difference
between those and the stored alerts into opened, escalated and resolved alerts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from enum import IntEnum, StrEnum
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field


class Rule(StrEnum):
    """Stable codes: integrators route on them (docs/contract/http.md)."""

    REFILL_DUE = "refill_due"
    REFILL_DUE_WORST_CASE = "refill_due_worst_case"
    RESERVOIR_LOW = "reservoir_low"
    RESERVOIR_EMPTY = "reservoir_empty"
    DRUG_AGE = "drug_age"
    FLOW_STOPPED = "flow_stopped"
    UNDER_INFUSION = "under_infusion"
    OVER_INFUSION = "over_infusion"
    REFILL_DISCREPANCY = "refill_discrepancy"
    BATTERY_ERI = "battery_eri"
    BATTERY_EOS = "battery_eos"
    PUMP_SILENT = "pump_silent"
    PROGRAMMING_CHECK = "programming_check"
    DOSE_ESCALATION = "dose_escalation"
    TELEMETRY_GAP = "telemetry_gap"


class Priority(IntEnum):
    """IEC 60601-1-8's three priorities; ordered so that max() is the most urgent."""

    LOW = 1
    MEDIUM = 2
    HIGH = 3

    @property
    def label(self) -> Literal["low", "medium", "high"]:
        return {1: "low", 2: "medium", 3: "high"}[self.value]  # type: ignore[return-value]

    @classmethod
    def from_label(cls, label: str) -> Priority:
        return {"low": cls.LOW, "medium": cls.MEDIUM, "high": cls.HIGH}[label]

    def raised(self) -> Priority:
        """One step more urgent (high stays high)."""
        return Priority(min(self.value + 1, Priority.HIGH.value))


class RuleSettings(BaseModel):
    """Every threshold of every rule, with its unit in its name. Global defaults come from the
    environment (``PUMPWATCH_RULES__<NAME>``); a clinic may override the ones marked
    ``per clinic`` (domain table), and switch off rules — but a finding of high priority is
    raised whatever the clinic switched off."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    refill_due_low_days: float = Field(default=14.0, gt=0)
    """per clinic — refill due (low) when the effective refill deadline is this close and no
    visit is booked before it."""
    refill_due_medium_days: float = Field(default=7.0, gt=0)
    """per clinic — …medium when this close."""
    refill_due_high_days: float = Field(default=2.0, ge=0)
    """per clinic — …high when this close (a deadline set by the drug's age: medium at most)."""
    worst_case_delivery_factor: float = Field(default=1.145, ge=1.0)
    """Labelled accuracy: delivery up to 14.5 % above the programmed rate. Refill due, worst
    case: at this x the rate since the reservoir was last known (the refill, or a measured
    reading), it runs empty before the booked visit."""
    drug_stability_baclofen_days: float = Field(default=180.0, gt=0)
    """Days baclofen may stay in the reservoir (label): a refill deadline."""
    drug_stability_morphine_days: float = Field(default=90.0, gt=0)
    """Days morphine may stay in the reservoir (label)."""
    drug_stability_ziconotide_days: float = Field(default=40.0, gt=0)
    """Days ziconotide may stay in the reservoir (label: 40 diluted, 84 undiluted; the
    message does not say which, so the shorter)."""
    drug_stability_other_days: float = Field(default=90.0, gt=0)
    """Days any other drug may stay in the reservoir unless a setting above names it."""
    battery_eri_stop_days: float = Field(default=90.0, gt=0)
    """After the elective replacement indicator the pump stops within this many days."""
    under_infusion_ratio: float = Field(default=0.5, gt=0, lt=1)
    """Measured delivery below this fraction of the programmed rate…"""
    under_infusion_min_hours: float = Field(default=12.0, gt=0)
    """…for at least this long: under-infusion (high)."""
    over_infusion_ratio: float = Field(default=1.145, gt=1)
    """Measured delivery above this multiple of the programmed rate…"""
    over_infusion_min_hours: float = Field(default=24.0, gt=0)
    """…for at least this long: over-infusion (medium)."""
    discrepancy_abs_ml: float = Field(default=2.0, gt=0)
    """A refill discrepancy counts when |expected - actual residual| exceeds this (pumps larger
    than ``discrepancy_small_pump_max_ml``: a 40 mL pump)…"""
    discrepancy_small_pump_abs_ml: float = Field(default=1.0, gt=0)
    """…or this in a pump of at most ``discrepancy_small_pump_max_ml`` (a 20 mL pump: Maino et
    al., Neuromodulation 2017)…"""
    discrepancy_small_pump_max_ml: float = Field(default=20.0, gt=0)
    """…the largest reservoir that counts as small, mL…"""
    discrepancy_rel_fraction: float = Field(default=0.145, gt=0)
    """…or exceeds this fraction of what should have been delivered since the last refill."""
    silent_max_days: float = Field(default=7.0, gt=0)
    """per clinic — a pump is silent after min(this, half the time to its low alarm)…"""
    silent_min_hours: float = Field(default=1.0, gt=0)
    """…but never before this: a pump at its low alarm has no half-time left, and readings
    come every 15 minutes from a home hub."""
    flow_stopped_clear_readings: int = Field(default=2, ge=1)
    """Consecutive readings without the stopping alarm that clear flow-stopped."""
    dose_step_max_fraction: float = Field(default=0.30, gt=0)
    """programming check: a programmed dose change larger than this within 24 h."""
    dose_escalation_fraction: float = Field(default=0.50, gt=0)
    """dose escalation: the programmed dose up this much within the window…"""
    dose_escalation_window_days: float = Field(default=180.0, gt=0)
    """…(days), or this many increases in a row:"""
    dose_escalation_increases: int = Field(default=3, ge=2)
    telemetry_gap_min_minutes: float = Field(default=60.0, gt=0)
    """Messages missing from a pump's sequence for this long, and given up on by backfill
    (``unrecoverable``, ingest's ``backfill_give_up_after_s``): telemetry gap (low)."""
    default_low_alarm_ml: float = Field(default=2.0, ge=0)
    """The pump's low-reservoir alarm when a reading does not say."""
    disabled_rules: frozenset[Rule] = frozenset()
    """per clinic — rules switched off (high-priority findings are raised regardless)."""

    PER_CLINIC: ClassVar[frozenset[str]] = frozenset(
        {
            "refill_due_low_days",
            "refill_due_medium_days",
            "refill_due_high_days",
            "silent_max_days",
            "disabled_rules",
        }
    )

    def discrepancy_limit_ml(self, capacity_ml: float | None) -> float:
        """The absolute refill-discrepancy threshold for a pump of this size (unknown: large)."""
        small = capacity_ml is not None and capacity_ml <= self.discrepancy_small_pump_max_ml
        return self.discrepancy_small_pump_abs_ml if small else self.discrepancy_abs_ml

    def drug_stability_days(self, drug: str) -> float:
        """How long this drug may stay in the reservoir."""
        known = {
            "baclofen": self.drug_stability_baclofen_days,
            "morphine": self.drug_stability_morphine_days,
            "ziconotide": self.drug_stability_ziconotide_days,
        }
        return known.get(drug.strip().lower(), self.drug_stability_other_days)

    def for_clinic(self, overrides: dict[str, Any] | None) -> RuleSettings:
        """These defaults with a clinic's overrides (only the per-clinic fields)."""
        if not overrides:
            return self
        unknown = set(overrides) - self.PER_CLINIC
        if unknown:
            raise ValueError(f"not per-clinic settings: {sorted(unknown)}")
        return self.model_validate(self.model_dump() | overrides)


@dataclass(frozen=True, slots=True)
class Step:
    """One step of a flex schedule: from ``start_minute`` after local midnight."""

    start_minute: int
    rate_ml_per_day: float


@dataclass(frozen=True, slots=True)
class Therapy:
    mode: str
    rate_ml_per_day: float
    """Programmed average over 24 h (flex steps included)."""
    concentration_mcg_per_ml: float
    daily_dose_mcg: float | None = None
    schedule: tuple[Step, ...] = ()
    """Flex steps in the pump's local time; empty for a constant rate."""


@dataclass(frozen=True, slots=True)
class Reading:
    recorded_at: datetime
    volume_ml: float
    capacity_ml: float
    low_alarm_ml: float | None
    basis: Literal["measured", "calculated"] | None
    drug_name: str
    therapy: Therapy
    measured_flow_ml_per_day: float | None = None
    battery_pct: float | None = None
    battery_status: Literal["ok", "eri", "eos"] | None = None
    alarms: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Refill:
    recorded_at: datetime
    residual_ml: float
    added_ml: float
    drug: str
    concentration_mcg_per_ml: float
    expected_residual_ml: float | None = None
    """What the pump believed was left, when the refill said so."""


@dataclass(frozen=True, slots=True)
class Bolus:
    recorded_at: datetime
    dose_mcg: float


@dataclass(frozen=True, slots=True)
class DoseChange:
    """A programmed daily dose taking effect (prescription change events, or readings whose
    programmed dose differs from the one before)."""

    at: datetime
    daily_dose_mcg: float


@dataclass(frozen=True, slots=True)
class Patient:
    withdrawal_risk: Literal["standard", "high"] = "standard"
    low_alarm_margin_ml: float | None = None
    """A personal low-alarm volume (e.g. 4 mL instead of the pump's 2 mL)."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything the rules may look at for one pump, as of ``now``."""

    serial: str
    now: datetime
    settings: RuleSettings
    timezone: tzinfo
    """The pump's local time (clinic's zone, else the latest reading's offset)."""
    latest: Reading | None
    recent: tuple[Reading, ...] = ()
    """Readings, oldest first (the latest included): the last few, a window of the last days
    for pumps that measure (flow fits), and the last one before each refill in ``refills``."""
    refills: tuple[Refill, ...] = ()
    """The last refills, oldest first."""
    boluses: tuple[Bolus, ...] = ()
    """Boluses since the oldest refill in ``refills`` (or of the last 200 days)."""
    dose_changes: tuple[DoseChange, ...] = ()
    """Programmed dose changes within the dose-escalation window, oldest first."""
    patient: Patient | None = None
    """None: the pump is not assigned to a patient."""
    refill_appointment_at: datetime | None = None
    open_gap_minutes: float | None = None
    """Age (since detection) of the oldest *unrecoverable* sequence gap, if any: one that
    backfill asked the device for and that did not arrive within the give-up time. Gaps still
    being asked for are not here (backfill may yet fill them)."""
    missing_messages: int = 0
    """Messages in the unrecoverable gaps."""
    missing_from: datetime | None = None
    """The missing period: from the recorded_at of the last message a source sent before its
    unrecoverable gap (the earliest over the pump's gaps; None if unknown)…"""
    missing_until: datetime | None = None
    """…to that of the first message after it (the latest; None if unknown)."""
    battery_eri_since: datetime | None = None
    """The first reading of the battery's elective replacement indicator (the latest reading
    reports it; looked back ``battery_eri_stop_days``): the pump stops within that many days."""


@dataclass(frozen=True, slots=True)
class Finding:
    """A condition that holds now. At most one per rule per pump."""

    rule: Rule
    priority: Priority
    title: str
    """Short, no patient name: e.g. "Refill due in 6 days"."""
    detail: str
    """For the clinician: what happened, why it matters, what to do."""
    facts: dict[str, Any] = field(default_factory=dict)
    """The numbers behind it (JSON-serialisable), stored in the alert's history."""
    occurrence: str | None = None
    """For a finding about one past event (a refill's discrepancy): which event. Once an alert
    for it is resolved — by a clinician or otherwise — the same event raises nothing again."""
