"""Scenario 4: the alert service SIGKILLed mid-evaluation and mid-delivery.

A clinic with a webhook (a receiver in this process that answers after a short delay, so that
deliveries are in flight), ``pumps`` pumps of its patients each with a stalled motor (a high
alert and a webhook each). `pumpwatch alerts` (the real command: evaluation and the notification
worker in one process) is SIGKILLed ``kills`` times at seeded moments, alternately while it
evaluates (its catch-up sweep at start) and while deliveries are in flight, and started again.

Checked at the end: one alert per pump and rule (no duplicate alert, no duplicate
``alert.opened`` event), every ``alert.opened`` event fanned out to one webhook delivery, and
every delivery received by the webhook (none lost). Receiving one more than once is allowed —
deliveries are at least once, receivers dedupe on ``webhook-id`` — and counted.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import asyncpg

from lab.bench.faults.common import (
    Lab,
    Outcome,
    Size,
    fetch,
    fetchval,
    total,
    wait_until,
)
from lab.embedded import free_port
from lab.processes import ServiceProcess, metrics_service
from services.domain.webhook_urls import new_secret
from services.settings import parse_mqtt_url
from services.storage.database import prepare_connection

EVALUATIONS = "pumpwatch_alerts_evaluations_total"
UNFINISHED = (
    "SELECT (SELECT count(*) FROM outbox WHERE dispatched_at IS NULL) "
    "+ (SELECT count(*) FROM deliveries WHERE status <> 'delivered')"
)


@dataclass(frozen=True)
class WorkersSize:
    pumps: int
    kills: int


SIZES: dict[Size, WorkersSize] = {
    "reduced": WorkersSize(pumps=120, kills=4),
    "full": WorkersSize(pumps=1_000, kills=10),
}


class Hook:
    """A webhook receiver on 127.0.0.1: records each delivery's ``webhook-id``, answers 204
    after ``delay_s``."""

    def __init__(self, delay_s: float) -> None:
        self.ids: list[str] = []
        self.lock = threading.Lock()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", "0")))
                time.sleep(delay_s)
                with hook.lock:
                    hook.ids.append(self.headers.get("webhook-id", ""))
                self.send_response(204)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet."""

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def count(self) -> int:
        with self.lock:
            return len(self.ids)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class MqttTap:
    """Subscribed to ``clinics/+/alerts`` (QoS 1): records each notification's ``id``."""

    def __init__(self, broker_url: str) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.ids: list[str] = []
        self.lock = threading.Lock()
        target = parse_mqtt_url(broker_url)
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="faults-mqtt-tap")
        self.client.on_message = self._on_message
        self.client.connect(target.host, target.port)
        self.client.subscribe("clinics/+/alerts", qos=1)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        with self.lock:
            self.ids.append(str(json.loads(message.payload).get("id", "")))

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


async def _seed(database_url: str, pumps: int, hook_url: str) -> None:
    """A clinic with a webhook; ``pumps`` patients with a pump whose motor stalled a minute ago
    (readings and state as ingest writes them)."""
    conn = await asyncpg.connect(database_url)
    await prepare_connection(conn)
    try:
        clinic_id = await conn.fetchval(
            "INSERT INTO clinics (name, timezone, alert_settings) VALUES ('Faults', 'UTC', '{}') "
            "RETURNING id"
        )
        await conn.execute(
            "INSERT INTO webhooks (clinic_id, url, events, secret, created_by) "
            "VALUES ($1, $2, $3, $4, 'faults')",
            clinic_id,
            hook_url,
            ["alert.opened"],
            new_secret(),
        )
        at = datetime.now(UTC) - timedelta(minutes=1)
        await conn.execute("SELECT ensure_readings_partition($1)", at)
        for i in range(pumps):
            serial = f"FLT{i:06d}"
            patient_id = await conn.fetchval(
                "INSERT INTO patients (clinic_id, mrn, display_name) VALUES ($1, $2, $3) "
                "RETURNING id",
                clinic_id,
                f"FAULTS-{i}",
                f"Patient {i}",
            )
            await conn.execute(
                "INSERT INTO pumps (serial, model, patient_id) "
                "VALUES ($1, 'SynchroMed II 8637-40', $2)",
                serial,
                patient_id,
            )
            for table in ("readings", "pump_state"):
                await conn.execute(
                    f"INSERT INTO {table} (msg_id, serial, recorded_at, utc_offset_minutes, "
                    "received_at, volume_ml, capacity_ml, low_alarm_ml, basis, drug_name, "
                    "concentration_mcg_per_ml, infusion_mode, rate_ml_per_day, daily_dose_mcg, "
                    "battery_status, alarms"
                    + (", payload" if table == "readings" else "")
                    + ") VALUES ($1, $2, $3, 0, now(), 20, 40, 2, 'calculated', 'baclofen', "
                    "2000, 'continuous', 0.2, 400, 'ok', ARRAY['motor_stall']"
                    + (", '{}'" if table == "readings" else "")
                    + ")",
                    uuid.uuid4(),
                    serial,
                    at,
                )
    finally:
        await conn.close()


