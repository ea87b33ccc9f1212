"""The effective refill deadline of a pump, and the worst case a booked visit must beat.

The refill a clinic must book is the earliest of (docs/clinical-background.md, "Deadlines other
than an empty reservoir"):

- ``low_alarm``: the reservoir reaches its low-alarm volume at the programmed rate;
- ``worst_case``: it runs *empty* at ``worst_case_delivery_factor`` x the programmed rate since
  its volume was last known (below) — earlier than the low alarm for most fills larger than
  about 16 mL;
- ``drug_age``: the drug reaches its stability limit in the reservoir, counted from the last
  refill (``drug_stability_<drug>_days``: baclofen 180, morphine 90, ziconotide 40, others 90);
- ``battery``: the pump stops ``battery_eri_stop_days`` after its first reading with the
  elective replacement indicator. A refill does not move this one: the pump needs replacing
  (battery_eri says so).

:func:`booking_deadline` (low alarm, drug age) is what a booked visit must come before at the
programmed rate; a visit in time for it but after the worst-case empty date is
refill_due_worst_case's, one alert for the visit. :func:`refill_deadline` (low alarm, worst
case, drug age) is what refill_due counts down to when no visit is booked in time.
:func:`effective_deadline` adds the battery: the forecast object and the worklist show it.

The worst case: the reservoir at ``worst_case_delivery_factor`` x the programmed rate *since its
volume was last known* — the last refill, where a pump reports a calculated volume (each reading
only repeats the programmed arithmetic, so projecting from it would forget the drift so far and
let the date creep later with every reading), or the latest reading where the pump measures its
reservoir. The date that matters is when it would run **empty**: at the low alarm the patient
still has the alarm's volume to go.

Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Literal

from services.domain import therapy
from services.domain.rules.common import View

_FILLED_SINCE_ML = 0.5
"""A calculated volume this much above the last refill's fill: the pump was filled since by a
refill the record lacks, so the worst case starts from the reading."""

Reason = Literal["low_alarm", "worst_case", "drug_age", "battery"]

REASON_WORDS: dict[str, str] = {
    "low_alarm": "low alarm",
    "worst_case": "worst case",
    "drug_age": "drug age",
    "battery": "battery",
}
"""The reason of a deadline as a clinic reads it."""


@dataclass(frozen=True, slots=True)
class Deadline:
    at: datetime
    reason: Reason
    why: str
    """In words, for a detail: "the reservoir reaches its low-alarm volume (2 mL)"."""


def _low_alarm(view: View) -> Deadline | None:
    nominal = view.nominal
    if nominal is None or nominal.low_alarm_at is None:
        return None
    return Deadline(
        nominal.low_alarm_at,
        "low_alarm",
        f"the reservoir reaches its low-alarm volume of {view.low_alarm_ml:g} mL",
    )


def _drug_age(view: View) -> Deadline | None:
    refill = view.last_refill
    if refill is None:
        return None
    days = view.settings.drug_stability_days(refill.drug)
    return Deadline(
        refill.recorded_at + timedelta(days=days),
        "drug_age",
        f"the {refill.drug} filled on {view.day(refill.recorded_at)} reaches its "
        f"{days:g}-day stability limit in the pump",
    )


def _battery(view: View) -> Deadline | None:
    since = view.snapshot.battery_eri_since
    if since is None:
        return None
    days = view.settings.battery_eri_stop_days
    return Deadline(
        since + timedelta(days=days),
        "battery",
        f"the battery, at its elective replacement indicator since {view.day(since)}, stops "
        f"the pump within {days:g} days",
    )


def _worst_case_empty(view: View) -> Deadline | None:
    worst = worst_case(view)
    if worst is None or worst.empty_at is None:
        return None
    factor = view.settings.worst_case_delivery_factor
    refill = view.last_refill
    since = (
        f"since the refill on {view.day(refill.recorded_at)}"
        if refill is not None and worst.basis != "measured"
        else "from the latest reading"
    )
    return Deadline(
        worst.empty_at,
        "worst_case",
        f"the reservoir could run empty if the pump delivers {factor - 1:.1%} more than "
        f"programmed {since} (within its labelled accuracy)",
    )


def _earliest(*found: Deadline | None) -> Deadline | None:
    known = [d for d in found if d is not None]
    return min(known, key=lambda d: d.at) if known else None


def booking_deadline(view: View) -> Deadline | None:
    """What a booked visit must come before at the programmed rate (low alarm, drug age)."""
    return _earliest(_low_alarm(view), _drug_age(view))


def refill_deadline(view: View) -> Deadline | None:
    """What refill_due counts down to (low alarm, worst case, drug age: the earliest)."""
    return _earliest(_low_alarm(view), _worst_case_empty(view), _drug_age(view))


def effective_deadline(view: View) -> Deadline | None:
    """The earliest of every deadline (low alarm, worst case, drug age, battery)."""
    return _earliest(refill_deadline(view), _battery(view))


def worst_case(view: View) -> therapy.Forecast | None:
    """The reservoir at ``worst_case_delivery_factor`` x the programmed rate since its volume
    was last known (module docstring)."""
    state, refill = view.state, view.last_refill
    if state is None:
        return None
    factor = view.settings.worst_case_delivery_factor
    start = state
    known = (
        state.basis != "measured"
        and refill is not None
        and refill.recorded_at <= state.recorded_at
        and state.volume_ml <= refill.added_ml + _FILLED_SINCE_ML  # else: refilled, unrecorded
    )
    if known:
        assert refill is not None
        programmed = refill.added_ml - state.volume_ml
        start = replace(state, volume_ml=max(0.0, refill.added_ml - factor * max(programmed, 0)))
    return therapy.forecast(start, low_alarm_ml=view.low_alarm_ml, tz=view.tz, factor=factor)
