"""Telemetry rules: a pump's readings stop arriving, or messages go missing from its sequence.

- pump_silent: no reading for longer than min(``silent_max_days``, half the time from the last
  reading to its low-alarm date), never less than ``silent_min_hours`` (a pump at its low alarm
  would otherwise be silent between two readings). Low; medium once the low-alarm date has
  passed; one higher for high withdrawal risk. Nothing without any reading.
- telemetry_gap (low): a sequence gap that backfill could not fill (``unrecoverable``: the
  device was asked again and the messages did not come within the give-up time), at least
  ``telemetry_gap_min_minutes`` old. A gap still being asked for raises nothing.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from services.domain.alerting import Finding, Priority, Rule
from services.domain.rules.common import EPS, Check, Resolve, View, finding, iso, rounded, span


def _silent_limit(view: View, last_at: datetime) -> timedelta:
    settings = view.settings
    limit = timedelta(days=settings.silent_max_days)
    nominal = view.nominal
    if nominal is not None and nominal.low_alarm_at is not None:
        limit = min(limit, (nominal.low_alarm_at - last_at) / 2)
    return max(limit, timedelta(hours=settings.silent_min_hours))


def _pump_silent(view: View) -> Finding | None:
    latest = view.latest
    if latest is None:
        return None
    silence = view.now - latest.recorded_at
    limit = _silent_limit(view, latest.recorded_at)
    if silence <= limit:
        return None
    nominal = view.nominal
    low_at = None if nominal is None else nominal.low_alarm_at
    passed = low_at is not None and low_at <= view.now
    low_words = (
        ""
        if low_at is None
        else f"At the programmed rate the reservoir {'reached' if passed else 'reaches'} its "
        f"low-alarm volume on {view.day(low_at)}."
    )
    return finding(
        Rule.PUMP_SILENT,
        view.raised(Priority.MEDIUM if passed else Priority.LOW),
        f"No reading for {span(silence)}",
        (
            f"The last reading came at {view.minute(latest.recorded_at)}.",
            low_words,
            "Until readings arrive, alarms such as a motor stall or an empty reservoir go unseen.",
            "Action: contact the patient to check the home hub or bring the pump in for an "
            "interrogation.",
        ),
        {
            "last_reading_at": iso(latest.recorded_at),
            "silent_hours": rounded(silence / timedelta(hours=1), 2),
            "limit_hours": rounded(limit / timedelta(hours=1), 2),
            "low_alarm_at": iso(low_at),
        },
    )


def _telemetry_gap(view: View) -> Finding | None:
    snapshot = view.snapshot
    age = snapshot.open_gap_minutes
    if age is None or age < view.settings.telemetry_gap_min_minutes - EPS:
        return None
    missing = snapshot.missing_messages
    start, end = snapshot.missing_from, snapshot.missing_until
    if start is not None and end is not None:
        period = f"recorded between {view.minute(start)} and {view.minute(end)}"
    elif end is not None:
        period = f"recorded before {view.minute(end)}"
    elif start is not None:
        period = f"recorded after {view.minute(start)}"
    else:
        period = "of unknown time"
    return finding(
        Rule.TELEMETRY_GAP,
        Priority.LOW,
        f"Telemetry gap: {missing} messages lost",
        (
            f"{missing} messages from this pump's sources, {period}, never arrived: the device "
            f"was asked to send them again and did not, for {span(timedelta(minutes=age))}.",
            "An alarm may have been among them.",
            "Action: check the pump's home hub; interrogate the pump at its next visit to read "
            "its event log for that period.",
        ),
        {
            "missing_messages": missing,
            "open_gap_minutes": rounded(age, 1),
            "missing_from": iso(start),
            "missing_until": iso(end),
        },
    )


# --- resolutions ---------------------------------------------------------------------------------


def _resolve_silent(view: View) -> str:
    latest = view.latest
    if latest is None:
        return "no reading is on record any more"
    return f"readings arrive again (the last at {view.minute(latest.recorded_at)})"


CHECKS: dict[Rule, Check] = {
    Rule.PUMP_SILENT: _pump_silent,
    Rule.TELEMETRY_GAP: _telemetry_gap,
}

RESOLUTIONS: dict[Rule, Resolve] = {
    Rule.PUMP_SILENT: _resolve_silent,
    Rule.TELEMETRY_GAP: lambda v: "the missing messages arrived after all",
}