def run(lab: Lab, size: Size, seed: int) -> Outcome:
    spec = SIZES[size]
    outcome = Outcome(
        "workers",
        f"alert service SIGKILLed {spec.kills}x mid-evaluation and mid-delivery "
        f"({spec.pumps} pumps)",
    )
    started = time.monotonic()
    rng = random.Random(seed)
    database_url = lab.database()
    hook = Hook(delay_s=0.1)
    lab.stack.callback(hook.stop)
    broker = lab.broker("workers-mosquitto")
    tap = MqttTap(broker.url)
    lab.stack.callback(tap.stop)
    asyncio.run(_seed(database_url, spec.pumps, hook.url))
    alerts = metrics_service(
        "alerts",
        {
            "PUMPWATCH_DATABASE_URL": database_url,
            "PUMPWATCH_MQTT_URL": broker.url,
            "PUMPWATCH_LOG_FORMAT": "json",
            "PUMPWATCH_WEBHOOK_ALLOW_HOSTS": "127.0.0.1",
            "PUMPWATCH_WEBHOOK_TIMEOUT_S": "2",
            "PUMPWATCH_NOTIFY_LEASE_S": "3",
            "PUMPWATCH_NOTIFY_RETRY_FIRST_S": "0.2",
            "PUMPWATCH_NOTIFY_RETRY_MAX_S": "1",
            "PUMPWATCH_ALERTS_BATCH_MAX_PUMPS": "10",
        },
        lab.path("workers-alerts.log"),
    )
    lab.service(alerts)
    kills: list[str] = []
    try:
        for life in range(spec.kills):
            alerts.start(wait_ready=False)
            received = hook.count()
            if life % 2 == 0:
                threshold = rng.randint(1, max(1, spec.pumps - 10))
                wait_until(
                    _at_least(lambda: _evaluations(alerts), threshold),
                    "evaluations to start",
                    timeout_s=120,
                    every_s=0.01,
                    alive=alerts,
                )
                moment = f"mid-evaluation ({_evaluations(alerts):.0f} of {spec.pumps} pumps)"
            else:
                wait_until(
                    _at_least(hook.count, received + 1),
                    "a delivery to arrive",
                    timeout_s=120,
                    every_s=0.01,
                    alive=alerts,
                )
                time.sleep(rng.uniform(0.0, 0.3))
                pending = int(
                    asyncio.run(
                        fetchval(
                            database_url,
                            "SELECT count(*) FROM deliveries WHERE status <> 'delivered'",
                        )
                    )
                )
                moment = f"mid-delivery ({pending} deliveries not done)"
            outcome.check(alerts.alive, f"the alert service died by itself in life {life}")
            alerts.kill()
            kills.append(moment)
        alerts.start(wait_ready=False)
        wait_until(
            lambda: _settled(database_url, spec.pumps),
            "every alert opened and every delivery delivered",
            timeout_s=300,
            every_s=0.2,
            alive=alerts,
        )
        outcome.check(alerts.terminate() == 0, "the alert service did not stop cleanly on SIGTERM")
    except (TimeoutError, RuntimeError) as exc:
        outcome.problems.append(str(exc).splitlines()[0])
    finally:
        alerts.stop()
    time.sleep(0.5)  # the last MQTT notifications reach the tap
    _check(outcome, database_url, hook, tap, spec)
    outcome.figures["kills"] = "; ".join(kills)
    evaluation_kills = sum(k.startswith("mid-evaluation") for k in kills)
    delivery_kills = sum(
        k.startswith("mid-delivery (") and not k.startswith("mid-delivery (0 ") for k in kills
    )
    outcome.check(len(kills) == spec.kills, f"{len(kills)} of {spec.kills} kills happened")
    outcome.check(evaluation_kills > 0, "no kill came mid-evaluation")
    outcome.check(delivery_kills > 0, "no kill came with deliveries in flight")
    outcome.elapsed_s = time.monotonic() - started
    return outcome


