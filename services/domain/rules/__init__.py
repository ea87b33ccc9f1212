"""The alert rules: which conditions hold for one pump at ``snapshot.now``.

:func:`evaluate` returns at most one :class:`Finding` per rule, sorted by rule code;
:func:`resolution` says why a rule no longer holds, for alerts resolved automatically. Pure: no
I/O, the clock is ``snapshot.now``. Thresholds come from ``snapshot.settings`` (the domain
table's defaults, with the clinic's overrides applied by the caller); the clinical background is
../shared/domain.md. The decisions where the table leaves room are told with the rules that make
them, in the docstring of each module:

- :mod:`.common`: the reservoir projection and the snapshot as every rule sees it.
- :mod:`.reservoir`: refill_due, refill_due_worst_case, reservoir_low, reservoir_empty,
  drug_age.
- :mod:`.delivery`: flow_stopped, under_infusion, over_infusion.
- :mod:`.reconciliation`: refill_discrepancy, and :func:`reconciliations` (its arithmetic,
  refill by refill).
- :mod:`.battery`: battery_eri, battery_eos.
- :mod:`.telemetry`: pump_silent, telemetry_gap.

The rules still here:

- programming_check (medium): the programmed daily dose disagrees with rate x concentration by
  more than 1 %; the concentration is not 50, 500, 1000 or 2000 mcg/mL; the pump is programmed
  for another concentration than the drug of its last refill (a 500 mcg/mL program on a
  2000 mcg/mL refill delivers four times the dose); or the programmed doses in force during the
  last 24 h differ by more than ``dose_step_max_fraction`` (of the earlier).
- dose_escalation (low): the current dose is >= (1 + ``dose_escalation_fraction``) x the lowest
  in force during the last ``dose_escalation_window_days``, or the last
  ``dose_escalation_increases`` changes were all increases, within the window.
- A rule in ``disabled_rules`` yields nothing unless its finding is high.

Thresholds are compared with a margin of 1e-9 so that floating-point rounding never decides.
Every detail says what happened, why it matters and, after "Action:", what to do; titles are
short and name no one (a snapshot holds no patient identity).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import pairwise
from typing import Any

from services.domain import therapy
from services.domain.alerting import (
    DoseChange,
    Finding,
    Priority,
    Reading,
    Refill,
    Rule,
    RuleSettings,
    Snapshot,
)
from services.domain.contract import DOSE_TOLERANCE
from services.domain.rules import battery, delivery, reconciliation, reservoir, telemetry
from services.domain.rules.common import (
    EPS,
    Check,
    Resolve,
    View,
    finding,
    iso,
    rounded,
)
from services.domain.rules.delivery import STOPPING_ALARMS
from services.domain.rules.reconciliation import Reconciliation, reconcile

STANDARD_CONCENTRATIONS_MCG_PER_ML = (50.0, 500.0, 1000.0, 2000.0)
DOSE_STEP_WINDOW = timedelta(hours=24)

__all__ = [
    "DOSE_STEP_WINDOW",
    "STANDARD_CONCENTRATIONS_MCG_PER_ML",
    "STOPPING_ALARMS",
    "Reconciliation",
    "effective_low_alarm_ml",
    "evaluate",
    "projection_state",
    "pump_forecast",
    "reconciliations",
    "resolution",
    "volume_now_ml",
]


def evaluate(snapshot: Snapshot) -> list[Finding]:
    """Every condition that holds at ``snapshot.now``: at most one finding per rule."""
    view = View(snapshot)
    findings = [found for check in _CHECKS.values() if (found := check(view)) is not None]
    kept = [f for f in findings if _kept(f, snapshot.settings)]
    return sorted(kept, key=lambda f: f.rule.value)


def pump_forecast(snapshot: Snapshot) -> therapy.Forecast | None:
    """The reservoir forecast the rules use (latest reading, or a later refill; the patient's
    margin applied): the API's forecast object."""
    return View(snapshot).nominal


def projection_state(snapshot: Snapshot) -> Reading | None:
    """What projections start from: the latest reading, or a refill recorded after it."""
    return View(snapshot).state


def volume_now_ml(snapshot: Snapshot) -> float | None:
    """The reservoir projected to ``snapshot.now`` at the programmed rate."""
    return View(snapshot).volume_now_ml


def effective_low_alarm_ml(snapshot: Snapshot) -> float:
    return View(snapshot).low_alarm_ml


def reconciliations(snapshot: Snapshot) -> list[tuple[Refill, Reconciliation | None]]:
    """Each refill of the snapshot, oldest first, with its discrepancy when anything says what
    was expected (the refill_discrepancy rule's arithmetic)."""
    view = View(snapshot)
    return [(refill, reconcile(view, i)) for i, refill in enumerate(view.refills)]


def resolution(rule: Rule, snapshot: Snapshot) -> str:
    """Why ``rule`` no longer holds (said when its alert is resolved automatically)."""
    view = View(snapshot)
    found = _CHECKS[rule](view)
    if found is not None and not _kept(found, snapshot.settings):
        return "the clinic switched this rule off"
    return _RESOLUTIONS[rule](view)


def _kept(finding: Finding, settings: RuleSettings) -> bool:
    return finding.rule not in settings.disabled_rules or finding.priority is Priority.HIGH


# --- programming ---------------------------------------------------------------------------------


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
class _Escalation:
    title: str
    current: DoseChange
    lowest: DoseChange
    facts: dict[str, Any]


def _escalation(view: View) -> _Escalation | None:
    settings = view.settings
    changes = sorted(view.snapshot.dose_changes, key=lambda c: c.at)
    window_days = settings.dose_escalation_window_days
    doses = _in_force(changes, view.now - timedelta(days=window_days), view.now)
    if len(doses) < 2:
        return None
    current, lowest = doses[-1], min(doses, key=lambda c: c.daily_dose_mcg)
    rise = current.daily_dose_mcg / lowest.daily_dose_mcg - 1 if lowest.daily_dose_mcg > 0 else 0
    run = _increases_in_a_row(doses)
    facts: dict[str, Any] = {
        "daily_dose_mcg": current.daily_dose_mcg,
        "lowest_daily_dose_mcg": lowest.daily_dose_mcg,
        "lowest_at": iso(lowest.at),
        "rise": rounded(rise, 4),
        "increases_in_a_row": run,
        "window_days": window_days,
    }
    if rise >= settings.dose_escalation_fraction - EPS:
        return _Escalation(f"Dose up {rise:.0%} in {window_days:g} days", current, lowest, facts)
    if run >= settings.dose_escalation_increases:
        return _Escalation(f"Dose raised {run} times in a row", current, lowest, facts)
    return None


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


# --- resolutions ---------------------------------------------------------------------------------


_CHECKS: dict[Rule, Check] = {
    **reservoir.CHECKS,
    **delivery.CHECKS,
    **reconciliation.CHECKS,
    **battery.CHECKS,
    **telemetry.CHECKS,
    Rule.PROGRAMMING_CHECK: _programming_check,
    Rule.DOSE_ESCALATION: _dose_escalation,
}

_RESOLUTIONS: dict[Rule, Resolve] = {
    **reservoir.RESOLUTIONS,
    **delivery.RESOLUTIONS,
    **reconciliation.RESOLUTIONS,
    **battery.RESOLUTIONS,
    **telemetry.RESOLUTIONS,
    Rule.PROGRAMMING_CHECK: lambda v: (
        "the programming checks pass: dose matches rate x concentration, a standard "
        "concentration, no large dose step in 24 hours"
    ),
    Rule.DOSE_ESCALATION: lambda v: "the programmed dose no longer shows an escalation",
}
