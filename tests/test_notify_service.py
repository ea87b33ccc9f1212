"""Notifications from the real ``pumpwatch alerts`` process: end to end from ingest to a
webhook, nothing lost when the process is SIGKILLed mid-delivery, a clean stop."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
from standardwebhooks.webhooks import Webhook

from lab.embedded import EmbeddedBroker
from services.domain.webhook_urls import new_secret
from tests import alert_fixtures as fx
from tests.notify_support import Reply, add_pump, add_webhook, clinic_with_pump, pool_for, receiver
from tests.support import (
    IngestProcess,
    alerts_process,
    encode,
    fetch,
    telemetry,
    wait_for_count,
)
from tests.test_ingest import publish

ENV = {
    "PUMPWATCH_WEBHOOK_ALLOW_HOSTS": "127.0.0.1",
    "PUMPWATCH_NOTIFY_RETRY_FIRST_S": "0.1",
    "PUMPWATCH_NOTIFY_RETRY_MAX_S": "0.5",
}


@pytest.fixture
def ingest(database_url: str, broker: EmbeddedBroker, tmp_path: Path) -> Iterator[IngestProcess]:
    process = IngestProcess(database_url, broker, tmp_path / "ingest.log")
    process.start()
    yield process
    process.stop_quietly()


async def test_a_stalled_motor_reaches_the_clinic_webhook_through_ingest_and_alerts(
    ingest: IngestProcess, database_url: str, broker: EmbeddedBroker, tmp_path: Path
) -> None:
    serial = "NGP900001A"
    secret = new_secret()
    with receiver() as hook:
        async with pool_for(database_url) as pool:
            clinic_id, _ = await clinic_with_pump(pool, serial)
            await add_webhook(pool, clinic_id, hook.url(), secret)
        alerts = alerts_process(database_url, broker, tmp_path / "alerts.log", **ENV)
        try:
            alerts.start()
            message = telemetry(
                serial=serial,
                alarms=["motor_stall"],
                recorded_at=datetime.now(UTC) - timedelta(seconds=5),
            )
            publish(broker, [(f"pumps/{serial}/telemetry", encode(message))])
            alerts.wait_metric(
                "pumpwatch_alerts_notify_deliveries_total", 1, channel="webhook", status="delivered"
            )
            alerts.wait_metric(
                "pumpwatch_alerts_notify_latency_seconds_count", 1, channel="webhook"
            )
            alerts.wait_metric_equal("pumpwatch_alerts_notify_outbox_backlog_events", 0)
            assert alerts.terminate() == 0
        finally:
            alerts.stop_quietly()
        [request] = hook.received
        body = Webhook(secret).verify(request.body, request.headers)
        assert (body["type"], body["data"]["serial"]) == ("alert.opened", serial)


async def test_a_worker_killed_mid_delivery_loses_nothing(
    database_url: str, broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """Five alerts; the receiver holds the first requests without answering and the service
    is SIGKILLed while they are in flight. After a restart every delivery arrives (at least
    once: the same webhook-id again), and the lost attempts are recorded as interrupted."""
    serials = [f"NGP90001{i}A" for i in range(5)]
    with receiver() as hook:
        hook.replies = [Reply(204, delay_s=30)] * len(serials)
        async with pool_for(database_url) as pool:
            clinic_id, _ = await clinic_with_pump(pool, serials[0])
            for serial in serials[1:]:
                await add_pump(pool, clinic_id, serial)
            await add_webhook(pool, clinic_id, hook.url(), new_secret())
            async with pool.acquire() as conn:
                for serial in serials:
                    await fx.reading(
                        conn,
                        serial,
                        datetime.now(UTC) - timedelta(minutes=1),
                        alarms=("motor_stall",),
                    )
        env = ENV | {"PUMPWATCH_NOTIFY_LEASE_S": "3", "PUMPWATCH_WEBHOOK_TIMEOUT_S": "2"}
        first = alerts_process(database_url, broker, tmp_path / "a1.log", **env)
        second = alerts_process(database_url, broker, tmp_path / "a2.log", **env)
        try:
            first.start()
            await wait_for_count(database_url, "SELECT count(*) FROM alerts", len(serials))
            # Wait until every delivery is in flight at the receiver, then kill.
            deadline = datetime.now(UTC) + timedelta(seconds=30)
            while hook.count() < len(serials):
                assert datetime.now(UTC) < deadline, first.log()
                await asyncio.sleep(0.02)
            first.kill()
            held = {r.headers["webhook-id"] for r in hook.received}
            assert len(held) == len(serials)
            second.start()
            delivered = await wait_for_count(
                database_url,
                "SELECT count(*) FROM deliveries WHERE channel = 'webhook' "
                "AND status = 'delivered'",
                len(serials),
            )
            assert delivered == len(serials), second.log()
            assert second.terminate() == 0
        finally:
            first.stop_quietly()
            second.stop_quietly()
        keys = {
            r["idempotency_key"]
            for r in await _fetch(
                database_url, "SELECT idempotency_key FROM deliveries WHERE channel = 'webhook'"
            )
        }
        ids = [r.headers["webhook-id"] for r in hook.received]
        assert set(ids) == keys  # each one arrived…
        assert len(ids) >= 2 * len(serials)  # …again after the kill (at least once)
        outcomes = await _fetch(
            database_url,
            "SELECT d.idempotency_key, array_agg(a.outcome ORDER BY a.id) AS outcomes "
            "FROM deliveries d JOIN delivery_attempts a ON a.delivery_id = d.id "
            "WHERE d.channel = 'webhook' GROUP BY 1",
        )
        for row in outcomes:
            assert row["outcomes"][0] == "interrupted"
            assert row["outcomes"][-1] == "delivered"
        bodies = {json.loads(r.body)["data"]["serial"] for r in hook.received}
        assert bodies == set(serials)


async def test_delivery_can_be_switched_off(
    database_url: str, broker: EmbeddedBroker, tmp_path: Path
) -> None:
    serial = "NGP900021A"
    with receiver() as hook:
        async with pool_for(database_url) as pool:
            clinic_id, _ = await clinic_with_pump(pool, serial)
            await add_webhook(pool, clinic_id, hook.url(), new_secret())
            async with pool.acquire() as conn:
                await fx.reading(
                    conn, serial, datetime.now(UTC) - timedelta(minutes=1), alarms=("eos",)
                )
        alerts = alerts_process(
            database_url, broker, tmp_path / "a.log", PUMPWATCH_NOTIFY_ENABLED="false", **ENV
        )
        try:
            alerts.start()
            await wait_for_count(database_url, "SELECT count(*) FROM outbox", 1)
            alerts.wait_metric("pumpwatch_alerts_evaluations_total", 1)
            assert alerts.terminate() == 0
        finally:
            alerts.stop_quietly()
        rows = await _fetch(database_url, "SELECT dispatched_at FROM outbox")
        assert rows  # flow stopped and battery end of service
        assert {r["dispatched_at"] for r in rows} == {None}  # left for a worker that delivers
        assert hook.count() == 0


async def _fetch(url: str, query: str) -> list[asyncpg.Record]:
    return await fetch(url, query)
