"""Programming rules: the pump's program disagrees with itself or with its drug, or the programmed
dose keeps rising.

- programming_check (medium): the programmed daily dose disagrees with rate x concentration by
  more than 1 %; the concentration is not 50, 500, 1000 or 2000 mcg/mL; the pump is programmed
  for another concentration than the drug of its last refill (a 500 mcg/mL program on a
  2000 mcg/mL refill delivers four times the dose); or the programmed doses in force during the
  last 24 h differ by more than ``dose_step_max_fraction`` (of the earlier).
- dose_escalation (low): the current dose is >= (1 + ``dose_escalation_fraction``) x the lowest
  in force during the last ``dose_escalation_window_days``, or the last
  ``dose_escalation_increases`` changes were all increases, within the window.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import pairwise
from typing import Any

from services.domain import therapy
from services.domain.alerting import DoseChange, Finding, Priority, Rule, RuleSettings
from services.domain.contract import DOSE_TOLERANCE
from services.domain.rules.common import EPS, Check, Resolve, View, finding, iso, rounded

STANDARD_CONCENTRATIONS_MCG_PER_ML = (50.0, 500.0, 1000.0, 2000.0)
DOSE_STEP_WINDOW = timedelta(hours=24)


def _dose_mismatch(view: View) -> str | None:
    latest = view.latest
    if latest is None or latest.therapy.daily_dose_mcg is None:
        return None
    program = latest.therapy
    expected = therapy.mcg_per_day(program.rate_ml_per_day, program.concentration_mcg_per_ml)
    assert program.daily_dose_mcg is not None
    if abs(program.daily_dose_mcg - expected) <= DOSE_TOLERANCE * expected + EPS:
        return None
    return (
        f"The programmed dose of {program.daily_dose_mcg:g} mcg/day is not rate x "
        f"concentration ({program.rate_ml_per_day:g} mL/day x "
        f"{program.concentration_mcg_per_ml:g} mcg/mL = {expected:g} mcg/day)."
    )


def _odd_concentration(view: View) -> str | None:
    latest = view.latest
    if latest is None:
        return None
    concentration = latest.therapy.concentration_mcg_per_ml
    if any(abs(concentration - c) <= EPS * c for c in STANDARD_CONCENTRATIONS_MCG_PER_ML):
        return None
    return (
        f"The concentration of {concentration:g} mcg/mL is not one of 50, 500, 1000 or 2000 mcg/mL."
    )


def _refill_concentration(view: View) -> str | None:
    refill, latest = view.last_refill, view.latest
    if refill is None or latest is None or latest.recorded_at < refill.recorded_at:
        return None
    programmed = latest.therapy.concentration_mcg_per_ml
    filled = refill.concentration_mcg_per_ml
    if abs(programmed - filled) <= EPS * filled:
        return None
    return (
        f"The pump is programmed for {programmed:g} mcg/mL but was refilled on "
        f"{view.day(refill.recorded_at)} with {filled:g} mcg/mL: it delivers "
        f"{filled / programmed:.2g} times the intended dose."
    )


def _in_force(changes: list[DoseChange], since: datetime, until: datetime) -> list[DoseChange]:
    """The doses in force at some moment of [since, until]: the one in force at ``since`` (or
    the first known) and every change after it."""
    before = [c for c in changes if c.at <= since]
    during = [c for c in changes if since < c.at <= until]
    return before[-1:] + during


def _largest_step(view: View) -> tuple[float, DoseChange, DoseChange] | None:
    changes = sorted(view.snapshot.dose_changes, key=lambda c: c.at)
    doses = _in_force(changes, view.now - DOSE_STEP_WINDOW, view.now)
    steps = [
        (
            abs(later.daily_dose_mcg - earlier.daily_dose_mcg) / earlier.daily_dose_mcg,
            earlier,
            later,
        )
        for i, earlier in enumerate(doses)
        for later in doses[i + 1 :]
        if earlier.daily_dose_mcg > 0
    ]
    return max(steps, key=lambda s: s[0], default=None)


def _dose_step(view: View) -> str | None:
    step = _largest_step(view)
    if step is None or step[0] <= view.settings.dose_step_max_fraction + EPS:
        return None
    fraction, earlier, later = step
    return (
        f"The programmed dose went from {earlier.daily_dose_mcg:g} to "
        f"{later.daily_dose_mcg:g} mcg/day ({fraction:.0%}) within 24 hours, above the "
        f"{view.settings.dose_step_max_fraction:.0%} usually stepped at once."
    )


def _programming_check(view: View) -> Finding | None:
    issues = [
        found
        for check in (_dose_mismatch, _odd_concentration, _refill_concentration, _dose_step)
        if (found := check(view)) is not None
    ]
    if not issues:
        return None
    return finding(
        Rule.PROGRAMMING_CHECK,
        Priority.MEDIUM,
        "Check the pump programming",
        (
            *issues,
            "A programming or concentration error delivers the wrong dose from the start: "
            "overdose if too much, withdrawal if too little.",
            "Action: compare the pump's program with the prescription and the drug label of "
            "the last refill, and correct it if they differ.",
        ),
        {"issues": issues},
    )


@dataclass(frozen=True, slots=True)
class Tolerance:
    """What the dose-escalation rule sees in a dose history, flagged or not: the dose now, the
    lowest in force within the window, the rise between them and the run of increases."""

    current: DoseChange
    lowest: DoseChange
    rise: float
    """current / lowest - 1 (0 when the lowest is 0)."""
    increases_in_a_row: int
    window_days: float
    title: str | None
    """The alert's title when the rule flags it (None: no escalation)."""


