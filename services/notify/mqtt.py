"""MQTT: every alert change published to ``clinics/{clinic_id}/alerts`` at QoS 1.

One paho-mqtt 2 client with its own network thread (``loop_start``), a clean session (the
``deliveries`` table is the durable queue, not the broker). Callbacks run on paho's thread and
only hand results to the event loop (``call_soon_threadsafe``). A publish counts as delivered
when the broker's PUBACK arrives; without a connection, or without a PUBACK in time, the attempt
fails and is retried like any other (at least once: the payload's ``id`` dedupes).
"""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
import uuid
from typing import Any, ClassVar

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from services.domain.notifications import Channel
from services.logs import get
from services.notify.channel import Message, Result
from services.notify.metrics import NotifyMetrics
from services.settings import MqttTarget, default_client_id

log = get(__name__)


def alerts_topic(clinic_id: str, prefix: str = "") -> str:
    topic = f"clinics/{clinic_id}/alerts"
    return f"{prefix.strip('/')}/{topic}" if prefix.strip("/") else topic


class MqttSender:
    channel: ClassVar[Channel] = "mqtt"

    def __init__(self, target: MqttTarget, *, timeout_s: float, metrics: NotifyMetrics) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self.metrics = metrics
        self._loop = asyncio.get_running_loop()
        self._lock = threading.Lock()
        self._waiting: dict[int, asyncio.Future[bool]] = {}
        self._acked_early: set[int] = set()
        self._abandoned: set[int] = set()
        """Publishes that timed out: their late PUBACK must not count for a later publish that
        reuses the packet id."""
        client_id = f"{default_client_id('alerts-notify')[:40]}-{uuid.uuid4().hex[:8]}"
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv311,
            clean_session=True,
        )
        if target.username:
            client.username_pw_set(target.username, target.password)
        if target.tls:
            client.tls_set(ca_certs=target.ca_file, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        self._client = client
        self._started = False

    def start(self) -> None:
        """Connect in the background (paho's thread retries until the broker answers)."""
        self._client.connect_async(self.target.host, self.target.port, keepalive=30)
        self._client.loop_start()
        self._started = True

    async def send(self, message: Message) -> Result:
        if not self._client.is_connected():
            return Result("network", error=f"not connected to {self.target.redacted()}")
        body = json.dumps(message.payload, separators=(",", ":"), ensure_ascii=False)
        future: asyncio.Future[bool] = self._loop.create_future()
        info = self._client.publish(message.target, body.encode(), qos=1)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return Result("network", error=f"publish failed: {paho.error_string(info.rc)}")
        with self._lock:
            if info.mid in self._acked_early:
                self._acked_early.discard(info.mid)
                future.set_result(True)
            else:
                self._waiting[info.mid] = future
        try:
            await asyncio.wait_for(future, self.timeout_s)
        except TimeoutError:
            with self._lock:
                if self._waiting.pop(info.mid, None) is not None:
                    self._abandoned.add(info.mid)
            return Result("timeout", error=f"no PUBACK within {self.timeout_s:g} s")
        return Result("delivered")

    async def aclose(self) -> None:
        if self._started:
            self._client.disconnect()
            await asyncio.to_thread(self._client.loop_stop)
        self.metrics.mqtt_connected.set(0)

    # -- paho's thread ---------------------------------------------------------------------

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        ok = not reason.is_failure
        self._loop.call_soon_threadsafe(self._connected, ok, str(reason))

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._loop.call_soon_threadsafe(self._connected, False, str(reason))

    def _on_publish(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._lock:
            future = self._waiting.pop(mid, None)
            if future is None:
                if mid in self._abandoned:
                    self._abandoned.discard(mid)
                else:
                    self._acked_early.add(mid)
                return
        self._loop.call_soon_threadsafe(_resolve, future)

    # -- the event loop --------------------------------------------------------------------

    def _connected(self, ok: bool, reason: str) -> None:
        self.metrics.mqtt_connected.set(1 if ok else 0)
        if ok:
            log.info("notify_mqtt_connected", broker=self.target.redacted())
        else:
            log.warning("notify_mqtt_disconnected", broker=self.target.redacted(), reason=reason)


def _resolve(future: asyncio.Future[bool]) -> None:
    if not future.done():
        future.set_result(True)
