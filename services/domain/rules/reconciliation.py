"""Refill reconciliation: what each refill withdrew against what was expected to be left.

- refill_discrepancy: the latest refill's expected residual (the refill's own, else computed
  from the refill before and the programmed delivery plus boluses, else the last reading
  before the refill advanced to it) against its residual, beyond the absolute limit for the
  pump's size (``discrepancy_small_pump_abs_ml`` up to ``discrepancy_small_pump_max_ml``, else
  ``discrepancy_abs_ml``) or the relative one. Medium; high when the refill before
  also had a discrepancy of the same sign. Holds until a later refill shows none.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from services.domain import therapy
from services.domain.alerting import Finding, Priority, Reading, Refill, Rule, RuleSettings
from services.domain.rules.common import Check, Resolve, View, finding, iso, rounded


@dataclass(frozen=True, slots=True)
class Reconciliation:
    refill: Refill
    found: therapy.Discrepancy
    source: str
    """Where the expected residual came from: "pump", "computed" or "last_reading"."""
    should_have_delivered_ml: float | None
    capacity_ml: float | None
    """The pump's reservoir (the absolute threshold depends on it); None when unknown."""

    def limit_ml(self, settings: RuleSettings) -> float:
        return settings.discrepancy_limit_ml(self.capacity_ml)

    def kind(self, settings: RuleSettings) -> therapy.Classification:
        return self.found.classify(settings, self.capacity_ml)


def _reading_before(view: View, at: datetime) -> Reading | None:
    before = [r for r in view.readings if r.recorded_at < at]
    return before[-1] if before else None


def reconcile(view: View, index: int) -> Reconciliation | None:
    """The discrepancy of ``view.refills[index]``, if anything says what was expected."""
    refill = view.refills[index]
    previous = view.refills[index - 1] if index > 0 else None
    reading = _reading_before(view, refill.recorded_at)
    program = reading.therapy if reading is not None else None
    if program is None and view.latest is not None:
        program = view.latest.therapy
    boluses = view.snapshot.boluses
    should_have = None
    if previous is not None and program is not None:
        should_have = therapy.should_have_delivered_ml(
            program, previous.recorded_at, refill.recorded_at, view.tz, boluses
        )
    if refill.expected_residual_ml is not None:
        expected, source = refill.expected_residual_ml, "pump"
    elif previous is not None and should_have is not None:
        expected, source = max(0.0, previous.added_ml - should_have), "computed"
    elif reading is not None:
        expected = therapy.expected_residual_from_reading(
            reading, refill.recorded_at, view.tz, boluses
        )
        source = "last_reading"
    else:
        return None
    found = therapy.discrepancy(expected, refill.residual_ml, should_have)
    sized = reading if reading is not None else view.latest
    capacity = None if sized is None else sized.capacity_ml
    return Reconciliation(refill, found, source, should_have, capacity)


def _refill_discrepancy(view: View) -> Finding | None:
    if not view.refills:
        return None
    latest = reconcile(view, len(view.refills) - 1)
    if latest is None:
        return None
    kind = latest.kind(view.settings)
    if kind == "none":
        return None
    before = reconcile(view, len(view.refills) - 2) if len(view.refills) > 1 else None
    repeated = before is not None and before.kind(view.settings) == kind
    delta = abs(latest.found.delta_ml)
    over = kind == "over_delivery"
    title = f"Refill: {delta:.1f} mL {'less' if over else 'more'} left than expected"
    return finding(
        Rule.REFILL_DISCREPANCY,
        Priority.HIGH if repeated else Priority.MEDIUM,
        title + (" again" if repeated else ""),
        (
            f"At the refill on {view.day(latest.refill.recorded_at)}, "
            f"{latest.refill.residual_ml:.1f} mL was withdrawn where "
            f"{latest.found.expected_residual_ml:.1f} mL was expected.",
            "The refill before showed the same." if repeated else "",
            "Less drug left than expected means the pump delivered more than programmed "
            "(over-infusion), an earlier refill went partly into the pocket, or boluses were "
            "not logged: overdose now, and an early empty reservoir."
            if over
            else "More drug left than expected means less reached the patient: a motor stall "
            "or a blocked catheter, with withdrawal to follow.",
            "Action: check the patient for signs of overdose, interrogate the pump and review "
            "the bolus log; bring the next refill forward."
            if over
            else "Action: check the patient for signs of withdrawal, interrogate the pump for "
            "stalls and have the catheter checked.",
        ),
        {
            "refill_at": iso(latest.refill.recorded_at),
            "expected_residual_ml": rounded(latest.found.expected_residual_ml),
            "actual_residual_ml": rounded(latest.found.actual_residual_ml),
            "delta_ml": rounded(latest.found.delta_ml),
            "relative": rounded(latest.found.relative, 4),
            "should_have_delivered_ml": rounded(latest.should_have_delivered_ml),
            "expected_from": latest.source,
            "kind": kind,
            "capacity_ml": latest.capacity_ml,
            "limit_ml": latest.limit_ml(view.settings),
            "previous_delta_ml": None if before is None else rounded(before.found.delta_ml),
        },
        occurrence=f"refill {iso(latest.refill.recorded_at)}",
    )


# --- resolutions ---------------------------------------------------------------------------------


def _resolve_discrepancy(view: View) -> str:
    refill = view.last_refill
    if refill is None:
        return "no refill is on record any more"
    return f"the refill on {view.day(refill.recorded_at)} matched the expected residual"


CHECKS: dict[Rule, Check] = {
    Rule.REFILL_DISCREPANCY: _refill_discrepancy,
}

RESOLUTIONS: dict[Rule, Resolve] = {
    Rule.REFILL_DISCREPANCY: _resolve_discrepancy,
}
