"""One clinical condition is one alert.

The rules judge one question each, so one condition can set off several of them: a reservoir
running out is first "refill due", then "at the low alarm", then "empty"; a battery at its
elective replacement indicator later reaches end of service; and an empty reservoir or an
exhausted battery *is* "no drug flowing". A clinic must see each condition once, named by its
cause, with the highest priority of its parts — and a condition that worsens must escalate its
alert, never resolve it as if the pump got better (docs/clinical-background.md, "Alert
priorities"). This module folds the findings of one evaluation into one finding per condition.

- A *ladder* is a condition whose rules are stages of it, least advanced first; its alert is
  about the most advanced stage that holds (and changes rule as the condition moves).
- A *consequence* (``flow_stopped``) folds into its cause's condition when every stopping alarm
  it reports is explained by a cause that holds (``empty_reservoir`` by ``reservoir_empty``,
  ``eos`` by ``battery_eos``); a stall or an occlusion beside an empty reservoir stays an alert
  of its own: it is a second cause.
- Every other rule is a condition of its own, keyed by its code.

Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from services.domain.alerting import Finding, Priority, Rule

LADDERS: dict[str, tuple[Rule, ...]] = {
    "reservoir": (
        Rule.REFILL_DUE_WORST_CASE,
        Rule.REFILL_DUE,
        Rule.RESERVOIR_LOW,
        Rule.RESERVOIR_EMPTY,
    ),
    "battery": (Rule.BATTERY_ERI, Rule.BATTERY_EOS),
}
"""Conditions whose rules are stages, least advanced first."""

CAUSES: dict[str, Rule] = {"empty_reservoir": Rule.RESERVOIR_EMPTY, "eos": Rule.BATTERY_EOS}
"""Stopping alarms that a cause's rule explains: no drug flows *because* of it."""

_CONDITION = {rule: name for name, ladder in LADDERS.items() for rule in ladder}
_STAGE = {rule: stage for ladder in LADDERS.values() for stage, rule in enumerate(ladder)}


def condition_of(rule: Rule) -> str:
    """The condition an alert of this rule is about (stable: the alert's identity)."""
    return _CONDITION.get(rule, rule.value)


def severity(rule: Rule, priority: Priority) -> tuple[int, int]:
    """How far a condition has gone: its priority first, then the stage of its ladder."""
    return priority.value, _STAGE.get(rule, 0)


def fold(findings: Iterable[Finding]) -> list[Finding]:
    """One finding per condition, sorted by condition: the most severe part leads (its rule,
    title and detail), with the highest priority of all parts and the others named."""
    found = list(findings)
    holding = {f.rule for f in found}
    groups: dict[str, list[Finding]] = {}
    for finding in found:
        cause = _explained_by(finding, holding)
        groups.setdefault(condition_of(cause or finding.rule), []).append(finding)
    return [_merged(parts) for _, parts in sorted(groups.items())]


def _explained_by(finding: Finding, holding: set[Rule]) -> Rule | None:
    """The one cause that explains all of a ``flow_stopped`` finding's alarms, if it holds."""
    if finding.rule is not Rule.FLOW_STOPPED:
        return None
    alarms = finding.facts.get("alarms") or []
    causes = {CAUSES.get(alarm) for alarm in alarms}
    if len(causes) != 1:
        return None
    (cause,) = causes
    return cause if cause is not None and cause in holding else None


def _merged(parts: list[Finding]) -> Finding:
    ranked = sorted(parts, key=_rank, reverse=True)
    lead = ranked[0]
    if len(ranked) == 1:
        return lead
    priority = max(p.priority for p in parts)
    others = "; ".join(f"{p.title} ({p.priority.label})" for p in ranked[1:])
    return replace(
        lead,
        priority=priority,
        detail=f"{lead.detail}\n\nThe same condition also shows: {others}.",
        facts=lead.facts | {"parts": [p.rule.value for p in ranked]},
    )


def _rank(finding: Finding) -> tuple[int, int, int]:
    # The cause leads its consequences (flow_stopped, not on a ladder, ranks below).
    on_ladder = 1 if finding.rule in _STAGE else 0
    return on_ladder, *severity(finding.rule, finding.priority)
