"""``pumpwatch notify`` as a real process: it delivers what a ``pumpwatch alerts`` process with
``PUMPWATCH_NOTIFY_ENABLED=false`` opened, shows it on its own /metrics, finishes the delivery
in flight on SIGTERM and exits 0, shares the work with a second instance, and refuses a
database whose schema is not current."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
from standardwebhooks.webhooks import Webhook

from lab.embedded import EmbeddedBroker
from services.alerts.settings import AlertsSettings
from services.domain.webhook_urls import new_secret
from services.notify.settings import NotifySettings
from tests import alert_fixtures as fx
from tests.notify_support import Reply, add_pump, add_webhook, clinic_with_pump, pool_for, receiver
from tests.support import IngestProcess, alerts_process, fetch, fetchval, notify_process

ENV = {
    "PUMPWATCH_WEBHOOK_ALLOW_HOSTS": "127.0.0.1",
    "PUMPWATCH_NOTIFY_RETRY_FIRST_S": "0.1",
    "PUMPWATCH_NOTIFY_RETRY_MAX_S": "0.5",
}
ALERTS_ENV = {"PUMPWATCH_NOTIFY_ENABLED": "false"}
WEBHOOKS = "SELECT idempotency_key, status FROM deliveries WHERE channel = 'webhook'"
UNFINISHED = (
    "SELECT (SELECT count(*) FROM outbox WHERE dispatched_at IS NULL) "
    "+ (SELECT count(*) FROM deliveries WHERE channel = 'webhook' AND status <> 'delivered')"
)


async def stalled_pumps(database_url: str, serials: list[str], hook_url: str, secret: str) -> None:
    """One clinic with a webhook, and these pumps of its patients, each with a stalled motor
    (a high alert when the alert service sweeps at its start)."""
    async with pool_for(database_url) as pool:
        clinic_id, _ = await clinic_with_pump(pool, serials[0])
        for serial in serials[1:]:
            await add_pump(pool, clinic_id, serial)
        await add_webhook(pool, clinic_id, hook_url, secret)
        async with pool.acquire() as conn:
            for serial in serials:
                await fx.reading(
                    conn, serial, datetime.now(UTC) - timedelta(minutes=1), alarms=("motor_stall",)
                )


async def until_delivered(
    database_url: str, alerts: IngestProcess, pumps: int, *notifiers: IngestProcess
) -> list[asyncpg.Record]:
    """Wait until the alert service evaluated the pumps, and every outbox event it wrote was
    fanned out and every webhook delivery delivered; returns the webhook deliveries."""
    alerts.wait_metric("pumpwatch_alerts_evaluations_total", pumps)
    alerts.wait_metric_equal("pumpwatch_alerts_pending_pumps", 0)
    deadline = time.monotonic() + 60
    while await fetchval(database_url, UNFINISHED) > 0:
        for notifier in notifiers:
            assert notifier.proc is not None
            assert notifier.proc.poll() is None, notifier.log()
        assert time.monotonic() < deadline, "\n".join(n.log() for n in notifiers)
        await asyncio.sleep(0.05)
    return await fetch(database_url, WEBHOOKS)


def delivered_by(*notifiers: IngestProcess) -> float:
    """Webhook deliveries the processes counted as delivered, together."""
    name = "pumpwatch_alerts_notify_deliveries_total"
    return sum(n.metric(name, channel="webhook", status="delivered") for n in notifiers)


def logged(process: IngestProcess, event: str) -> list[dict[str, object]]:
    """The process's JSON log records of one event."""
    records = []
    for line in process.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{") and json.loads(line).get("event") == event:
            records.append(json.loads(line))
    return records


def test_the_notify_port_is_its_own() -> None:
    assert NotifySettings.model_fields["metrics_port"].default == 9103
    assert AlertsSettings.model_fields["metrics_port"].default == 9102


async def test_notify_delivers_what_a_separate_alert_service_opened(
    database_url: str, broker: EmbeddedBroker, tmp_path: Path
) -> None:
    serial = "NGP910001A"
    secret = new_secret()
    with receiver() as hook:
        await stalled_pumps(database_url, [serial], hook.url(), secret)
        notify = notify_process(database_url, broker, tmp_path / "notify.log", **ENV)
        alerts = alerts_process(database_url, broker, tmp_path / "alerts.log", **ALERTS_ENV)
        try:
            notify.start()
            alerts.start()
            deliveries = await until_delivered(database_url, alerts, 1, notify)
            deadline = time.monotonic() + 30
            while delivered_by(notify) < len(deliveries):
                assert time.monotonic() < deadline, notify.log()
                await asyncio.sleep(0.05)
            notify.wait_metric(
                "pumpwatch_alerts_notify_latency_seconds_count", 1, channel="webhook"
            )
            status, text = notify.get("/metrics")
            assert status == 200
            # The alert service delivered nothing; the notify process serves the worker's
            # metrics only.
            assert delivered_by(notify) == len(deliveries)
            assert delivered_by(alerts) == 0
            assert notify.metric("pumpwatch_alerts_notify_events_dispatched_total") >= 1
            assert "pumpwatch_alerts_evaluations_total" not in text
            assert notify.get("/healthz")[0] == 200
            assert notify.terminate() == 0
            assert alerts.terminate() == 0
        finally:
            notify.stop_quietly()
            alerts.stop_quietly()
    assert deliveries
    assert {r["status"] for r in deliveries} == {"delivered"}
    ids = [r.headers["webhook-id"] for r in hook.received]
    assert sorted(ids) == sorted(r["idempotency_key"] for r in deliveries)
    bodies = [Webhook(secret).verify(r.body, r.headers) for r in hook.received]
    assert ("alert.opened", serial) in {(b["type"], b["data"]["serial"]) for b in bodies}
    assert len(logged(notify, "notify_stopped")) == 1


async def test_sigterm_finishes_the_delivery_in_flight_and_exits_0(
    database_url: str, broker: EmbeddedBroker, tmp_path: Path
) -> None:
    serial = "NGP910011A"
    with receiver() as hook:
        hook.replies = [Reply(204, delay_s=3)]  # the first request is answered late
        await stalled_pumps(database_url, [serial], hook.url(), new_secret())
        notify = notify_process(database_url, broker, tmp_path / "notify.log", **ENV)
        alerts = alerts_process(database_url, broker, tmp_path / "alerts.log", **ALERTS_ENV)
        try:
            notify.start()
            alerts.start()
            deadline = time.monotonic() + 30
            while hook.count() == 0:
                assert time.monotonic() < deadline, notify.log()
                await asyncio.sleep(0.01)
            assert notify.terminate() == 0  # with the first request still unanswered
        finally:
            notify.stop_quietly()
            alerts.stop_quietly()
    held = hook.received[0].headers["webhook-id"]
    [row] = await fetch(
        database_url,
        "SELECT d.status, array_agg(a.outcome ORDER BY a.id) AS outcomes FROM deliveries d "
        "JOIN delivery_attempts a ON a.delivery_id = d.id WHERE d.idempotency_key = $1 "
        "GROUP BY d.status",
        held,
    )
    assert (row["status"], row["outcomes"]) == ("delivered", ["delivered"])


async def test_two_notify_processes_deliver_each_webhook_once(
    database_url: str, broker: EmbeddedBroker, tmp_path: Path
) -> None:
    serials = [f"NGP9102{i:02d}A" for i in range(12)]
    with receiver() as hook:
        await stalled_pumps(database_url, serials, hook.url(), new_secret())
        first = notify_process(database_url, broker, tmp_path / "n1.log", **ENV)
        second = notify_process(database_url, broker, tmp_path / "n2.log", **ENV)
        alerts = alerts_process(database_url, broker, tmp_path / "alerts.log", **ALERTS_ENV)
        try:
            first.start()
            second.start()
            alerts.start()
            deliveries = await until_delivered(database_url, alerts, len(serials), first, second)
            # Each process counts a delivery just after recording it in the database.
            deadline = time.monotonic() + 30
            while (delivered := delivered_by(first, second)) < len(deliveries):
                assert time.monotonic() < deadline, (delivered, len(deliveries))
                await asyncio.sleep(0.05)
            assert first.terminate() == 0
            assert second.terminate() == 0
            assert alerts.terminate() == 0
        finally:
            for process in (first, second, alerts):
                process.stop_quietly()
    assert len(deliveries) >= len(serials)  # at least the flow-stopped alert of each pump
    ids = [r.headers["webhook-id"] for r in hook.received]
    assert sorted(ids) == sorted(r["idempotency_key"] for r in deliveries)  # each once
    assert delivered == len(deliveries)
    assert {json.loads(r.body)["data"]["serial"] for r in hook.received} == set(serials)


def test_notify_refuses_a_database_whose_schema_is_not_current(
    empty_database_url: str, broker: EmbeddedBroker, tmp_path: Path
) -> None:
    notify = notify_process(empty_database_url, broker, tmp_path / "notify.log")
    try:
        notify.start(wait_ready=False)
        assert notify.proc is not None
        assert notify.proc.wait(60) == 2
    finally:
        notify.stop_quietly()
    assert "the database schema is not current: run `pumpwatch migrate` first" in notify.log()
