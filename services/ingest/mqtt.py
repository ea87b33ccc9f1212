"""The paho ↔ asyncio bridge: one MQTT connection driven by the event loop.

paho's socket is registered with the asyncio loop (``add_reader``/``add_writer``), so every paho
callback runs on the loop's thread and only appends to the backlog. Messages are acknowledged
by the caller (``ack``) once they are safely committed; until then the broker keeps them in the
persistent session and redelivers them after a reconnect. When the backlog is full the bridge
stops reading the socket (TCP and MQTT flow control hold the broker back); nothing is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import ssl
import struct
import time
from collections.abc import Callable
from typing import Any, Literal

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from services.ingest import paho_speedup
from services.ingest.backlog import Backlog, Incoming
from services.logs import get
from services.settings import MqttTarget

log = get(__name__)

# CONNACK reason codes that retrying cannot fix.
_FATAL_CONNACK = {
    133: "client identifier not valid",
    134: "bad user name or password",
    135: "not authorized (wrong user name or password, or not allowed to connect)",
    140: "bad authentication method",
}
_MAX_PACKETS_PER_WAKEUP = 8
_TOPIC_NOT_UTF8 = "<topic is not UTF-8>"
_PUBACK = struct.Struct("!BBH")
_U16 = struct.Struct("!H")
_NOT_PLAIN = (0, 0, 0)


class _NoTopicCallbacks:
    """Stands in for paho's per-topic callback table, which ingest never uses."""

    def iter_match(self, topic: str) -> tuple[()]:
        return ()


