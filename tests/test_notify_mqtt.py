"""Alert changes published to ``clinics/{clinic_id}/alerts`` on the test's own broker."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from lab.embedded import EmbeddedBroker
from services.settings import parse_mqtt_url
from tests.notify_support import clinic_with_pump, evaluate, pool_for, running, settings, stall

SERIAL = "NGP800001A"


class Subscriber:
    def __init__(self, url: str, topic: str) -> None:
        target = parse_mqtt_url(url)
        self.messages: list[tuple[str, int, bytes]] = []
        self.subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(target.host, target.port)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, message: paho.MQTTMessage) -> None:
        self.messages.append((message.topic, message.qos, bytes(message.payload)))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def subscriber(broker: EmbeddedBroker) -> Iterator[Subscriber]:
    sub = Subscriber(broker.url, "clinics/+/alerts")
    assert sub.subscribed.wait(10)
    yield sub
    sub.close()


async def test_a_subscriber_receives_the_alert_change_on_the_clinic_topic(
    database_url: str, broker: EmbeddedBroker, subscriber: Subscriber
) -> None:
    async with pool_for(database_url) as pool:
        clinic_id, _ = await clinic_with_pump(pool, SERIAL)
        config = settings(database_url, mqtt_url=broker.url)
        async with running(pool, config) as worker:
            await worker.until(lambda: worker.metrics.mqtt_connected._value.get() == 1)
            await stall(pool, SERIAL)
            await evaluate(pool, SERIAL)
            await worker.until(lambda: len(subscriber.messages) >= 1)
            await worker.until(
                lambda: pool.fetchval(
                    "SELECT count(*) = 1 FROM deliveries WHERE channel = 'mqtt' "
                    "AND status = 'delivered'"
                )
            )
        [(topic, qos, payload)] = subscriber.messages
        assert topic == f"clinics/{clinic_id}/alerts"
        assert qos == 1
        body = json.loads(payload)
        assert body["type"] == "alert.opened"
        assert body["data"]["serial"] == SERIAL
        key = await pool.fetchval("SELECT idempotency_key FROM deliveries WHERE channel = 'mqtt'")
        assert body["id"] == key


async def test_without_a_broker_the_publish_is_retried_not_lost(
    database_url: str, broker: EmbeddedBroker
) -> None:
    async with pool_for(database_url) as pool:
        await clinic_with_pump(pool, SERIAL)
        config = settings(database_url, mqtt_url=broker.url)
        broker.stop()
        async with running(pool, config) as worker:
            await stall(pool, SERIAL)
            await evaluate(pool, SERIAL)
            await worker.until(
                lambda: pool.fetchval(
                    "SELECT count(*) >= 2 FROM delivery_attempts WHERE channel = 'mqtt' "
                    "AND outcome = 'network'"
                )
            )
            assert await pool.fetchval("SELECT status FROM deliveries") == "pending"
