"""The alert rules: which conditions hold for one pump at ``snapshot.now``.

:func:`evaluate` returns at most one :class:`Finding` per rule, sorted by rule code;
:func:`resolution` says why a rule no longer holds, for alerts resolved automatically. Pure: no
I/O, the clock is ``snapshot.now``. Thresholds come from ``snapshot.settings`` (the domain
table's defaults, with the clinic's overrides applied by the caller); the clinical background
is docs/clinical-background.md. The decisions where the table leaves room are told with the
rules that make them, in the docstring of each module:

- :mod:`.common`: the reservoir projection and the snapshot as every rule sees it.
- :mod:`.deadlines`: the effective refill deadline (low alarm, drug age, battery) and the
  worst case a booked visit must beat.
- :mod:`.reservoir`: refill_due, refill_due_worst_case, reservoir_low, reservoir_empty.
- :mod:`.delivery`: flow_stopped, under_infusion, over_infusion.
- :mod:`.reconciliation`: refill_discrepancy, and :func:`reconciliations` (its arithmetic,
  refill by refill).
- :mod:`.battery`: battery_eri, battery_eos.
- :mod:`.telemetry`: pump_silent, telemetry_gap.
- :mod:`.programming`: programming_check, dose_escalation.

A rule in ``disabled_rules`` yields nothing unless its finding is high.

Thresholds are compared with a margin of 1e-9 so that floating-point rounding never decides.
Every detail says what happened, why it matters and, after "Action:", what to do; titles are
short and name no one (a snapshot holds no patient identity).
"""

from __future__ import annotations

from dataclasses import dataclass

from services.domain import therapy
from services.domain.alerting import (
    Finding,
    Priority,
    Reading,
    Refill,
    Rule,
    RuleSettings,
    Snapshot,
)
from services.domain.rules import (
    battery,
    deadlines,
    delivery,
    programming,
    reconciliation,
    reservoir,
    telemetry,
)
from services.domain.rules.common import Check, Resolve, View
from services.domain.rules.delivery import STOPPING_ALARMS
from services.domain.rules.programming import (
    DOSE_STEP_WINDOW,
    STANDARD_CONCENTRATIONS_MCG_PER_ML,
)
from services.domain.rules.reconciliation import Reconciliation, reconcile

__all__ = [
    "DOSE_STEP_WINDOW",
    "STANDARD_CONCENTRATIONS_MCG_PER_ML",
    "STOPPING_ALARMS",
    "Outlook",
    "Reconciliation",
    "effective_low_alarm_ml",
    "evaluate",
    "outlook",
    "projection_state",
    "pump_deadline",
    "pump_forecast",
    "reconciliations",
    "resolution",
    "volume_now_ml",
    "worst_case",
]


def evaluate(snapshot: Snapshot) -> list[Finding]:
    """Every condition that holds at ``snapshot.now``: at most one finding per rule."""
    view = View(snapshot)
    findings = [found for check in _CHECKS.values() if (found := check(view)) is not None]
    kept = [f for f in findings if _kept(f, snapshot.settings)]
    return sorted(kept, key=lambda f: f.rule.value)


@dataclass(frozen=True, slots=True)
class Outlook:
    """What the read model keeps of a pump, computed from one view of its snapshot."""

    state: Reading | None
    forecast: therapy.Forecast | None
    deadline: deadlines.Deadline | None
    worst_case: therapy.Forecast | None


def outlook(snapshot: Snapshot) -> Outlook:
    """The projection state, the forecast, the effective deadline and the worst case at once
    (each of :func:`projection_state`, :func:`pump_forecast`, :func:`pump_deadline` and
    :func:`worst_case` builds its own view)."""
    view = View(snapshot)
    return Outlook(
        view.state, view.nominal, deadlines.effective_deadline(view), deadlines.worst_case(view)
    )


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


def pump_deadline(snapshot: Snapshot) -> deadlines.Deadline | None:
    """The effective refill deadline with its reason (the forecast object, the worklist)."""
    return deadlines.effective_deadline(View(snapshot))


def worst_case(snapshot: Snapshot) -> therapy.Forecast | None:
    """The reservoir at the labelled worst case since its volume was last known."""
    return deadlines.worst_case(View(snapshot))


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
    check = _CHECKS.get(rule)
    found = None if check is None else check(view)
    if found is not None and not _kept(found, snapshot.settings):
        return "the clinic switched this rule off"
    return _RESOLUTIONS[rule](view)


def _kept(finding: Finding, settings: RuleSettings) -> bool:
    return finding.rule not in settings.disabled_rules or finding.priority is Priority.HIGH


_CHECKS: dict[Rule, Check] = {
    **reservoir.CHECKS,
    **delivery.CHECKS,
    **reconciliation.CHECKS,
    **battery.CHECKS,
    **telemetry.CHECKS,
    **programming.CHECKS,
}

_RESOLUTIONS: dict[Rule, Resolve] = {
    **reservoir.RESOLUTIONS,
    **delivery.RESOLUTIONS,
    **reconciliation.RESOLUTIONS,
    **battery.RESOLUTIONS,
    **telemetry.RESOLUTIONS,
    **programming.RESOLUTIONS,
}
