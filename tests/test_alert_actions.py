"""What people may do with an alert (contract 1.1): a condition that still holds cannot be
resolved (409, saying why); reminders can be snoozed within limits, never silenced; a snoozed
high alert is not escalated until the snooze ends, and a worse condition ends the snooze."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from tests import alert_fixtures as fx
from tests.api_support import Api, running_api
from tests.notify_support import clinic_with_pump, evaluate, pool_for, running, settings, stall

SERIAL = "NGPACT0001"
ROUTING = {
    "escalation": {"contacts": ["consultant@clinic.example"], "after_minutes": 15},
    "digest": {"enabled": False},
}


@dataclass
class Setup:
    api: Api
    pool: asyncpg.Pool
    clinic: str
    nurse: str


@pytest.fixture
async def setup(database_url: str) -> AsyncIterator[Setup]:
    async with running_api(database_url) as api, pool_for(database_url) as pool:
        clinic, _ = await clinic_with_pump(pool, SERIAL, notification_settings=ROUTING)
        yield Setup(api, pool, clinic, await api.key("clinician", clinic))


async def _open(s: Setup) -> dict[str, Any]:
    answer = await s.api.call("GET", "/v1/alerts", s.nurse, params={"serial": SERIAL})
    [alert] = [a for a in answer.json()["items"] if a["status"] != "resolved"]
    return dict(alert)


async def test_a_condition_that_still_holds_cannot_be_resolved_and_the_answer_says_why(
    setup: Setup,
) -> None:
    s = setup
    await stall(s.pool, SERIAL)
    await evaluate(s.pool, SERIAL)
    alert = await _open(s)
    refused = await s.api.call(
        "POST", f"/v1/alerts/{alert['id']}/resolve", s.nurse, json={"note": "done"}
    )
    assert refused.status_code == 409, refused.text
    problem = refused.json()
    assert problem["type"].endswith("/condition-holds")
    assert "the condition still holds" in problem["detail"]
    assert alert["title"] in problem["detail"]
    after = await s.api.call("GET", f"/v1/alerts/{alert['id']}", s.nurse)
    assert after.json()["status"] == "open"
    assert [h["action"] for h in after.json()["history"]] == ["opened"]
    # Clean readings clear the stall: then a person may resolve it (or the engine will).
    now = datetime.now(UTC)
    async with s.pool.acquire() as conn:
        for seconds in (45, 30, 15):  # after the stall (a minute ago), before now
            await fx.reading(conn, SERIAL, now - timedelta(seconds=seconds))
    resolved = await s.api.call(
        "POST",
        f"/v1/alerts/{alert['id']}/resolve",
        s.nurse,
        json={"note": "called Jane Roe at home"},
    )
    assert resolved.status_code == 200, resolved.text
    assert resolved.json()["status"] == "resolved"
    assert resolved.json()["resolution"] == "called Jane Roe at home"
    # The fleet role sees the alert, not who handled it nor their words (they may name a
    # patient).
    fleet = await s.api.key("fleet")
    seen = await s.api.call("GET", "/v1/alerts", fleet, params={"serial": SERIAL})
    [fleet_view] = seen.json()["items"]
    assert fleet_view["status"] == "resolved"
    assert (fleet_view["resolution"], fleet_view["resolved_by"]) == (None, None)
    assert fleet_view["acknowledged_by"] is None
    assert "Jane Roe" not in seen.text


async def test_a_discrepancy_is_a_persons_to_judge_and_can_be_resolved(setup: Setup) -> None:
    s = setup
    now = datetime.now(UTC)
    async with s.pool.acquire() as conn:
        await fx.refill_event(conn, SERIAL, now - timedelta(days=30), residual_ml=2.0)
        await fx.reading(conn, SERIAL, now - timedelta(days=1), volume_ml=32.0)
        # 6 mL less left than expected: the discrepancy rule fires about this refill.
        await fx.refill_event(
            conn, SERIAL, now - timedelta(hours=1), residual_ml=26.0, expected_residual_ml=32.0
        )
    await evaluate(s.pool, SERIAL)
    answer = await s.api.call("GET", "/v1/alerts", s.nurse, params={"serial": SERIAL})
    [discrepancy] = [a for a in answer.json()["items"] if a["rule"] == "refill_discrepancy"]
    resolved = await s.api.call(
        "POST",
        f"/v1/alerts/{discrepancy['id']}/resolve",
        s.nurse,
        json={"note": "bolus given on the ward, not logged"},
    )
    assert resolved.status_code == 200, resolved.text


async def test_snooze_limits_by_priority_and_the_history_names_who_and_until(
    setup: Setup,
) -> None:
    s = setup
    await stall(s.pool, SERIAL)
    await evaluate(s.pool, SERIAL)
    alert = await _open(s)
    assert alert["priority"] == "high"
    path = f"/v1/alerts/{alert['id']}/snooze"
    now = datetime.now(UTC)

    async def snooze(until: datetime | str, note: str = "called the patient") -> Any:
        stamp = until if isinstance(until, str) else until.isoformat()
        return await s.api.call("POST", path, s.nurse, json={"until": stamp, "note": note})

    too_long = await snooze(now + timedelta(hours=4, minutes=1))
    assert too_long.status_code == 422
    assert "at most 4 h" in too_long.json()["detail"]
    assert (await snooze(now - timedelta(minutes=1))).status_code == 422
    assert (await snooze("2026-12-07T10:00:00")).status_code == 422  # no offset
    assert (await snooze(now + timedelta(hours=1), note="")).status_code == 422
    ok = await snooze(now + timedelta(hours=3, minutes=59))
    assert ok.status_code == 200, ok.text
    body = ok.json()
    assert body["status"] == "open"  # snoozed, not silenced and not acknowledged
    assert body["snoozed_by"]["type"] == "key"
    assert body["snooze_note"] == "called the patient"
    assert body["history"][-1]["action"] == "snoozed"
    assert "called the patient" in body["history"][-1]["reason"]
    fleet = await s.api.key("fleet")
    seen = await s.api.call("GET", "/v1/alerts", fleet, params={"serial": SERIAL})
    assert seen.json()["items"][0]["snooze_note"] is None  # no free text for the fleet role
    assert seen.json()["items"][0]["snoozed_by"] is None

    async with s.pool.acquire() as conn:  # a medium alert of the same pump may wait up to 24 h
        await conn.execute(
            "UPDATE alerts SET priority = 'medium' WHERE id = $1", uuid.UUID(alert["id"])
        )
    assert (await snooze(now + timedelta(hours=24, minutes=1))).status_code == 422
    assert (await snooze(now + timedelta(hours=23))).status_code == 200
    resolved_id = await s.pool.fetchval(
        "INSERT INTO alerts (serial, rule, priority, status, title, detail, opened_at, "
        "updated_at, condition_at, resolved_at) VALUES ($1, 'dose_escalation', 'low', "
        "'resolved', 't', 'd', now(), now(), now(), now()) RETURNING id",
        SERIAL,
    )
    gone = await s.api.call(
        "POST",
        f"/v1/alerts/{resolved_id}/snooze",
        s.nurse,
        json={"until": (now + timedelta(hours=1)).isoformat(), "note": "x"},
    )
    assert gone.status_code == 409


async def test_a_snoozed_high_alert_is_escalated_only_after_the_snooze_ends(
    setup: Setup, database_url: str
) -> None:
    s = setup
    await stall(s.pool, SERIAL)
    await evaluate(s.pool, SERIAL)
    alert = await _open(s)
    opened = await s.pool.fetchval(
        "SELECT at FROM alert_history WHERE alert_id = $1 AND action = 'opened'",
        uuid.UUID(alert["id"]),
    )
    until = datetime.now(UTC) + timedelta(hours=2)
    snoozed = await s.api.call(
        "POST",
        f"/v1/alerts/{alert['id']}/snooze",
        s.nurse,
        json={"until": until.isoformat(), "note": "on my way to the patient"},
    )
    assert snoozed.status_code == 200, snoozed.text

    @dataclass
    class Clock:
        now: datetime

        def __call__(self) -> datetime:
            return self.now

    clock = Clock(opened + timedelta(minutes=30))  # escalation was due at 15 minutes
    async with running(s.pool, settings(database_url), clock=clock, loops=False) as worker:
        escalate = worker.notifications.escalate_now
        assert await escalate() == 0  # snoozed
        clock.now = until - timedelta(seconds=1)
        assert await escalate() == 0
        clock.now = until
        assert await escalate() == 1  # the snooze ended: the reminder goes out
    events = [r["event"] for r in await s.pool.fetch("SELECT event FROM outbox ORDER BY id")]
    assert events == ["alert.opened", "alert.unacknowledged"]


async def test_a_worse_condition_ends_a_snooze(setup: Setup) -> None:
    s = setup
    now = datetime.now(UTC)
    async with s.pool.acquire() as conn:
        await fx.refill_event(conn, SERIAL, now - timedelta(days=20), residual_ml=2.0)
        await fx.reading(conn, SERIAL, now - timedelta(minutes=20), battery_status="eri")
    await evaluate(s.pool, SERIAL)
    eri = await _open(s)
    assert eri["rule"] == "battery_eri"
    snoozed = await s.api.call(
        "POST",
        f"/v1/alerts/{eri['id']}/snooze",
        s.nurse,
        json={"until": (now + timedelta(hours=12)).isoformat(), "note": "surgery being booked"},
    )
    assert snoozed.json()["snoozed_until"] is not None
    async with s.pool.acquire() as conn:
        await fx.reading(
            conn, SERIAL, now - timedelta(minutes=5), battery_status="eos", alarms=("eos",)
        )
    await evaluate(s.pool, SERIAL)
    eos = await _open(s)
    assert (eos["id"], eos["rule"], eos["priority"]) == (eri["id"], "battery_eos", "high")
    assert eos["snoozed_until"] is None
