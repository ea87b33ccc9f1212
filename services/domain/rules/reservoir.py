"""Reservoir rules: the drug runs low or out before a refill, or has been in the pump too long.

- refill_due: no visit is booked at or before the booking deadline (:mod:`.deadlines`: the
  low-alarm date, or the drug's stability limit if sooner; a visit in the past counts as none),
  and the refill deadline (the same, or the worst-case empty date if sooner) is at most
  ``refill_due_low_days`` ahead. Low; medium at
  ``refill_due_medium_days``; high at ``refill_due_high_days``; one higher for high withdrawal
  risk — for a deadline of drug age medium at most, also once it has passed (the drug is
  expired, not gone). Not once the low alarm has been reached: reservoir_low holds instead.
  (drug_age, its own rule before, is this deadline now: the rule code stays for old alerts.)
- refill_due_worst_case: a future visit is booked in time for the refill deadline, but at rate x
  ``worst_case_delivery_factor`` since the volume was last known the reservoir runs empty before
  it (:func:`.deadlines.worst_case`). Medium. The date moves only with the programme, a bolus or
  a refill, so one booked visit raises one alert, which holds until the visit is brought
  forward or the pump is refilled. Not when the visit is late even at the programmed rate
  (refill_due says so), nor once the low alarm has been reached.
- reservoir_low: projected volume at or below the low alarm, or a ``low_reservoir`` alarm; not
  when empty. reservoir_empty: projected volume 0 or an ``empty_reservoir`` alarm. Both high.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from services.domain import therapy
from services.domain.alerting import Finding, Priority, Rule
from services.domain.rules import deadlines
from services.domain.rules.common import (
    WITHDRAWAL,
    Check,
    Resolve,
    View,
    finding,
    iso,
    rounded,
    span,
)


def _reservoir_facts(view: View) -> dict[str, Any]:
    state, nominal = view.state, view.nominal
    assert state is not None
    assert nominal is not None
    return {
        "volume_ml": rounded(state.volume_ml),
        "volume_at": iso(state.recorded_at),
        "volume_now_ml": rounded(view.volume_now_ml),
        "low_alarm_ml": rounded(view.low_alarm_ml),
        "rate_ml_per_day": rounded(nominal.rate_ml_per_day, 4),
        "low_alarm_at": iso(nominal.low_alarm_at),
        "empty_at": iso(nominal.empty_at),
        "refill_appointment_at": iso(view.snapshot.refill_appointment_at),
        "withdrawal_risk": view.patient.withdrawal_risk,
    }


def _booked_in_time(view: View, deadline: datetime) -> bool:
    visit = view.snapshot.refill_appointment_at
    return visit is not None and view.now <= visit <= deadline


def _refill_due(view: View) -> Finding | None:
    nominal, settings = view.nominal, view.settings
    booking, deadline = deadlines.booking_deadline(view), deadlines.refill_deadline(view)
    if booking is None or deadline is None or nominal is None or view.at_low_alarm:
        return None
    if _booked_in_time(view, booking.at):
        return None  # in time at the programmed rate: the worst case, if any, is its own rule
    left = deadline.at - view.now
    drug = deadline.reason == "drug_age"
    if left <= timedelta(days=settings.refill_due_high_days):
        priority = Priority.MEDIUM if drug else Priority.HIGH
    elif left <= timedelta(days=settings.refill_due_medium_days):
        priority = Priority.MEDIUM
    elif left <= timedelta(days=settings.refill_due_low_days):
        priority = Priority.LOW
    else:
        return None
    visit = view.snapshot.refill_appointment_at
    booked = (
        f"The visit booked for {view.day(visit)} comes after {view.day(booking.at)}."
        if visit is not None and visit > view.now
        else "No refill visit is booked."
    )
    facts = _reservoir_facts(view) | {
        "refill_deadline_at": iso(deadline.at),
        "refill_deadline_reason": deadline.reason,
        "days_to_refill_deadline": rounded(therapy.days_until(deadline.at, view.now), 2),
        "days_to_low_alarm": rounded(therapy.days_until(nominal.low_alarm_at, view.now), 2)
        if nominal.low_alarm_at is not None
        else None,
    }
    if drug:
        return _refill_due_for_drug_age(
            view, deadline, left=left, priority=priority, booked=booked, facts=facts
        )
    worst = deadline.reason == "worst_case"
    if worst:
        title = (
            f"Refill due in {span(left)} (worst case)"
            if left > timedelta(0)
            else "Refill overdue: the reservoir may be empty (worst case)"
        )
    else:
        title = f"Refill due in {span(left)}"
    low_at = nominal.low_alarm_at or deadline.at
    return finding(
        Rule.REFILL_DUE,
        view.raised(priority),
        title,
        (
            f"At the programmed {nominal.rate_ml_per_day:.3g} mL/day the reservoir reaches its "
            f"low-alarm volume of {view.low_alarm_ml:g} mL on {view.day(low_at)} and is "
            f"empty on {view.day(nominal.empty_at or low_at)}.",
            f"Sooner in the worst case: {deadline.why}, on {view.day(deadline.at)}."
            if worst
            else "",
            booked,
            WITHDRAWAL,
            "Patient at high withdrawal risk: raised one priority." if view.high_risk else "",
            f"Action: book a refill visit before {view.day(deadline.at)}."
            if left > timedelta(0)
            else "Action: refill as soon as possible.",
        ),
        facts,
    )


def _refill_due_for_drug_age(
    view: View,
    deadline: deadlines.Deadline,
    *,
    left: timedelta,
    priority: Priority,
    booked: str,
    facts: dict[str, Any],
) -> Finding:
    nominal = view.nominal
    assert nominal is not None
    ahead = left > timedelta(0)
    title = (
        f"Refill due in {span(left)}: drug age"
        if ahead
        else "Refill overdue: drug past its stability limit"
    )
    why = (
        f"On {view.day(deadline.at)} {deadline.why}."
        if ahead
        else f"Since {view.day(deadline.at)} {deadline.why.replace('reaches', 'is past')}."
    )
    reservoir = (
        f"The reservoir reaches its low-alarm volume on {view.day(nominal.low_alarm_at)}."
        if nominal.low_alarm_at is not None
        else ""
    )
    return finding(
        Rule.REFILL_DUE,
        priority,
        title,
        (
            why,
            reservoir,
            "A drug kept past its limit may lose strength, and the patient then gets less than "
            "programmed.",
            booked,
            f"Action: book a refill visit to replace the drug by {view.day(deadline.at)}."
            if ahead
            else "Action: replace the drug as soon as possible.",
        ),
        facts,
    )


def _refill_due_worst_case(view: View) -> Finding | None:
    visit, deadline = view.snapshot.refill_appointment_at, deadlines.booking_deadline(view)
    if visit is None or visit <= view.now or deadline is None or view.at_low_alarm:
        return None
    if visit > deadline.at:
        return None  # late even at the programmed rate: refill_due says so
    worst = deadlines.worst_case(view)
    if worst is None or worst.empty_at is None or worst.empty_at >= visit:
        return None
    factor = view.settings.worst_case_delivery_factor
    facts = _reservoir_facts(view) | {
        "worst_case_factor": factor,
        "worst_case_low_alarm_at": iso(worst.low_alarm_at),
        "worst_case_empty_at": iso(worst.empty_at),
        "refill_deadline_at": iso(deadline.at),
        "refill_deadline_reason": deadline.reason,
    }
    refill = view.last_refill
    since = (
        f"since the refill on {view.day(refill.recorded_at)}"
        if refill is not None and worst.basis != "measured"
        else "from now"
    )
    return finding(
        Rule.REFILL_DUE_WORST_CASE,
        Priority.MEDIUM,
        "Refill visit may come too late",
        (
            f"A refill visit is booked for {view.day(visit)}. If the pump has delivered "
            f"{factor - 1:.1%} more than programmed {since} (within its labelled accuracy), "
            f"the reservoir runs empty on {view.day(worst.empty_at)}, before the visit.",
            "A calculated reservoir volume cannot show this: the pump's own alarm would not "
            "sound in time.",
            WITHDRAWAL,
            f"Action: bring the refill visit forward to before {view.day(worst.empty_at)}.",
        ),
        facts,
    )


def _reservoir_low(view: View) -> Finding | None:
    if not view.at_low_alarm or view.empty:
        return None
    nominal, volume = view.nominal, view.volume_now_ml
    assert nominal is not None
    assert volume is not None
    empty_on = (
        f"It runs empty on {view.minute(nominal.empty_at)}." if nominal.empty_at is not None else ""
    )
    return finding(
        Rule.RESERVOIR_LOW,
        Priority.HIGH,
        "Reservoir at its low-alarm volume",
        (
            f"About {volume:.1f} mL is left now (low alarm at {view.low_alarm_ml:g} mL).",
            empty_on,
            "A pump that over-infuses holds less than its calculated volume shows.",
            WITHDRAWAL,
            "Action: refill as soon as possible, before the reservoir is empty; make sure the "
            "patient and carers know the signs of withdrawal.",
        ),
        _reservoir_facts(view),
    )


def _reservoir_empty(view: View) -> Finding | None:
    if not view.empty:
        return None
    state = view.state
    assert state is not None
    reported = "The pump reports an empty reservoir." if "empty_reservoir" in state.alarms else ""
    return finding(
        Rule.RESERVOIR_EMPTY,
        Priority.HIGH,
        "Reservoir empty: no drug is delivered",
        (
            reported,
            "At the programmed rate the reservoir holds no drug now, so none reaches the spine.",
            WITHDRAWAL,
            "Action: contact the patient now, assess for withdrawal and treat it as an "
            "emergency; refill the pump today.",
        ),
        _reservoir_facts(view),
    )


# --- resolutions ---------------------------------------------------------------------------------


_RECENT_REFILL = timedelta(days=7)
"""A refill this recent is named as the reason a reservoir rule stopped holding."""


def _refilled(view: View) -> str | None:
    refill = view.last_refill
    if refill is None or not timedelta(0) <= view.now - refill.recorded_at <= _RECENT_REFILL:
        return None
    return f"a refill was recorded on {view.day(refill.recorded_at)}"


def _resolve_refill_due(view: View) -> str:
    refilled = _refilled(view)
    if refilled is not None:
        return refilled
    deadline = deadlines.refill_deadline(view)
    booking = deadlines.booking_deadline(view)
    if deadline is None or booking is None:
        if view.nominal is None:
            return "no reading to forecast from"
        return "the program delivers nothing, so the reservoir does not run low"
    if view.at_low_alarm:
        return "the reservoir reached its low-alarm volume (the reservoir-low alert takes over)"
    visit = view.snapshot.refill_appointment_at
    if visit is not None and _booked_in_time(view, booking.at):
        return f"a refill visit is booked for {view.day(visit)}, before the refill deadline"
    return f"the refill deadline is now {view.day(deadline.at)}: {deadline.why}"


def _resolve_worst_case(view: View) -> str:
    refilled = _refilled(view)
    if refilled is not None:
        return refilled
    visit = view.snapshot.refill_appointment_at
    if visit is None or visit <= view.now:
        return "no future refill visit is booked any more (refill-due watches the date)"
    if view.at_low_alarm:
        return "the reservoir reached its low-alarm volume (the reservoir-low alert takes over)"
    return f"the visit on {view.day(visit)} now comes before the worst-case empty date"


def _resolve_reservoir(view: View) -> str:
    refilled = _refilled(view)
    if refilled is not None:
        return refilled
    if view.empty:
        return "the reservoir is empty (the reservoir-empty alert takes over)"
    volume = view.volume_now_ml
    if volume is None:
        return "no reading to project the reservoir from"
    return f"the reservoir holds {volume:.1f} mL, above its low-alarm volume"


def _resolve_empty(view: View) -> str:
    refilled = _refilled(view)
    if refilled is not None:
        return refilled
    volume = view.volume_now_ml
    if volume is None:
        return "no reading to project the reservoir from"
    return f"the reservoir holds {volume:.1f} mL and the pump reports no empty reservoir"


def _resolve_drug_age(view: View) -> str:
    refilled = _refilled(view)
    if refilled is not None:
        return refilled
    return "drug age is now part of the refill deadline (refill due)"


CHECKS: dict[Rule, Check] = {
    Rule.REFILL_DUE: _refill_due,
    Rule.REFILL_DUE_WORST_CASE: _refill_due_worst_case,
    Rule.RESERVOIR_LOW: _reservoir_low,
    Rule.RESERVOIR_EMPTY: _reservoir_empty,
}

RESOLUTIONS: dict[Rule, Resolve] = {
    Rule.REFILL_DUE: _resolve_refill_due,
    Rule.REFILL_DUE_WORST_CASE: _resolve_worst_case,
    Rule.RESERVOIR_LOW: _resolve_reservoir,
    Rule.RESERVOIR_EMPTY: _resolve_empty,
    Rule.DRUG_AGE: _resolve_drug_age,
}
