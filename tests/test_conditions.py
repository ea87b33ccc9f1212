"""One clinical condition is one alert: the folding of findings (pure), and the engine on a real
PostgreSQL giving each condition one alert that escalates as it worsens."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from services.alerts.engine import Engine
from services.alerts.metrics import AlertsMetrics
from services.domain.alerting import Finding, Priority, Rule, RuleSettings
from services.domain.conditions import LADDERS, condition_of, fold
from services.storage.database import prepare_connection
from tests import alert_fixtures as fx

SERIAL = "NGPCOND001"


def _finding(rule: Rule, priority: Priority, **facts: Any) -> Finding:
    return Finding(rule, priority, f"{rule.value} title", f"{rule.value} detail", facts)


def test_an_empty_reservoir_and_what_it_sets_off_is_one_finding_named_by_its_cause() -> None:
    folded = fold(
        [
            _finding(Rule.FLOW_STOPPED, Priority.HIGH, alarms=["empty_reservoir"]),
            _finding(Rule.REFILL_DUE, Priority.HIGH),
            _finding(Rule.RESERVOIR_EMPTY, Priority.HIGH),
            _finding(Rule.RESERVOIR_LOW, Priority.HIGH),
            _finding(Rule.DOSE_ESCALATION, Priority.LOW),
        ]
    )
    assert [(f.rule, f.priority) for f in folded] == [
        (Rule.DOSE_ESCALATION, Priority.LOW),
        (Rule.RESERVOIR_EMPTY, Priority.HIGH),
    ]
    empty = folded[1]
    assert empty.title == "reservoir_empty title"
    assert "flow_stopped title (high)" in empty.detail
    assert "refill_due title (high)" in empty.detail
    assert empty.facts["parts"][0] == "reservoir_empty"
    assert set(empty.facts["parts"]) == {
        "reservoir_empty",
        "reservoir_low",
        "refill_due",
        "flow_stopped",
    }


def test_a_second_cause_beside_an_empty_reservoir_stays_an_alert_of_its_own() -> None:
    folded = fold(
        [
            _finding(Rule.FLOW_STOPPED, Priority.HIGH, alarms=["motor_stall", "empty_reservoir"]),
            _finding(Rule.RESERVOIR_EMPTY, Priority.HIGH),
        ]
    )
    assert [f.rule for f in folded] == [Rule.FLOW_STOPPED, Rule.RESERVOIR_EMPTY]
    # An alarm whose cause does not hold (the reservoir rule sees fluid) is not explained away.
    alone = fold([_finding(Rule.FLOW_STOPPED, Priority.HIGH, alarms=["empty_reservoir"])])
    assert [f.rule for f in alone] == [Rule.FLOW_STOPPED]


def test_end_of_service_is_the_battery_condition_and_takes_the_highest_priority() -> None:
    folded = fold(
        [
            _finding(Rule.FLOW_STOPPED, Priority.HIGH, alarms=["eos"]),
            _finding(Rule.BATTERY_EOS, Priority.HIGH),
        ]
    )
    assert [(f.rule, f.priority) for f in folded] == [(Rule.BATTERY_EOS, Priority.HIGH)]
    # The highest priority of the parts, whichever part leads.
    mixed = fold(
        [
            _finding(Rule.REFILL_DUE_WORST_CASE, Priority.MEDIUM),
            _finding(Rule.REFILL_DUE, Priority.LOW),
        ]
    )
    assert [(f.rule, f.priority) for f in mixed] == [(Rule.REFILL_DUE_WORST_CASE, Priority.MEDIUM)]


def test_every_rule_has_one_condition_and_ladders_do_not_overlap() -> None:
    on_ladders = [rule for ladder in LADDERS.values() for rule in ladder]
    assert len(on_ladders) == len(set(on_ladders))
    for rule in Rule:
        expected = next((name for name, ladder in LADDERS.items() if rule in ladder), rule.value)
        assert condition_of(rule) == expected


# -- the engine -------------------------------------------------------------------------------


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4, init=prepare_connection)
    assert pool is not None
    yield pool
    await pool.close()


async def test_the_database_names_each_rules_condition_as_the_engine_does(
    pool: asyncpg.Pool,
) -> None:
    for rule in Rule:
        assert await pool.fetchval("SELECT rule_condition($1)", rule.value) == condition_of(rule)


async def _evaluate(pool: asyncpg.Pool) -> None:
    engine = Engine(
        pool,
        settings=RuleSettings(),
        flap_window=timedelta(hours=6),
        data_clock=False,
        metrics=AlertsMetrics(),
    )
    result = await engine.evaluate([SERIAL])
    assert result.failed == []


async def _unresolved(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT id, rule, priority, status, condition FROM alerts "
        "WHERE serial = $1 AND status <> 'resolved' ORDER BY opened_at",
        SERIAL,
    )


async def _story(pool: asyncpg.Pool, alert_id: Any) -> tuple[list[str], list[str]]:
    history = await pool.fetch(
        "SELECT action FROM alert_history WHERE alert_id = $1 ORDER BY id", alert_id
    )
    events = await pool.fetch("SELECT event FROM outbox WHERE alert_id = $1 ORDER BY id", alert_id)
    return [h["action"] for h in history], [e["event"] for e in events]


@pytest.mark.parametrize(
    ("alarms", "volume_ml", "battery", "rule"),
    [
        (("empty_reservoir",), 0.0, "ok", "reservoir_empty"),
        (("eos",), 12.0, "eos", "battery_eos"),
        (("motor_stall",), 12.0, "ok", "flow_stopped"),
        (("catheter_occlusion",), 12.0, "ok", "flow_stopped"),
    ],
    ids=["empty-reservoir", "end-of-service", "motor-stall", "occlusion"],
)
async def test_each_stopping_condition_gives_exactly_one_open_alert(
    pool: asyncpg.Pool, alarms: tuple[str, ...], volume_ml: float, battery: str, rule: str
) -> None:
    now = datetime.now(UTC)
    async with pool.acquire() as conn:
        await fx.pump(conn, SERIAL)
        await fx.refill_event(conn, SERIAL, now - timedelta(days=20), residual_ml=2.0)
        await fx.reading(
            conn,
            SERIAL,
            now - timedelta(minutes=30),
            volume_ml=volume_ml,
            battery_status=battery,
            alarms=alarms,
        )
    await _evaluate(pool)
    opened = await _unresolved(pool)
    assert [(a["rule"], a["priority"]) for a in opened] == [(rule, "high")], opened


async def test_eri_then_eos_escalates_the_battery_alert_and_never_announces_an_improvement(
    pool: asyncpg.Pool,
) -> None:
    now = datetime.now(UTC)
    async with pool.acquire() as conn:
        await fx.pump(conn, SERIAL)
        await fx.refill_event(conn, SERIAL, now - timedelta(days=20), residual_ml=2.0)
        await fx.reading(conn, SERIAL, now - timedelta(hours=2), battery_status="eri")
    await _evaluate(pool)
    [eri] = await _unresolved(pool)
    assert (eri["rule"], eri["priority"], eri["condition"]) == ("battery_eri", "medium", "battery")
    async with pool.acquire() as conn:
        await fx.reading(
            conn, SERIAL, now - timedelta(hours=1), battery_status="eos", alarms=("eos",)
        )
    await _evaluate(pool)
    [eos] = await _unresolved(pool)
    assert eos["id"] == eri["id"]
    assert (eos["rule"], eos["priority"], eos["status"]) == ("battery_eos", "high", "open")
    actions, events = await _story(pool, eos["id"])
    assert actions == ["opened", "escalated"]
    assert events == ["alert.opened", "alert.escalated"]
    assert await pool.fetchval("SELECT count(*) FROM outbox WHERE event = 'alert.resolved'") == 0
    reason = await pool.fetchval(
        "SELECT reason FROM alert_history WHERE alert_id = $1 AND action = 'escalated'", eos["id"]
    )
    assert reason.startswith("worse: ")


async def test_low_then_empty_escalates_the_reservoir_alert(pool: asyncpg.Pool) -> None:
    now = datetime.now(UTC)
    async with pool.acquire() as conn:
        await fx.pump(conn, SERIAL)
        await fx.refill_event(conn, SERIAL, now - timedelta(days=90), residual_ml=2.0)
        await fx.reading(conn, SERIAL, now - timedelta(minutes=40), volume_ml=1.5)  # below 2 mL
    await _evaluate(pool)
    opened = await _unresolved(pool)
    assert len(opened) == 1, [(a["rule"], a["priority"]) for a in opened]
    [low] = opened
    assert (low["rule"], low["priority"], low["condition"]) == (
        "reservoir_low",
        "high",
        "reservoir",
    )
    await pool.execute(
        "UPDATE alerts SET status = 'acknowledged', acknowledged_at = now() WHERE id = $1",
        low["id"],
    )
    async with pool.acquire() as conn:
        await fx.reading(
            conn, SERIAL, now - timedelta(minutes=10), volume_ml=0.0, alarms=("empty_reservoir",)
        )
    await _evaluate(pool)
    [empty] = await _unresolved(pool)
    assert empty["id"] == low["id"]
    # Worse: a further stage at the same priority, open again for someone to look.
    assert (empty["rule"], empty["priority"], empty["status"]) == (
        "reservoir_empty",
        "high",
        "open",
    )
    actions, events = await _story(pool, empty["id"])
    assert actions == ["opened", "escalated"]
    assert events == ["alert.opened", "alert.escalated"]
