"""The words of notification emails: plain text and simple HTML. Pure functions.

A subject line never names the patient (it shows in lock screens and mail logs): it says the
priority, the alert's title (which carries no patient identity) and the pump's serial. The body
may name the patient for the clinic's staff (routing option ``email.patient_names``).
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from datetime import date, datetime, tzinfo
from typing import Any


@dataclass(frozen=True, slots=True)
class EmailContent:
    subject: str
    text: str
    html: str

    def as_json(self) -> dict[str, str]:
        return {"subject": self.subject, "text": self.text, "html": self.html}


@dataclass(frozen=True, slots=True)
class PatientRef:
    display_name: str
    mrn: str


@dataclass(frozen=True, slots=True)
class DigestRefill:
    serial: str
    patient: PatientRef | None
    low_alarm_at: datetime
    days_to_low_alarm: float
    volume_ml: float
    low_alarm_ml: float
    visit_at: datetime | None


@dataclass(frozen=True, slots=True)
class DigestAlert:
    serial: str
    patient: PatientRef | None
    title: str
    rule: str
    opened_at: datetime


_VERBS = {
    "alert.opened": "alert",
    "alert.escalated": "alert escalated",
    "alert.eased": "alert eased",
    "alert.acknowledged": "alert acknowledged",
    "alert.resolved": "alert resolved",
    "alert.unacknowledged": "alert NOT ACKNOWLEDGED",
    "alert.assigned": "alert now yours",
}
_FOOTER = "Sent by pumpwatch. Acknowledge or resolve alerts in pumpwatch, not by replying."


def local(at: datetime | str | None, tz: tzinfo) -> str:
    if at is None:
        return "-"
    when = datetime.fromisoformat(at) if isinstance(at, str) else at
    return f"{when.astimezone(tz):%Y-%m-%d %H:%M %Z}"


def alert_email(
    event: str,
    alert: dict[str, Any],
    *,
    clinic_name: str,
    tz: tzinfo,
    patient: PatientRef | None,
) -> EmailContent:
    """An alert change (``alert`` is the alert object; for ``alert.unacknowledged`` with its
    ``escalation``). ``patient`` None: not named (unassigned pump, or the clinic's choice)."""
    priority = str(alert.get("priority", "")).upper()
    title = str(alert.get("title", ""))
    serial = str(alert.get("serial", ""))
    verb = _VERBS.get(event, event)
    subject = _one_line(f"[pumpwatch] {priority} {verb}: {title} (pump {serial})")
    facts: list[tuple[str, str]] = [("Pump", serial)]
    if patient is not None:
        facts.append(("Patient", f"{patient.display_name} (MRN {patient.mrn})"))
    facts += [
        ("Priority", priority.lower()),
        ("Rule", str(alert.get("rule", ""))),
        ("Status", str(alert.get("status", ""))),
        ("Opened", local(alert.get("opened_at"), tz)),
        ("Updated", local(alert.get("updated_at"), tz)),
    ]
    escalation = alert.get("escalation")
    lead = f"{priority} priority {verb} at {clinic_name}"
    if isinstance(escalation, dict):
        minutes = escalation.get("unacknowledged_minutes")
        lead = (
            f"Not acknowledged after {minutes:g} minutes: this {priority} priority alert "
            f"at {clinic_name} is being escalated (reminder {escalation.get('count')})."
            if isinstance(minutes, int | float)
            else lead
        )
    if alert.get("resolution"):
        facts.append(("Resolution", str(alert["resolution"])))
    facts.append(("Alert id", str(alert.get("id", ""))))
    detail = str(alert.get("detail", ""))
    return _compose(subject, lead, title, facts, [detail])


def admin_email(event: str, data: dict[str, Any], *, clinic_name: str, tz: tzinfo) -> EmailContent:
    """Notices for the clinic's admin contacts about the notifications themselves."""
    if event == "webhook.disabled":
        subject = "[pumpwatch] A webhook was disabled"
        lead = f"pumpwatch stopped sending to one of {clinic_name}'s webhooks."
        facts = [
            ("Webhook id", str(data.get("webhook_id", ""))),
            ("URL", str(data.get("url", ""))),
            ("Disabled at", local(data.get("disabled_at"), tz)),
            ("Reason", str(data.get("reason", ""))),
        ]
        paragraphs = [
            "Deliveries still waiting for it were cancelled. Fix the receiver, then register "
            "the webhook again (POST /v1/webhooks)."
        ]
    else:
        subject = "[pumpwatch] A notification could not be delivered"
        lead = f"A {data.get('channel', '')} notification of {clinic_name} failed for good."
        facts = [
            ("Event", str(data.get("event", ""))),
            ("Channel", str(data.get("channel", ""))),
            ("Target", str(data.get("target", ""))),
            ("Attempts", str(data.get("attempts", ""))),
            ("First due", local(data.get("due_at"), tz)),
            ("Last error", str(data.get("last_error", ""))),
        ]
        if data.get("alert_id"):
            facts.append(("Alert id", str(data["alert_id"])))
        paragraphs = [
            "pumpwatch retried it with backoff and has given up. If it was an alert, make sure "
            "the people it was meant for know."
        ]
    return _compose(subject, lead, subject.removeprefix("[pumpwatch] "), facts, paragraphs)


def digest_email(
    *,
    clinic_name: str,
    day: date,
    tz: tzinfo,
    horizon_days: float,
    refills: list[DigestRefill],
    alerts: list[DigestAlert],
) -> EmailContent:
    subject = (
        f"[pumpwatch] Daily digest {day:%Y-%m-%d}: {len(refills)} refill"
        f"{'' if len(refills) == 1 else 's'} due within {horizon_days:g} days, "
        f"{len(alerts)} low-priority alert{'' if len(alerts) == 1 else 's'} open"
    )
    lead = f"Refills coming up and open low-priority alerts at {clinic_name}, {day:%A %d %B %Y}."
    refill_rows = [
        [
            r.serial,
            _patient(r.patient),
            local(r.low_alarm_at, tz),
            "reached" if r.days_to_low_alarm <= 0 else f"{r.days_to_low_alarm:.1f} days",
            f"{r.volume_ml:.1f} mL (alarm at {r.low_alarm_ml:g} mL)",
            local(r.visit_at, tz) if r.visit_at else "none booked",
        ]
        for r in refills
    ]
    alert_rows = [
        [a.serial, _patient(a.patient), a.title, a.rule, local(a.opened_at, tz)] for a in alerts
    ]
    sections = [
        (
            f"Refills due within {horizon_days:g} days (reservoir at its low alarm by then)",
            ["Pump", "Patient", "Low alarm", "In", "Reservoir", "Visit"],
            refill_rows,
        ),
        (
            "Open low-priority alerts",
            ["Pump", "Patient", "Alert", "Rule", "Opened"],
            alert_rows,
        ),
    ]
    text_parts = [lead, ""]
    html_parts = [f"<p>{_e(lead)}</p>"]
    for heading, columns, rows in sections:
        text_parts.append(heading + ":")
        html_parts.append(f"<h3>{_e(heading)}</h3>")
        if not rows:
            text_parts += ["  none", ""]
            html_parts.append("<p>None.</p>")
            continue
        text_parts += ["  " + " | ".join(row) for row in rows]
        text_parts.append("")
        head = "".join(f"<th align='left'>{_e(c)}</th>" for c in columns)
        body = "".join(
            "<tr>" + "".join(f"<td>{_e(cell)}</td>" for cell in row) + "</tr>" for row in rows
        )
        html_parts.append(
            f"<table border='1' cellpadding='4' cellspacing='0'><tr>{head}</tr>{body}</table>"
        )
    text_parts.append(_FOOTER)
    html_parts.append(f"<p><small>{_e(_FOOTER)}</small></p>")
    return EmailContent(subject, "\n".join(text_parts) + "\n", _page(subject, "".join(html_parts)))


def _one_line(text: str) -> str:
    """Header values are one line (a newline in a title must not start a new header)."""
    return " ".join(text.split())


def _patient(patient: PatientRef | None) -> str:
    return "-" if patient is None else f"{patient.display_name} (MRN {patient.mrn})"


def _compose(
    subject: str, lead: str, title: str, facts: list[tuple[str, str]], paragraphs: list[str]
) -> EmailContent:
    width = max(len(k) for k, _ in facts) + 1
    text = "\n".join(
        [
            lead,
            "",
            title,
            "",
            *(f"{(k + ':').ljust(width)} {v}" for k, v in facts),
            "",
            *[p for p in paragraphs if p],
            "",
            _FOOTER,
        ]
    )
    rows = "".join(f"<tr><th align='left'>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in facts)
    body = (
        f"<p>{_e(lead)}</p><h2>{_e(title)}</h2><table cellpadding='4'>{rows}</table>"
        + "".join(f"<p>{_e(p)}</p>" for p in paragraphs if p)
        + f"<p><small>{_e(_FOOTER)}</small></p>"
    )
    return EmailContent(subject, text + "\n", _page(subject, body))


def _page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{_e(title)}</title></head><body>{body}</body></html>"
    )


def _e(text: str) -> str:
    return html.escape(text, quote=True)
