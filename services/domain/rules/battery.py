"""Battery rules: the pump nears, or has reached, the end of its battery.

- battery_eri: status or alarm ``eri`` without EOS (medium); battery_eos: status or alarm
  ``eos`` (high).
"""

from __future__ import annotations

from services.domain.alerting import Finding, Priority, Rule
from services.domain.rules.common import WITHDRAWAL, Check, Resolve, View, finding, iso


def _battery_flag(view: View, code: str) -> bool:
    latest = view.latest
    return latest is not None and (latest.battery_status == code or code in latest.alarms)


def _battery_eri(view: View) -> Finding | None:
    if not _battery_flag(view, "eri") or _battery_flag(view, "eos"):
        return None
    latest = view.latest
    assert latest is not None
    return finding(
        Rule.BATTERY_ERI,
        Priority.MEDIUM,
        "Battery low: replace the pump within 90 days",
        (
            "The pump reports its elective replacement indicator: its battery runs out and the "
            "pump stops within 90 days.",
            WITHDRAWAL,
            "Action: schedule the pump replacement within 90 days.",
        ),
        {"battery_pct": latest.battery_pct, "reported_at": iso(latest.recorded_at)},
    )


def _battery_eos(view: View) -> Finding | None:
    if not _battery_flag(view, "eos"):
        return None
    latest = view.latest
    assert latest is not None
    return finding(
        Rule.BATTERY_EOS,
        Priority.HIGH,
        "Battery at end of service: the pump has stopped",
        (
            "The pump reports end of service: it no longer delivers the drug.",
            WITHDRAWAL,
            "Action: contact the patient now, assess for withdrawal, give baclofen by another "
            "route and replace the pump urgently.",
        ),
        {"battery_pct": latest.battery_pct, "reported_at": iso(latest.recorded_at)},
    )


CHECKS: dict[Rule, Check] = {
    Rule.BATTERY_ERI: _battery_eri,
    Rule.BATTERY_EOS: _battery_eos,
}

RESOLUTIONS: dict[Rule, Resolve] = {
    Rule.BATTERY_ERI: lambda v: "the pump no longer reports its elective replacement indicator",
    Rule.BATTERY_EOS: lambda v: "the pump no longer reports end of service",
}
