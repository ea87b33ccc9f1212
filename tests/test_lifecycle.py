"""The alert lifecycle planner, pure."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from services.alerts.lifecycle import Status, StoredAlert, plan
from services.domain.alerting import Finding, Priority, Rule

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
WINDOW = timedelta(hours=6)


def finding(
    rule: Rule = Rule.REFILL_DUE,
    priority: Priority = Priority.LOW,
    title: str = "Refill due in 10 days",
) -> Finding:
    return Finding(rule, priority, title, "detail: refill the pump", {"days": 10})


def stored(
    *,
    rule: Rule = Rule.REFILL_DUE,
    priority: Priority = Priority.LOW,
    status: Status = "open",
    resolved_at: datetime | None = None,
    title: str = "Refill due in 10 days",
) -> StoredAlert:
    return StoredAlert(
        "a1",
        rule,
        priority,
        status,
        title,
        "detail: refill the pump",
        resolved_at,
    )


def reason(rule: Rule) -> str:
    return f"{rule.value} no longer holds"


def test_a_new_condition_opens_an_alert() -> None:
    changes, refreshes = plan([finding()], [], now=NOW, flap_window=WINDOW, resolution=reason)
    assert [(c.action, c.alert_id, c.to_status, c.to_priority) for c in changes] == [
        ("opened", None, "open", Priority.LOW)
    ]
    assert refreshes == []


def test_an_unchanged_condition_changes_nothing() -> None:
    assert plan([finding()], [stored()], now=NOW, flap_window=WINDOW, resolution=reason) == ([], [])


def test_new_words_for_the_same_condition_refresh_without_a_change() -> None:
    changes, refreshes = plan(
        [finding(title="Refill due in 9 days")],
        [stored()],
        now=NOW,
        flap_window=WINDOW,
        resolution=reason,
    )
    assert changes == []
    assert [(r.alert_id, r.finding.title) for r in refreshes] == [("a1", "Refill due in 9 days")]


def test_a_worse_condition_escalates_and_reopens_an_acknowledged_alert() -> None:
    changes, _ = plan(
        [finding(priority=Priority.HIGH)],
        [stored(status="acknowledged", priority=Priority.MEDIUM)],
        now=NOW,
        flap_window=WINDOW,
        resolution=reason,
    )
    assert [
        (c.action, c.from_status, c.to_status, c.from_priority, c.to_priority) for c in changes
    ] == [("escalated", "acknowledged", "open", Priority.MEDIUM, Priority.HIGH)]


def test_an_easier_condition_eases_and_keeps_the_status() -> None:
    changes, _ = plan(
        [finding(priority=Priority.LOW)],
        [stored(status="acknowledged", priority=Priority.MEDIUM)],
        now=NOW,
        flap_window=WINDOW,
        resolution=reason,
    )
    assert [(c.action, c.to_status, c.to_priority) for c in changes] == [
        ("eased", "acknowledged", Priority.LOW)
    ]


def test_a_condition_that_ends_resolves_its_alert_with_the_reason() -> None:
    changes, _ = plan(
        [], [stored(status="acknowledged")], now=NOW, flap_window=WINDOW, resolution=reason
    )
    assert [(c.action, c.alert_id, c.to_status, c.reason) for c in changes] == [
        ("resolved", "a1", "resolved", "refill_due no longer holds")
    ]


def test_a_resolved_alert_stays_resolved_when_nothing_holds() -> None:
    assert plan(
        [],
        [stored(status="resolved", resolved_at=NOW - timedelta(hours=1))],
        now=NOW,
        flap_window=WINDOW,
        resolution=reason,
    ) == ([], [])


def test_firing_again_within_the_flap_window_reopens_the_last_alert() -> None:
    last = stored(status="resolved", resolved_at=NOW - WINDOW)
    changes, _ = plan([finding()], [last], now=NOW, flap_window=WINDOW, resolution=reason)
    assert [(c.action, c.alert_id, c.from_status, c.to_status) for c in changes] == [
        ("reopened", "a1", "resolved", "open")
    ]


def test_firing_again_after_the_flap_window_opens_a_new_alert() -> None:
    last = stored(status="resolved", resolved_at=NOW - WINDOW - timedelta(seconds=1))
    changes, _ = plan([finding()], [last], now=NOW, flap_window=WINDOW, resolution=reason)
    assert [(c.action, c.alert_id) for c in changes] == [("opened", None)]


def test_rules_are_planned_independently() -> None:
    changes, _ = plan(
        [finding(Rule.FLOW_STOPPED, Priority.HIGH, "Flow stopped")],
        [
            stored(rule=Rule.REFILL_DUE),
            stored(
                rule=Rule.DOSE_ESCALATION, status="resolved", resolved_at=NOW - timedelta(days=3)
            ),
        ],
        now=NOW,
        flap_window=WINDOW,
        resolution=reason,
    )
    assert sorted((c.action, c.rule) for c in changes) == [
        ("opened", Rule.FLOW_STOPPED),
        ("resolved", Rule.REFILL_DUE),
    ]


def test_a_past_event_whose_alert_was_resolved_raises_nothing_again() -> None:
    event = Finding(
        Rule.REFILL_DISCREPANCY,
        Priority.MEDIUM,
        "Refill: 3 mL less",
        "d",
        {},
        "refill 2026-11-20T10:00:00+00:00",
    )
    resolved = StoredAlert(
        "a1",
        Rule.REFILL_DISCREPANCY,
        Priority.MEDIUM,
        "resolved",
        "Refill: 3 mL less",
        "d",
        NOW - timedelta(days=2),
        "refill 2026-11-20T10:00:00+00:00",
    )
    assert plan([event], [resolved], now=NOW, flap_window=WINDOW, resolution=reason) == ([], [])
    later = Finding(
        Rule.REFILL_DISCREPANCY,
        Priority.HIGH,
        "Refill: 3 mL less again",
        "d",
        {},
        "refill 2026-11-24T10:00:00+00:00",
    )
    changes, _ = plan([later], [resolved], now=NOW, flap_window=WINDOW, resolution=reason)
    assert [(c.action, c.to_priority) for c in changes] == [("opened", Priority.HIGH)]
