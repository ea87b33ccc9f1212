"""What the rules share: the snapshot as the rules see it, and the words of their findings.

The reservoir is projected from the latest reading at the programmed rate (flex steps integrated
in the pump's zone). A refill recorded after the latest reading restarts the projection from its
``added_ml`` at the refill's time (the reading's reservoir alarms are then stale). The low alarm
is the larger of the pump's (else ``default_low_alarm_ml``) and the patient's personal margin. An
unassigned pump counts as standard risk.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace
from datetime import UTC, datetime, timedelta, tzinfo
from functools import cached_property
from typing import Any, TypeAlias

from services.domain import therapy
from services.domain.alerting import Finding, Patient, Priority, Reading, Refill, Rule, Snapshot

EPS = 1e-9
"""The margin of every threshold comparison, so that floating-point rounding never decides."""
_STANDARD = Patient()
WITHDRAWAL = (
    "Without baclofen, withdrawal usually begins within 1-3 days: high fever, confusion, "
    "rebound spasticity and rigidity, which can progress to organ failure and death."
)


class View:
    """The snapshot with the derived values several rules use, each computed once."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.settings = snapshot.settings
        self.now = snapshot.now
        self.tz: tzinfo = snapshot.timezone
        self.patient = snapshot.patient or _STANDARD
        self.high_risk = self.patient.withdrawal_risk == "high"

    @cached_property
    def readings(self) -> list[Reading]:
        """Recent readings and the latest, oldest first, one per instant."""
        every = [*self.snapshot.recent]
        if self.snapshot.latest is not None:
            every.append(self.snapshot.latest)
        by_time = {r.recorded_at.astimezone(UTC): r for r in every}
        return [by_time[at] for at in sorted(by_time)]

    @property
    def latest(self) -> Reading | None:
        return self.readings[-1] if self.readings else None

    @cached_property
    def refills(self) -> list[Refill]:
        return sorted(self.snapshot.refills, key=lambda r: r.recorded_at)

    @property
    def last_refill(self) -> Refill | None:
        return self.refills[-1] if self.refills else None

    @cached_property
    def state(self) -> Reading | None:
        """What the reservoir projection starts from: the latest reading, or a refill recorded
        after it (a full reservoir, its alarms gone)."""
        latest, refill = self.latest, self.last_refill
        if latest is None or refill is None or refill.recorded_at <= latest.recorded_at:
            return latest
        return replace(latest, recorded_at=refill.recorded_at, volume_ml=refill.added_ml, alarms=())

    @cached_property
    def low_alarm_ml(self) -> float:
        state = self.state
        if state is None:
            return self.settings.default_low_alarm_ml
        return therapy.effective_low_alarm_ml(state, self.patient, self.settings)

    def forecast(self, factor: float = 1.0) -> therapy.Forecast | None:
        if self.state is None:
            return None
        return therapy.forecast(
            self.state, low_alarm_ml=self.low_alarm_ml, tz=self.tz, factor=factor
        )

    @cached_property
    def nominal(self) -> therapy.Forecast | None:
        return self.forecast()

    @cached_property
    def volume_now_ml(self) -> float | None:
        return None if self.state is None else therapy.volume_now(self.state, self.now, self.tz)

    @cached_property
    def empty(self) -> bool:
        state, volume = self.state, self.volume_now_ml
        if state is None or volume is None:
            return False
        return volume <= EPS or "empty_reservoir" in state.alarms

    @cached_property
    def at_low_alarm(self) -> bool:
        """At or past the low alarm (empty included)."""
        state, volume, nominal = self.state, self.volume_now_ml, self.nominal
        if state is None or volume is None or nominal is None:
            return False
        reached = nominal.low_alarm_at is not None and nominal.low_alarm_at <= self.now
        return (
            self.empty
            or reached
            or volume <= self.low_alarm_ml + EPS
            or "low_reservoir" in state.alarms
        )

    def raised(self, priority: Priority) -> Priority:
        return priority.raised() if self.high_risk else priority

    def day(self, at: datetime) -> str:
        return f"{at.astimezone(self.tz):%Y-%m-%d}"

    def minute(self, at: datetime) -> str:
        return f"{at.astimezone(self.tz):%Y-%m-%d %H:%M %Z}"


def iso(at: datetime | None) -> str | None:
    return None if at is None else at.astimezone(UTC).isoformat()


def rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(float(value), digits)


def span(duration: timedelta) -> str:
    """A duration in words, whole units: "6 days", "30 hours", "45 minutes" (days from two
    days on, hours from two hours on)."""
    seconds = duration.total_seconds()
    for unit, size in (("day", 86400), ("hour", 3600)):
        if seconds >= 2 * size:
            return f"{round(seconds / size)} {unit}s"
    count = max(round(seconds / 60), 0)
    return f"{count} minute" + ("" if count == 1 else "s")


def finding(
    rule: Rule,
    priority: Priority,
    title: str,
    detail: Iterable[str],
    facts: dict[str, Any],
    *,
    occurrence: str | None = None,
) -> Finding:
    return Finding(
        rule, priority, title, " ".join(part for part in detail if part), facts, occurrence
    )


Check: TypeAlias = Callable[[View], Finding | None]
"""A rule: its finding when it holds at ``view.now``, else None."""
Resolve: TypeAlias = Callable[[View], str]
"""Why a rule no longer holds (said when its alert is resolved automatically)."""