class _BufferedClient(paho.Client):
    """paho tuned for receiving many small messages; each change was measured under load.

    - paho reads each packet with several ``recv()`` calls (command byte, length bytes one at
      a time, body). Reading the socket in large chunks and serving those calls from memory
      turns a burst of packets into one system call; recv() was the biggest single cost of
      receiving. ``_sock_recv`` is paho 2.x's one read primitive (pinned: paho-mqtt<3).
    - paho matches every message's topic against its per-topic callbacks
      (``message_callback_add``), which ingest does not use: an empty stand-in skips the
      matching (4 % of ingest's time).
    - For each PUBLISH paho builds format strings for ``struct``, an MQTT 5 ``Properties``
      object, an ``MQTTMessage``, a printable topic for a debug log, and calls ``on_message``
      under a lock: 5.8 µs per message. The common QoS 1 message without properties (every
      device's, and all that ingest subscribes for) is taken apart here and handed to
      ``on_plain_publish``; anything else (QoS 0 or 2, properties, an empty topic, a malformed
      packet) goes through paho's own code, as before.
    - paho reads each packet through a state machine (a ``recv`` call for the command byte,
      one per length byte, one for the body; a fresh packet record, a lock and a clock read per
      packet): 3.3 µs per packet from memory. A plain PUBLISH that lies whole in the chunk
      already read is taken straight from it (1.0 µs in all with the step above); a packet
      split across reads, or any other, goes through paho's state machine."""

    _CHUNK = 65536

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._chunk = b""
        self._offset = 0
        self._on_message_filtered = _NoTopicCallbacks()  # type: ignore[assignment]
        self.on_plain_publish: Callable[[int, bytes, bytes], None] | None = None
        """Called with (packet id, topic, payload) for each QoS 1 PUBLISH without properties
        (acknowledged by the caller, as with ``manual_ack``); when None, paho's ``on_message``
        gets every message."""

    def _plain(self, data: bytes | bytearray, start: int, end: int) -> tuple[int, int, int]:
        """(packet id, end of the topic, start of the payload) of the PUBLISH variable header
        at ``data[start:end]`` when it is plain (a topic, a packet id and, in MQTT 5, no
        properties: their length a single 0 byte); (0, 0, 0) otherwise."""
        if end - start < 2:
            return _NOT_PLAIN
        (length,) = _U16.unpack_from(data, start)
        topic_end = start + 2 + length
        body = topic_end + 2
        if self._protocol == paho.MQTTv5:
            body += 1
            if body > end or data[body - 1] != 0:
                return _NOT_PLAIN
        if length == 0 or body > end:
            return _NOT_PLAIN
        (mid,) = _U16.unpack_from(data, topic_end)
        return mid, topic_end, body

    def _packet_read(self) -> MQTTErrorCode:
        handler = self.on_plain_publish
        chunk, offset = self._chunk, self._offset
        if (
            handler is None
            or self._in_packet["command"] != 0  # paho is half-way through a packet
            or len(chunk) - offset < 2
            or chunk[offset] & 0xF6 != 0x32  # PUBLISH, QoS 1 (any DUP or RETAIN flag)
            or not self._manual_ack
        ):
            return super()._packet_read()
        # The remaining length: up to four 7-bit groups, least significant first.
        start, length, shift = offset + 1, 0, 0
        while True:
            if start >= len(chunk) or shift > 21:
                return super()._packet_read()
            byte = chunk[start]
            start += 1
            length |= (byte & 0x7F) << shift
            if byte < 0x80:
                break
            shift += 7
        end = start + length
        if end > len(chunk):
            return super()._packet_read()  # not all read yet
        mid, topic_end, body = self._plain(chunk, start, end)
        if not body:
            return super()._packet_read()
        self._offset = end
        # What paho's keepalive reads (ingest drives paho on the event loop's thread only).
        self._last_bytes_received = paho.time_func()
        handler(mid, chunk[start + 2 : topic_end], chunk[body:end])
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _handle_publish(self) -> MQTTErrorCode:
        handler = self.on_plain_publish
        command: int = self._in_packet["command"]
        if handler is None or command & 0x06 != 0x02 or not self._manual_ack:
            return super()._handle_publish()
        packet = self._in_packet["packet"]  # a bytearray, reused by paho for the next packet
        mid, topic_end, body = self._plain(packet, 0, len(packet))
        if not body:
            return super()._handle_publish()
        with memoryview(packet) as view:  # one copy each, and released before paho reuses it
            topic, payload = bytes(view[2:topic_end]), bytes(view[body:])
        handler(mid, topic, payload)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    @property
    def buffered(self) -> bool:
        """Bytes already read from the socket and not yet consumed by paho."""
        return self._offset < len(self._chunk)

    def discard_buffer(self) -> None:
        """Forget what was read from a socket that is gone."""
        self._chunk = b""
        self._offset = 0

    def ack_all(self, mids: list[int]) -> None:
        """PUBACK each received QoS 1 message, in one write: paho's ``ack`` queues a 4-byte
        packet per message and sends each with a system call of its own. A PUBACK carries no
        state in paho (nothing waits on it), so the packets can share one queue entry; MQTT 5
        allows the reason code left out for success, as paho's own PUBACK does."""
        if mids:
            packet = b"".join([_PUBACK.pack(paho.PUBACK, 2, mid) for mid in mids])
            self._packet_queue(paho.PUBACK, packet, 0, 1)

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._offset >= len(self._chunk):
            chunk = super()._sock_recv(self._CHUNK)
            if not chunk:
                return chunk  # the peer closed the connection
            self._chunk, self._offset = chunk, 0
        piece = self._chunk[self._offset : self._offset + bufsize]
        self._offset += len(piece)
        return piece


class MqttRejected(Exception):
    """The broker refused our credentials or client id: a fatal configuration error."""


class MqttUnavailable(Exception):
    """The broker cannot be reached (yet); retried with backoff."""


class _Backoff:
    """Reconnection delays: from 0.05 s, growing by half each time to ``max_s``. Kept short
    because the broker is near (a refused TCP connect costs nothing) and, after a broker restart,
    ingest must re-subscribe before the devices publish again. Logs the first failures, then one
    a minute."""

    def __init__(self, max_s: float) -> None:
        self.max_s = max_s
        self.attempts = 0
        self._delay = 0.05
        self._logged_at = -math.inf

    def next(self) -> float:
        self.attempts += 1
        delay = min(self._delay, self.max_s)
        self._delay = min(self._delay * 1.5, self.max_s)
        return delay

    def should_log(self) -> bool:
        now = time.monotonic()
        if self.attempts <= 3 or now - self._logged_at >= 60.0:
            self._logged_at = now
            return True
        return False


