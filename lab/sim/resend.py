"""The devices' side of backfill (MQTT contract 1.1): what each source still holds, and its answer
to ``resend`` commands.

:class:`DeviceBuffers` keeps the last messages each (pump, source) published, as the contract
asks of home hubs and programmers (at least the last 7 days); a pump's buffer can be lost (a hub
reset): then it answers nothing, and pumpwatch must give the gap up rather than see it filled.
:class:`ResendResponder` is one MQTT client standing for every simulated device: it reads
``pumps/+/commands`` and re-publishes, unchanged (same ``msg_id``, same ``seq``), each held
message in a request's range on its usual topic. Nothing is ever invented: a number the buffer
does not hold is not sent.
:class:`TransitLoss` loses a few of one pump's readings between its hub and the broker while the
hub keeps them: a gap that backfill can fill (the demo shows one filled).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import OrderedDict, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import msgspec
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from lab.sim.outgoing import Outgoing
from services.domain.contract import Resend, decode_resend
from services.settings import MqttTarget

DEFAULT_KEEP = 1000
"""Messages kept per (pump, source): more than 7 days of readings every 15 minutes."""

Stream = tuple[str, str]
"""(serial, source id)"""


@dataclass(frozen=True, slots=True)
class Request:
    """A ``resend`` command as a device received it."""

    serial: str
    command: Resend
    answered: int
    """Messages re-published for it (each once per answer)."""


class DeviceBuffers:
    """What each (pump, source) still holds, by sequence number. Thread-safe."""

    def __init__(self, messages: Iterable[Outgoing] = (), *, keep: int = DEFAULT_KEEP) -> None:
        self.keep_per_source = keep
        self._held: dict[Stream, OrderedDict[int, Outgoing]] = defaultdict(OrderedDict)
        self._lost: set[str] = set()
        self._lock = threading.Lock()
        for message in messages:
            self.keep(message)

    def keep(self, message: Outgoing) -> None:
        """Remember a message the device sent (one without a sequence number is not kept)."""
        if not message.valid:
            return
        try:
            doc = json.loads(message.payload)
            seq = int(doc["seq"])
            source = str(doc.get("source", {}).get("id", ""))
        except (ValueError, KeyError, TypeError, AttributeError):
            return
        with self._lock:
            held = self._held[(message.serial, source)]
            held[seq] = message
            while len(held) > self.keep_per_source:
                held.popitem(last=False)

    def lose(self, serial: str) -> None:
        """The pump's devices lose everything they held (and keep nothing more)."""
        with self._lock:
            self._lost.add(serial)
            for stream in [s for s in self._held if s[0] == serial]:
                del self._held[stream]

    def held(self, serial: str, source_id: str, first: int, last: int) -> list[Outgoing]:
        with self._lock:
            if serial in self._lost:
                return []
            held = self._held.get((serial, source_id), OrderedDict[int, Outgoing]())
            return [held[seq] for seq in range(first, last + 1) if seq in held]


class ResendResponder:
    """Answers ``resend`` commands for every simulated device (a paho network thread).

    ``answers``: how many times each held message is re-published per request (2: a device
    that answers twice). Use as a context manager; ``requests`` lists what arrived."""

    def __init__(
        self,
        target: MqttTarget,
        buffers: DeviceBuffers,
        *,
        topic_prefix: str = "",
        client_id: str | None = None,
        protocol: str = "5",
        answers: int = 1,
    ) -> None:
        self.target = target
        self.buffers = buffers
        self.answers = answers
        prefix = f"{topic_prefix.strip('/')}/" if topic_prefix else ""
        self.topic = f"{prefix}pumps/+/commands"
        self.requests: list[Request] = []
        self.republished = 0
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"pumpwatch-sim-devices-{uuid.uuid4().hex[:8]}",
            protocol=paho.MQTTv5 if protocol == "5" else paho.MQTTv311,
        )
        self._client.max_inflight_messages_set(100)
        if target.username:
            self._client.username_pw_set(target.username, target.password)
        if target.tls:
            self._client.tls_set(ca_certs=target.ca_file)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message

    def __enter__(self) -> Self:
        self._client.connect(self.target.host, self.target.port, keepalive=30)
        self._client.loop_start()
        if not self._subscribed.wait(10.0):
            self.__exit__(None, None, None)
            raise TimeoutError(f"the devices could not subscribe to {self.topic}")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Let what was re-published be acknowledged before leaving.
        deadline = time.monotonic() + 5.0
        while self._client.want_write() and time.monotonic() < deadline:
            time.sleep(0.05)
        self._client.disconnect()
        self._client.loop_stop()

    def requested(self, serial: str | None = None) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if serial is None or r.serial == serial]

    # -- paho callbacks (the network thread) ---------------------------------------------------

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if not reason.is_failure:
            client.subscribe(self.topic, qos=1)

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        if not any(r.is_failure for r in reasons):
            self._subscribed.set()

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        parts = message.topic.split("/")
        try:
            command = decode_resend(bytes(message.payload))
        except (msgspec.ValidationError, msgspec.DecodeError):
            return  # not a command these devices know
        serial = parts[-2]
        held = self.buffers.held(serial, command.source_id, command.from_seq, command.to_seq)
        for _ in range(self.answers):
            for kept in held:
                client.publish(kept.topic, kept.payload, qos=1)
        with self._lock:
            self.requests.append(Request(serial, command, len(held)))
            self.republished += len(held) * self.answers


class TransitLoss:
    """The first healthy pump's hub loses ``count`` readings in a row on the way to the broker,
    after its first ``after`` readings; the hub still holds them (the publisher keeps every
    message in the :class:`DeviceBuffers` before asking this), so a ``resend`` fills the gap.

    ``serial`` is set by :meth:`choose` (the publisher, once the fleet is built) and ``lost``
    fills as the readings fall due (the publisher's thread; read it from any thread)."""

    def __init__(self, *, count: int = 3, after: int = 4) -> None:
        if count < 1 or after < 1:
            raise ValueError("count and after must be at least 1 (a gap needs a reading before)")
        self.count = count
        self.after = after
        self.serial: str | None = None
        self.lost: list[Outgoing] = []
        self._seen = 0
        self._lock = threading.Lock()

    def choose(self, serials_healthy_first: Iterable[str]) -> None:
        """The pump whose readings are lost: the first of these (a healthy one, so no fault
        of its own opens or fills gaps in its stream)."""
        self.serial = next(iter(serials_healthy_first), None)

    def drops(self, message: Outgoing) -> bool:
        """Whether this message is lost on the way to the broker (not published)."""
        if message.serial != self.serial or message.kind != "telemetry" or not message.valid:
            return False
        self._seen += 1
        if self.after < self._seen <= self.after + self.count:
            with self._lock:
                self.lost.append(message)
            return True
        return False

    def done(self) -> list[Outgoing]:
        """The lost readings once all ``count`` have fallen due, else nothing yet."""
        with self._lock:
            return list(self.lost) if len(self.lost) == self.count else []