def tolerance(
    dose_changes: Sequence[DoseChange], now: datetime, settings: RuleSettings
) -> Tolerance | None:
    """The dose-escalation signal of a dose history as of ``now`` (None: fewer than two doses
    in force within the window, nothing to compare)."""
    changes = sorted(dose_changes, key=lambda c: c.at)
    window_days = settings.dose_escalation_window_days
    doses = _in_force(changes, now - timedelta(days=window_days), now)
    if len(doses) < 2:
        return None
    current, lowest = doses[-1], min(doses, key=lambda c: c.daily_dose_mcg)
    rise = current.daily_dose_mcg / lowest.daily_dose_mcg - 1 if lowest.daily_dose_mcg > 0 else 0
    run = _increases_in_a_row(doses)
    title = None
    if rise >= settings.dose_escalation_fraction - EPS:
        title = f"Dose up {rise:.0%} in {window_days:g} days"
    elif run >= settings.dose_escalation_increases:
        title = f"Dose raised {run} times in a row"
    return Tolerance(current, lowest, rise, run, window_days, title)


@dataclass(frozen=True, slots=True)
class _Escalation:
    title: str
    current: DoseChange
    lowest: DoseChange
    facts: dict[str, Any]


def _escalation(view: View) -> _Escalation | None:
    found = tolerance(view.snapshot.dose_changes, view.now, view.settings)
    if found is None or found.title is None:
        return None
    facts: dict[str, Any] = {
        "daily_dose_mcg": found.current.daily_dose_mcg,
        "lowest_daily_dose_mcg": found.lowest.daily_dose_mcg,
        "lowest_at": iso(found.lowest.at),
        "rise": rounded(found.rise, 4),
        "increases_in_a_row": found.increases_in_a_row,
        "window_days": found.window_days,
    }
    return _Escalation(found.title, found.current, found.lowest, facts)


def _increases_in_a_row(doses: list[DoseChange]) -> int:
    """How many of the last changes were increases, counting back from the current dose
    (a repeated equal dose is no change)."""
    levels = [doses[0]]
    levels += [b for a, b in pairwise(doses) if b.daily_dose_mcg != a.daily_dose_mcg]
    run = 0
    for earlier, later in reversed(list(pairwise(levels))):
        if later.daily_dose_mcg <= earlier.daily_dose_mcg:
            break
        run += 1
    return run


def _dose_escalation(view: View) -> Finding | None:
    found = _escalation(view)
    if found is None:
        return None
    return finding(
        Rule.DOSE_ESCALATION,
        Priority.LOW,
        found.title,
        (
            f"The programmed dose is now {found.current.daily_dose_mcg:g} mcg/day; it was "
            f"{found.lowest.daily_dose_mcg:g} mcg/day on {view.day(found.lowest.at)}.",
            "Needing more drug may be tolerance, but it may also hide a catheter problem "
            "(leak, break, migration, occlusion) or a mass at the catheter tip, which can "
            "compress the spinal cord.",
            "Action: review the dose history and the symptoms; consider imaging the catheter "
            "before raising the dose again.",
        ),
        found.facts,
    )


CHECKS: dict[Rule, Check] = {
    Rule.PROGRAMMING_CHECK: _programming_check,
    Rule.DOSE_ESCALATION: _dose_escalation,
}

RESOLUTIONS: dict[Rule, Resolve] = {
    Rule.PROGRAMMING_CHECK: lambda v: (
        "the programming checks pass: dose matches rate x concentration, a standard "
        "concentration, no large dose step in 24 hours"
    ),
    Rule.DOSE_ESCALATION: lambda v: "the programmed dose no longer shows an escalation",
}