class MqttBridge:
    def __init__(
        self,
        *,
        target: MqttTarget,
        client_id: str,
        topics: list[str],
        backlog: Backlog,
        protocol: Literal["5", "3.1.1"] = "5",
        session_expiry_s: int = 604800,
        receive_maximum: int = 1000,
        keepalive_s: int = 30,
        reconnect_max_delay_s: float = 0.5,
        on_connection_change: Callable[[bool], None] = lambda _: None,
        on_pause: Callable[[], None] = lambda: None,
        on_publish_refused: Callable[[], None] = lambda: None,
        retiring: bool = False,
    ) -> None:
        self.target = target
        self.client_id = client_id
        self.topics = topics
        self.backlog = backlog
        self.protocol = protocol
        self.session_expiry_s = session_expiry_s
        self.receive_maximum = receive_maximum
        self.keepalive_s = keepalive_s
        self.reconnect_max_delay_s = reconnect_max_delay_s
        self.on_connection_change = on_connection_change
        self.on_pause = on_pause
        self.on_publish_refused = on_publish_refused
        self.retiring = retiring
        """Unsubscribe instead of subscribing: take only what the session still holds."""
        self.generation = 0
        self.connected = False
        self.subscribed = False
        self.last_message_at = 0.0
        self.reconnects = 0

        self._loop = asyncio.get_running_loop()
        self._client: _BufferedClient = self._make_client()
        self._sock: socket.socket | None = None
        self._reading = False
        self._paused = False
        self._stopping = False
        self._connack: asyncio.Future[ReasonCode] | None = None
        self._lost = asyncio.Event()
        self._disconnected = asyncio.Event()
        self._messages_seen = 0
        self._tasks: list[asyncio.Task[None]] = []
        backlog.on_drained = self.resume_reading

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self, *, first_attempt_timeout_s: float = 10.0) -> None:
        """Connect (raising :class:`MqttRejected` at once on bad credentials) and keep connected.

        Retries with backoff while the broker is unavailable."""
        backoff = _Backoff(self.reconnect_max_delay_s)
        while True:
            try:
                await self._connect(first_attempt_timeout_s)
                break
            except MqttUnavailable as exc:
                delay = backoff.next()
                if backoff.should_log():
                    log.warning(
                        "mqtt_unavailable",
                        broker=self.target.redacted(),
                        error=str(exc),
                        attempts=backoff.attempts,
                        retry_in_s=round(delay, 2),
                    )
                await asyncio.sleep(delay)
        self._tasks = [
            asyncio.create_task(self._misc_loop(), name="mqtt-misc"),
            asyncio.create_task(self._reconnect_loop(), name="mqtt-reconnect"),
        ]

    async def stop(self, timeout_s: float = 5.0, *, end_session: bool = False) -> None:
        """Stop reading, flush pending acks, send DISCONNECT. The session stays on the broker,
        unless ``end_session``: then the broker forgets it (MQTT 5 session expiry 0)."""
        self.halt_reading()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.connected:
            properties = None
            if end_session:
                properties = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
                properties.SessionExpiryInterval = 0
            self._client.disconnect(properties=properties)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._disconnected.wait(), timeout_s)
        self._close_socket()

    # -- flow control and acknowledgement ----------------------------------------------------

    def pause_reading(self) -> None:
        if not self._paused:
            self._paused = True
            self._set_reader(False)

    def halt_reading(self) -> None:
        """Stop reading for good (shutdown): what is in the socket stays unacknowledged."""
        self._stopping = True
        self.pause_reading()

    def resume_reading(self) -> None:
        if self._paused and not self._stopping:
            self._paused = False
            self._set_reader(True)
            if self._client.buffered:
                self._loop.call_soon(self._on_readable)

    def ack(self, items: list[Incoming]) -> int:
        """Acknowledge committed messages; returns how many acks were sent.

        Messages received on an earlier connection are not acked: the broker redelivers them on
        the new connection, where they are recognised as duplicates and acked."""
        if not self.connected:
            return 0
        generation = self.generation
        mids = [item.mid for item in items if item.qos == 1 and item.generation == generation]
        self._client.ack_all(mids)
        return len(mids)

    def publish(self, topic: str, payload: bytes) -> bool:
        """Publish one message with QoS 1 (backfill's commands); False when not connected or
        paho refused it. Runs on the loop's thread; paho writes it when the socket is writable.
        A PUBACK with a failure reason (MQTT 5: not authorised) calls ``on_publish_refused``."""
        if not self.connected:
            return False
        info = self._client.publish(topic, payload, qos=1)
        return info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS

    # -- connection --------------------------------------------------------------------------

    def _make_client(self) -> _BufferedClient:
        paho_speedup.install()
        v5 = self.protocol == "5"
        client = _BufferedClient(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            clean_session=None if v5 else False,
            manual_ack=True,
        )
        if self.target.username:
            client.username_pw_set(self.target.username, self.target.password)
        if self.target.tls:
            client.tls_set(ca_certs=self.target.ca_file, cert_reqs=ssl.CERT_REQUIRED)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_plain_publish = self._on_plain_publish
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        client.on_unsubscribe = self._on_unsubscribe
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write
        return client

    async def _connect(self, timeout_s: float) -> None:
        self._connack = self._loop.create_future()
        self._disconnected.clear()
        properties = None
        if self.protocol == "5":
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = self.session_expiry_s
            properties.ReceiveMaximum = self.receive_maximum

        def blocking_connect() -> None:
            if self.protocol == "5":
                self._client.connect(
                    self.target.host,
                    self.target.port,
                    self.keepalive_s,
                    clean_start=False,
                    properties=properties,
                )
            else:
                self._client.connect(self.target.host, self.target.port, self.keepalive_s)

        try:
            await self._loop.run_in_executor(None, blocking_connect)
            reason = await asyncio.wait_for(self._connack, timeout_s)
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            self._close_socket()
            raise MqttUnavailable(f"{type(exc).__name__}: {exc}") from exc
        if reason.is_failure:
            self._close_socket()
            if reason.value in _FATAL_CONNACK:
                raise MqttRejected(
                    f"broker {self.target.redacted()} refused the connection: "
                    f"{_FATAL_CONNACK[reason.value]} ({reason})"
                )
            raise MqttUnavailable(f"broker refused the connection: {reason}")

    async def _reconnect_loop(self) -> None:
        while True:
            await self._lost.wait()
            lost_at = time.monotonic()
            backoff = _Backoff(self.reconnect_max_delay_s)
            delay = backoff.next()
            while not self._stopping:
                await asyncio.sleep(delay)
                try:
                    self.reconnects += 1
                    await self._connect(10.0)
                    self._lost.clear()
                    log.info(
                        "mqtt_reconnected",
                        broker=self.target.redacted(),
                        generation=self.generation,
                        attempts=backoff.attempts,
                        away_s=round(time.monotonic() - lost_at, 3),
                    )
                    break
                except MqttUnavailable as exc:
                    delay = backoff.next()
                    if backoff.should_log():
                        log.warning(
                            "mqtt_reconnect_failed",
                            error=str(exc),
                            attempts=backoff.attempts,
                            retry_in_s=round(delay, 2),
                        )
                except MqttRejected as exc:
                    # Credentials revoked while running: say so loudly, keep trying slowly, the
                    # health endpoint reports not ready.
                    delay = 60.0
                    log.error("mqtt_rejected", error=str(exc), retry_in_s=delay)

    async def _misc_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if self._sock is not None:
                self._client.loop_misc()

    # -- paho callbacks (all on the event loop's thread, except socket open during connect) ---

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if not reason.is_failure:
            self.generation += 1
            self.connected = True
            self.subscribed = False
            if self.retiring:
                client.unsubscribe(self.topics)
            elif self.protocol == "5":
                options = SubscribeOptions(qos=1)
                client.subscribe([(topic, options) for topic in self.topics])
            else:
                client.subscribe([(topic, 1) for topic in self.topics])
            log.info(
                "mqtt_connected",
                broker=self.target.redacted(),
                client_id=self.client_id,
                session_present=flags.session_present,
                generation=self.generation,
            )
            self.on_connection_change(True)
        if self._connack is not None and not self._connack.done():
            self._connack.set_result(reason)

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        failed = [str(r) for r in reasons if r.is_failure]
        if failed:
            log.error("mqtt_subscribe_failed", topics=self.topics, reasons=failed)
        else:
            # Logged before the flag that makes /readyz answer 200, so that whoever waited for
            # readiness finds the record.
            log.info("mqtt_subscribed", topics=self.topics)
            self.subscribed = True

    def _on_publish(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            log.warning("mqtt_publish_refused", reason=str(reason))
            self.on_publish_refused()

    def _on_unsubscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        # "No subscription existed" is fine: retiring only needs none left.
        self.subscribed = True
        log.info("mqtt_unsubscribed", topics=self.topics, reasons=[str(r) for r in reasons])

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        was_connected = self.connected
        self.connected = False
        self.subscribed = False
        self._disconnected.set()
        if self._connack is not None and not self._connack.done():
            self._connack.set_exception(
                MqttUnavailable(f"connection closed before CONNACK: {reason}")
            )
        if was_connected:
            self.on_connection_change(False)
        if not self._stopping and was_connected:
            log.warning("mqtt_connection_lost", reason=str(reason))
            self._lost.set()

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            topic = _TOPIC_NOT_UTF8
        self._receive(message.mid, message.qos, topic, bytes(message.payload))

    def _on_plain_publish(self, mid: int, topic: bytes, payload: bytes) -> None:
        try:
            text = topic.decode("utf-8")
        except UnicodeDecodeError:
            text = _TOPIC_NOT_UTF8
        self._receive(mid, 1, text, payload)

    def _receive(self, mid: int, qos: int, topic: str, payload: bytes) -> None:
        self._messages_seen += 1
        now = time.time()
        self.last_message_at = now
        self.backlog.put(Incoming(mid, qos, topic, payload, now, self.generation))
        if self.backlog.full and not self._paused:
            self.on_pause()
            self.pause_reading()

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        def register() -> None:
            self._client.discard_buffer()
            self._sock = sock
            self._reading = False
            if not self._paused:
                self._set_reader(True)

        self._loop.call_soon_threadsafe(register)

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        if self._sock is sock:
            self._close_socket(disconnect=False)

    def _on_socket_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        def register() -> None:
            with contextlib.suppress(ValueError, OSError):
                self._loop.add_writer(sock, self._on_writable)

        self._loop.call_soon_threadsafe(register)

    def _on_socket_unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_writer(sock)

    # -- socket I/O ------------------------------------------------------------------------

    def _set_reader(self, on: bool) -> None:
        if self._sock is None or on == self._reading:
            return
        self._reading = on
        if on:
            self._loop.add_reader(self._sock, self._on_readable)
        else:
            self._loop.remove_reader(self._sock)

    def _on_readable(self) -> None:
        # paho reads one packet per loop_read(); keep reading while packets keep coming so one
        # wake-up of the event loop handles a burst.
        for _ in range(_MAX_PACKETS_PER_WAKEUP):
            seen = self._messages_seen
            rc = self._client.loop_read()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or self._paused or self._sock is None:
                return
            if self._messages_seen == seen and not self._client.buffered:
                return
        # Packets already read into memory would wait for the socket's next readiness: come back
        # after the event loop has served everyone else (database replies, timers).
        if self._client.buffered:
            self._loop.call_soon(self._on_readable)

    def _on_writable(self) -> None:
        self._client.loop_write()

    def _close_socket(self, *, disconnect: bool = True) -> None:
        sock = self._sock
        if sock is not None:
            self._set_reader(False)
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_writer(sock)
            self._sock = None
        if disconnect:
            self._client.disconnect()
