"""Receiving: the bridge's own PUBLISH decoding (QoS 1 without properties) hands on exactly what
paho's does, and everything else still goes through paho."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from lab.embedded import EmbeddedBroker
from services.ingest import paho_speedup
from services.ingest.backlog import Backlog, Incoming
from services.ingest.mqtt import MqttBridge, _BufferedClient
from services.settings import parse_mqtt_url

TOPIC = b"pumps/NGP000123H/telemetry"
PAYLOAD = b'{"v": 1, "note": "\xc3\xa9t\xc3\xa9"}'


def _properties(**values: Any) -> bytes:
    props: Any = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    for name, value in values.items():
        setattr(props, name, value)
    packed: bytes = props.pack()
    return packed


def _packet(topic: bytes, *, mid: int | None, properties: bytes | None) -> bytes:
    head = struct.pack("!H", len(topic)) + topic
    if mid is not None:
        head += struct.pack("!H", mid)
    return head + (properties or b"") + PAYLOAD


# (fixed header byte, protocol, packet): QoS 1 is 0x32, QoS 0 0x30, QoS 1 with DUP 0x3A.
PACKETS = {
    "v5 qos1 no properties": (0x32, paho.MQTTv5, _packet(TOPIC, mid=17, properties=b"\x00")),
    "v5 qos1 dup": (0x3A, paho.MQTTv5, _packet(TOPIC, mid=65535, properties=b"\x00")),
    "v5 qos1 properties": (
        0x32,
        paho.MQTTv5,
        _packet(TOPIC, mid=18, properties=_properties(UserProperty=[("hub", "HUB-1")])),
    ),
    "v5 qos0": (0x30, paho.MQTTv5, _packet(TOPIC, mid=None, properties=b"\x00")),
    "v5 topic not utf-8": (0x32, paho.MQTTv5, _packet(b"pumps/\xff/x", mid=3, properties=b"\x00")),
    "v5 empty payload": (0x32, paho.MQTTv5, _packet(TOPIC, mid=4, properties=b"\x00")[:-20]),
    "v3.1.1 qos1": (0x32, paho.MQTTv311, _packet(TOPIC, mid=19, properties=None)),
}


class _Recorder:
    """A client set up as the bridge sets it up, recording what it hands on by either path:
    paho's ``on_message`` always, the plain path when ``plain``."""

    def __init__(self, protocol: int, *, plain: bool) -> None:
        paho_speedup.install()
        self.client = _BufferedClient(
            CallbackAPIVersion.VERSION2, client_id="t", protocol=protocol, manual_ack=True
        )
        self.got: list[Incoming] = []
        self.plain = 0
        """PUBLISHes handed on by the plain path."""
        self.client.on_message = self._on_message
        if plain:
            self.client.on_plain_publish = self._on_plain

    def _on_message(self, _client: Any, _userdata: Any, message: paho.MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            topic = "<topic is not UTF-8>"
        payload = bytes(message.payload)
        self.got.append(Incoming(message.mid, message.qos, topic, payload, 0.0, 0))

    def _on_plain(self, mid: int, topic: bytes, payload: bytes) -> None:
        assert type(topic) is bytes
        assert type(payload) is bytes
        self.plain += 1
        try:
            text = topic.decode("utf-8")
        except UnicodeDecodeError:
            text = "<topic is not UTF-8>"
        self.got.append(Incoming(mid, 1, text, payload, 0.0, 0))

    def feed(self, stream: bytes, piece: int) -> None:
        """``stream`` through paho's read loop, ``piece`` bytes per socket read."""
        client = self.client
        # An empty, non-blocking socket: when the piece is used up, paho's next read finds
        # nothing more yet (as between two socket reads) and waits for the next piece.
        ours, peer = socket.socketpair()
        ours.setblocking(False)
        client._sock = ours
        try:
            for start in range(0, len(stream), piece):
                client._chunk, client._offset = stream[start : start + piece], 0
                while client.buffered:
                    assert client.loop_read() == paho.MQTT_ERR_SUCCESS
        finally:
            ours.close()
            peer.close()
        assert client._in_packet["command"] == 0, "a packet was left half-read"


def _deliveries(command: int, protocol: int, packet: bytes, *, plain: bool) -> list[Incoming]:
    """What the client hands on for one PUBLISH, from paho's path or the plain one."""
    recorder = _Recorder(protocol, plain=plain)
    # As paho's reader leaves it for the handler (the packet as a bytearray, as paho reads it).
    recorder.client._in_packet = {
        "command": command,
        "have_remaining": 1,
        "remaining_count": [],
        "remaining_mult": 1,
        "remaining_length": len(packet),
        "packet": bytearray(packet),
        "to_process": 0,
        "pos": 0,
    }
    recorder.client._handle_publish()
    return recorder.got


@pytest.mark.parametrize("name", list(PACKETS))
def test_the_plain_path_hands_on_what_pahos_path_does(name: str) -> None:
    command, protocol, packet = PACKETS[name]
    assert _deliveries(command, protocol, packet, plain=True) == _deliveries(
        command, protocol, packet, plain=False
    )


def _frame(command: int, body: bytes) -> bytes:
    """A whole MQTT packet: the command byte, the remaining length (7 bits a byte), the body."""
    length, encoded = len(body), bytearray()
    while True:
        byte, length = length & 0x7F, length >> 7
        encoded.append(byte | (0x80 if length else 0))
        if not length:
            return bytes([command]) + bytes(encoded) + body


def _stream() -> bytes:
    """Packets as a broker sends them to ingest, plain PUBLISHes among others."""
    big = b'{"pad": "' + b"x" * 20_000 + b'"}'  # a three-byte remaining length
    packets = [
        _frame(0x32, _packet(TOPIC, mid=1, properties=b"\x00")),
        _frame(0x32, _packet(TOPIC, mid=2, properties=_properties(UserProperty=[("a", "b")]))),
        _frame(0xD0, b""),  # PINGRESP
        _frame(0x30, _packet(TOPIC, mid=None, properties=b"\x00")),
        _frame(0x3A, _packet(b"pumps/NGP000124H/events", mid=3, properties=b"\x00")),
        _frame(0x33, _packet(TOPIC, mid=4, properties=b"\x00")),  # RETAIN
        _frame(0x32, _packet(TOPIC, mid=5, properties=b"\x00")[: -len(PAYLOAD)] + big),
        _frame(0x32, _packet(b"pumps/\xff/x", mid=6, properties=b"\x00")),
    ]
    return b"".join(packets * 3)


@pytest.mark.parametrize("piece", [1, 2, 3, 5, 64, 599, 4096, 65536])
def test_packets_split_anyhow_across_reads_are_handed_on_as_pahos_path_does(piece: int) -> None:
    stream = _stream()
    reference = _Recorder(paho.MQTTv5, plain=False)
    reference.feed(stream, piece)
    assert reference.plain == 0
    assert [i.mid for i in reference.got] == [1, 2, 0, 3, 4, 5, 6] * 3
    recorder = _Recorder(paho.MQTTv5, plain=True)
    recorder.feed(stream, piece)
    assert recorder.got == reference.got
    assert recorder.plain == 5 * 3  # every plain QoS 1 PUBLISH, whole in memory or not


def test_whole_packets_in_memory_skip_pahos_reader() -> None:
    """Read at once, the plain PUBLISHes never reach paho's per-packet record."""
    stream = _frame(0x32, _packet(TOPIC, mid=9, properties=b"\x00")) * 50
    recorder = _Recorder(paho.MQTTv5, plain=True)
    record = recorder.client._in_packet
    recorder.feed(stream, len(stream))
    assert [i.mid for i in recorder.got] == [9] * 50
    assert recorder.client._in_packet is record  # paho's reader never started a packet


class _Counted:
    def __init__(self, bridge: MqttBridge) -> None:
        self.plain = 0
        self.paho = 0
        client = bridge._client
        inner_plain, inner_message = client.on_plain_publish, client.on_message
        assert inner_plain is not None
        assert inner_message is not None

        def plain(mid: int, topic: bytes, payload: bytes) -> None:
            self.plain += 1
            inner_plain(mid, topic, payload)

        def message(c: Any, userdata: Any, m: paho.MQTTMessage) -> None:
            self.paho += 1
            inner_message(c, userdata, m)

        client.on_plain_publish = plain
        client.on_message = message


async def _until(holds: Any, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not holds():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_a_real_broker_delivers_every_kind_of_publish_through_the_bridge(
    protocol: str, broker: EmbeddedBroker
) -> None:
    """Through a real broker: QoS 1 without properties takes the plain path (MQTT 5 and
    3.1.1), QoS 1 with properties and QoS 0 take paho's; each arrives once, whole."""
    if protocol == "5" and not broker.supports_mqtt5:
        pytest.skip("needs an MQTT 5 broker: install mosquitto (apt install mosquitto)")
    backlog = Backlog(capacity=100, batch_size=100)
    bridge = MqttBridge(
        target=parse_mqtt_url(broker.url),
        client_id="bridge-under-test",
        topics=["pumps/+/+"],
        backlog=backlog,
        protocol="5" if protocol == "5" else "3.1.1",
    )
    counted = _Counted(bridge)
    await bridge.start()
    try:
        await _until(lambda: bridge.subscribed)
        v5 = protocol == "5"
        publisher = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id="publisher",
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
        )
        host, port = "127.0.0.1", broker.port
        publisher.connect(host, port)
        publisher.loop_start()
        try:
            sent = [
                publisher.publish("pumps/NGP000001A/telemetry", PAYLOAD, qos=1),
                publisher.publish("pumps/NGP000002B/events", b"", qos=1),
                publisher.publish("pumps/NGP000003C/telemetry", b"qos0", qos=0),
            ]
            if v5:
                props: Any = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                props.UserProperty = [("hub", "HUB-1")]
                sent.append(
                    publisher.publish(
                        "pumps/NGP000004D/telemetry", b"with properties", qos=1, properties=props
                    )
                )
            for info in sent:
                info.wait_for_publish(timeout=30)
            await _until(lambda: len(backlog) == len(sent))
        finally:
            publisher.loop_stop()
            publisher.disconnect()
        items = backlog.take_now()
        by_topic = {item.topic: item for item in items}
        expected = {
            "pumps/NGP000001A/telemetry": (1, PAYLOAD),
            "pumps/NGP000002B/events": (1, b""),
            "pumps/NGP000003C/telemetry": (0, b"qos0"),
        }
        if v5:
            expected["pumps/NGP000004D/telemetry"] = (1, b"with properties")
        assert {t: (i.qos, i.payload) for t, i in by_topic.items()} == expected
        assert all(i.mid > 0 for i in items if i.qos == 1)
        assert all(i.generation == bridge.generation for i in items)
        assert counted.plain == 2
        assert counted.paho == (2 if v5 else 1)
        assert bridge.ack(items) == len(expected) - 1
    finally:
        await bridge.stop()