def _at_least(value: Callable[[], float], wanted: float) -> Callable[[], bool]:
    return lambda: value() >= wanted


def _evaluations(alerts: ServiceProcess) -> float:
    samples = alerts.samples()
    return 0.0 if samples is None else total(samples, EVALUATIONS)


def _settled(database_url: str, pumps: int) -> bool:
    alerts = int(asyncio.run(fetchval(database_url, "SELECT count(*) FROM alerts")))
    return alerts >= pumps and int(asyncio.run(fetchval(database_url, UNFINISHED))) == 0


def _check(
    outcome: Outcome, database_url: str, hook: Hook, tap: MqttTap, spec: WorkersSize
) -> None:
    alerts = asyncio.run(fetch(database_url, "SELECT id, serial, rule FROM alerts"))
    per_rule = Counter((r["serial"], r["rule"]) for r in alerts)
    opened = asyncio.run(
        fetch(database_url, "SELECT alert_id FROM outbox WHERE event = 'alert.opened'")
    )
    opened_per_alert = Counter(r["alert_id"] for r in opened)
    deliveries = asyncio.run(
        fetch(database_url, "SELECT outbox_id, channel, idempotency_key, status FROM deliveries")
    )
    events = asyncio.run(fetch(database_url, "SELECT id FROM outbox WHERE event = 'alert.opened'"))
    fanned_out = Counter((d["outbox_id"], d["channel"]) for d in deliveries)
    received = {"webhook": Counter(hook.ids), "mqtt": Counter(tap.ids)}
    outcome.attempted = len(deliveries)
    outcome.acknowledged = sum(d["status"] == "delivered" for d in deliveries)
    outcome.stored = sum(d["idempotency_key"] in received.get(d["channel"], {}) for d in deliveries)
    lost = [
        d["idempotency_key"]
        for d in deliveries
        if d["idempotency_key"] not in received.get(d["channel"], {})
    ]
    never_fanned_out = [
        (e["id"], channel)
        for e in events
        for channel in ("webhook", "mqtt")
        if fanned_out[(e["id"], channel)] != 1
    ]
    outcome.lost = len(lost) + len(never_fanned_out)
    outcome.duplicated = sum(n - 1 for n in per_rule.values()) + sum(
        n - 1 for n in opened_per_alert.values()
    )
    outcome.check(
        len({s for s, _ in per_rule}) == spec.pumps,
        f"alerts for {len({s for s, _ in per_rule})} of {spec.pumps} pumps",
    )
    outcome.figures["alerts (rules)"] = ", ".join(
        f"{rule} {n}" for rule, n in sorted(Counter(r["rule"] for r in alerts).items())
    )
    outcome.figures["alert.opened events / deliveries (webhook + MQTT)"] = (
        f"{len(events)} / {len(deliveries)}"
    )
    for channel, counts in received.items():
        outcome.figures[f"{channel}: received / distinct / more than once"] = (
            f"{counts.total()} / {len(counts)} / {sum(1 for n in counts.values() if n > 1)}"
        )
    if lost:
        outcome.figures["lost deliveries, e.g."] = ", ".join(lost[:3])
