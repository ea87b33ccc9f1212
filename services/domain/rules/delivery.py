"""Delivery rules: the drug stops flowing, or the pump measures less or more than programmed.

- flow_stopped: one of the stopping alarms in any of the last ``flow_stopped_clear_readings``
  readings, so it clears only after that many clean readings in a row. High.
- under_infusion / over_infusion: :func:`therapy.delivery_ratio` over the last
  ``*_min_hours`` ending at the latest reading, logged boluses counted as programmed; only
  when the data covers that whole window (measured pumps: calculated ones without a flow
  sensor give no ratio). Strictly below
  ``under_infusion_ratio`` (high, raised for high risk: it stays high) / strictly above
  ``over_infusion_ratio`` (medium). Nothing when the program delivers nothing.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from services.domain import therapy
from services.domain.alerting import Finding, Priority, Reading, Rule
from services.domain.rules.common import (
    EPS,
    WITHDRAWAL,
    Check,
    Resolve,
    View,
    finding,
    iso,
    rounded,
)

STOPPING_ALARMS: dict[str, str] = {
    "motor_stall": "motor stall",
    "empty_reservoir": "empty reservoir",
    "eos": "battery end of service",
    "valve_closed": "valve closed",
    "critical_pump_fault": "critical pump fault",
    "catheter_occlusion": "catheter occlusion",
}
"""Alarm codes that mean no drug is flowing, with their words for clinicians."""
_OVERDOSE = (
    "Too much intrathecal baclofen causes drowsiness, respiratory depression, seizures and coma."
)


def _stopping(reading: Reading) -> list[str]:
    return [alarm for alarm in reading.alarms if alarm in STOPPING_ALARMS]


def _flow_stopped(view: View) -> Finding | None:
    window = view.readings[-view.settings.flow_stopped_clear_readings :]
    offending = [r for r in window if _stopping(r)]
    if not offending:
        return None
    last = offending[-1]
    alarms = _stopping(last)
    words = ", ".join(STOPPING_ALARMS[a] for a in alarms)
    cleared = last is not window[-1]
    return finding(
        Rule.FLOW_STOPPED,
        Priority.HIGH,
        f"Drug delivery stopped: {words}",
        (
            f"The pump reported {words} at {view.minute(last.recorded_at)}.",
            "Later readings no longer show it, but a stall can be intermittent: it clears "
            f"after {view.settings.flow_stopped_clear_readings} clean readings in a row."
            if cleared
            else "",
            WITHDRAWAL,
            "Action: contact the patient today and check for signs of withdrawal; interrogate "
            "the pump (a motor stall needs an X-ray rotor study, a closed valve a reset); be "
            "ready to give baclofen by another route.",
        ),
        {"alarms": alarms, "reported_at": iso(last.recorded_at), "still_reported": not cleared},
    )


def _measured(view: View, hours: float) -> therapy.Ratio | None:
    """The delivery ratio over the last ``hours`` up to the latest reading, if data covers all
    of it and the program delivers something."""
    latest = view.latest
    if latest is None or therapy.daily_ml(latest.therapy) <= 0:
        return None
    end = latest.recorded_at
    found = therapy.delivery_ratio(
        view.readings,
        window_start=end - timedelta(hours=hours),
        window_end=end,
        tz=view.tz,
        boluses=view.snapshot.boluses,
    )
    if found is None or found.hours < hours - EPS:
        return None
    return found


def _ratio_facts(found: therapy.Ratio) -> dict[str, Any]:
    return {
        "ratio": rounded(found.ratio, 4),
        "hours": rounded(found.hours, 2),
        "method": found.method,
        "delivered_ml": rounded(found.delivered_ml, 4),
        "programmed_ml": rounded(found.programmed_ml, 4),
    }


def _source(found: therapy.Ratio) -> str:
    return "flow sensor" if found.method == "flow" else "reservoir level sensor"


def _under_infusion(view: View) -> Finding | None:
    hours = view.settings.under_infusion_min_hours
    found = _measured(view, hours)
    if found is None or found.ratio >= view.settings.under_infusion_ratio - EPS:
        return None
    return finding(
        Rule.UNDER_INFUSION,
        view.raised(Priority.HIGH),
        f"Measured delivery {found.ratio:.0%} of programmed",
        (
            f"Over the last {hours:g} hours the pump's {_source(found)} shows "
            f"{found.delivered_ml:.2f} mL delivered where {found.programmed_ml:.2f} mL was "
            "programmed: a blocked, kinked or leaking catheter, or a failing pump.",
            WITHDRAWAL,
            "Action: contact the patient today and check for signs of withdrawal; check the "
            "catheter and interrogate the pump.",
        ),
        _ratio_facts(found),
    )


def _over_infusion(view: View) -> Finding | None:
    hours = view.settings.over_infusion_min_hours
    found = _measured(view, hours)
    if found is None or found.ratio <= view.settings.over_infusion_ratio + EPS:
        return None
    return finding(
        Rule.OVER_INFUSION,
        Priority.MEDIUM,
        f"Measured delivery {found.ratio:.0%} of programmed",
        (
            f"Over the last {hours:g} hours the pump's {_source(found)} shows "
            f"{found.delivered_ml:.2f} mL delivered where {found.programmed_ml:.2f} mL was "
            "programmed.",
            _OVERDOSE,
            "The reservoir will also run empty before its forecast date, and then withdrawal "
            "follows.",
            "Action: check the patient for signs of overdose, verify the programmed rate and "
            "concentration, and bring the refill forward.",
        ),
        _ratio_facts(found),
    )


# --- resolutions ---------------------------------------------------------------------------------


def _resolve_flow_stopped(view: View) -> str:
    count = view.settings.flow_stopped_clear_readings
    earlier = [r for r in view.readings if _stopping(r)]
    alarms = ", ".join(STOPPING_ALARMS[a] for a in _stopping(earlier[-1])) if earlier else None
    what = alarms or "flow-stopping alarm"
    return f"the pump reported no {what} in {count} reading" + ("" if count == 1 else "s")


def _resolve_ratio(view: View, hours: float) -> str:
    found = _measured(view, hours)
    if found is None:
        return f"no measured data covers the last {hours:g} hours any more"
    return f"measured delivery is {found.ratio:.0%} of programmed over the last {hours:g} hours"


CHECKS: dict[Rule, Check] = {
    Rule.FLOW_STOPPED: _flow_stopped,
    Rule.UNDER_INFUSION: _under_infusion,
    Rule.OVER_INFUSION: _over_infusion,
}

RESOLUTIONS: dict[Rule, Resolve] = {
    Rule.FLOW_STOPPED: _resolve_flow_stopped,
    Rule.UNDER_INFUSION: lambda v: _resolve_ratio(v, v.settings.under_infusion_min_hours),
    Rule.OVER_INFUSION: lambda v: _resolve_ratio(v, v.settings.over_infusion_min_hours),
}
