"""The alert lifecycle as a plan: what to change, given what holds now and what is stored.

States ``open → acknowledged → resolved``. At most one unresolved alert per (pump, condition):
the findings arrive folded, one per condition (:mod:`services.domain.conditions`). A finding
without an unresolved alert opens one — or reopens the condition's last alert if that resolved
within the flapping window; a finding about a past event (``occurrence``) whose alert was
resolved raises nothing again. A finding more severe than its alert (a higher priority, or at
the same priority a further stage: reservoir low → empty, ERI → EOS) escalates the alert, its
rule becoming the new stage (an acknowledged alert opens again: someone must look at the worse
condition); a less severe one eases it. An unresolved alert whose condition no longer holds at
all is resolved, with the reason. Pure: the engine applies the plan in one transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from services.domain.alerting import Finding, Priority, Rule
from services.domain.conditions import condition_of, severity

Status = Literal["open", "acknowledged", "resolved"]
Action = Literal["opened", "reopened", "escalated", "eased", "resolved"]


@dataclass(frozen=True, slots=True)
class StoredAlert:
    id: str
    rule: Rule
    priority: Priority
    status: Status
    title: str
    detail: str
    resolved_at: datetime | None = None
    occurrence: str | None = None

    @property
    def condition(self) -> str:
        return condition_of(self.rule)


@dataclass(frozen=True, slots=True)
class Change:
    """One state change (recorded in history, sent through the outbox)."""

    action: Action
    rule: Rule
    """The alert's rule after the change (escalation may move it to a further stage)."""
    alert_id: str | None
    """None: a new alert."""
    from_status: Status | None
    to_status: Status
    from_priority: Priority | None
    to_priority: Priority
    reason: str
    finding: Finding | None
    """What holds now (None when resolving)."""


@dataclass(frozen=True, slots=True)
class Refresh:
    """New words or numbers for an unchanged alert ("due in 6 days" becomes "5 days"): no
    history, no notification."""

    alert_id: str
    finding: Finding


Plan = tuple[list[Change], list[Refresh]]


def plan(
    findings: Iterable[Finding],
    stored: Iterable[StoredAlert],
    *,
    now: datetime,
    flap_window: timedelta,
    resolution: Callable[[Rule], str],
) -> Plan:
    """``findings``: one per condition. ``stored``: per condition, the unresolved alert if there
    is one, else the last resolved."""
    by_condition = {alert.condition: alert for alert in stored}
    changes: list[Change] = []
    refreshes: list[Refresh] = []
    holding = set()
    for finding in findings:
        condition = condition_of(finding.rule)
        holding.add(condition)
        alert = by_condition.get(condition)
        if alert is None or alert.status == "resolved":
            if _handled(finding, alert):
                continue
            changes.append(_open(finding, alert, now, flap_window))
        elif (finding.rule, finding.priority) != (alert.rule, alert.priority):
            changes.append(_reprioritise(finding, alert))
        elif (finding.title, finding.detail, finding.occurrence) != (
            alert.title,
            alert.detail,
            alert.occurrence,
        ):
            refreshes.append(Refresh(alert.id, finding))
    for condition, alert in sorted(by_condition.items()):
        if alert.status != "resolved" and condition not in holding:
            changes.append(
                Change(
                    "resolved",
                    alert.rule,
                    alert.id,
                    alert.status,
                    "resolved",
                    alert.priority,
                    alert.priority,
                    resolution(alert.rule),
                    None,
                )
            )
    return changes, refreshes


def _handled(finding: Finding, last: StoredAlert | None) -> bool:
    """A finding about a past event whose alert was already resolved (e.g. by a clinician)."""
    return (
        finding.occurrence is not None
        and last is not None
        and last.occurrence == finding.occurrence
    )


def _open(
    finding: Finding, last: StoredAlert | None, now: datetime, flap_window: timedelta
) -> Change:
    recent = (
        last is not None and last.resolved_at is not None and now - last.resolved_at <= flap_window
    )
    if recent:
        assert last is not None
        return Change(
            "reopened",
            finding.rule,
            last.id,
            "resolved",
            "open",
            last.priority,
            finding.priority,
            f"the condition returned within {flap_window.total_seconds() / 3600:g} h of its "
            f"alert resolving: {finding.title}",
            finding,
        )
    return Change(
        "opened", finding.rule, None, None, "open", None, finding.priority, finding.title, finding
    )


def _reprioritise(finding: Finding, alert: StoredAlert) -> Change:
    worse = severity(finding.rule, finding.priority) > severity(alert.rule, alert.priority)
    return Change(
        "escalated" if worse else "eased",
        finding.rule,
        alert.id,
        alert.status,
        "open" if worse else alert.status,
        alert.priority,
        finding.priority,
        f"{'worse' if worse else 'less urgent'}: {finding.title}"
        + ("" if finding.rule is alert.rule else f" (was: {alert.title})"),
        finding,
    )
