"""The paho speed-up decodes MQTT 5 PUBLISH properties exactly as paho does."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from paho.mqtt import _packet
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from services.ingest import paho_speedup

# paho's Properties has no type hints; these tests call it through Any.
_Properties: Any = Properties


def _properties() -> Any:
    props = _Properties(PacketTypes.PUBLISH)
    props.MessageExpiryInterval = 3600
    props.ContentType = "application/json"
    props.UserProperty = [("site", "a"), ("hub", "HUB-1")]
    props.PayloadFormatIndicator = 1
    return props


def _publish_packet(properties: Any) -> bytes:
    topic = b"pumps/NGP000123H/telemetry"
    props: bytes = properties.pack() if properties is not None else b"\x00"
    return struct.pack("!H", len(topic)) + topic + struct.pack("!H", 17) + props + b'{"v": 1}'


@pytest.mark.parametrize("with_properties", [True, False])
def test_publish_properties_decode_the_same(
    with_properties: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    packet = _publish_packet(_properties() if with_properties else None)
    monkeypatch.setattr(_packet, "Properties", Properties)
    plain = _packet.decode_publish(0x32, packet, MQTTProtocolVersion.MQTTv5)
    paho_speedup.install()
    assert _packet.Properties is paho_speedup.SharedTableProperties  # type: ignore[attr-defined]
    fast = _packet.decode_publish(0x32, packet, MQTTProtocolVersion.MQTTv5)
    assert isinstance(fast.properties, paho_speedup.SharedTableProperties)
    fast_props: Any = fast.properties
    plain_props: Any = plain.properties
    assert fast_props.json() == plain_props.json()
    assert (fast.payload, fast.topic, fast.mid) == (plain.payload, plain.topic, plain.mid)
    if with_properties:
        assert fast_props.json()["UserProperty"] == [("site", "a"), ("hub", "HUB-1")]


def test_a_reused_object_forgets_the_previous_packets_properties() -> None:
    props: Any = paho_speedup.SharedTableProperties(PacketTypes.PUBLISH)
    props.unpack(_properties().pack())
    assert props.ContentType == "application/json"
    props.unpack(_Properties(PacketTypes.PUBLISH).pack())
    assert props.json() == {}


def test_messages_built_without_info_until_it_is_read() -> None:
    """A received message never builds its MQTTMessageInfo; a published one builds it when paho
    reads it, and keeps it (the same object that publish() returns and waits on)."""
    message = paho_speedup.LazyInfoMessage(7, b"pumps/NGP000123H/telemetry")
    assert (message.mid, message.topic, message.payload, message.qos) == (
        7,
        "pumps/NGP000123H/telemetry",
        b"",
        0,
    )
    assert message.properties is None
    assert message.dup is False
    assert message.retain is False
    info = message.info
    assert info.mid == 7
    assert message.info is info
    other = paho_speedup.LazyInfoMessage(8)
    replacement = other.info.__class__(9)
    other.info = replacement
    assert other.info is replacement
