"""Measured speed-ups for paho-mqtt 2.x receiving PUBLISH packets.

For every MQTT 5 packet, paho's ``Properties.__init__`` rebuilds two lookup tables of 28 entries
(property names and types) that never change, and ``Properties.clear`` walks all 28 names with
string replacing and ``hasattr``. Decoding one PUBLISH took 9.7 µs, of which 6.7 µs went there
(``decode_publish`` drops to 2.9 µs with the tables shared); profiling ingest under load showed
this as the largest single cost after the socket reads.

The subclass below shares one copy of the tables and clears by dictionary ``pop``; everything
else (reading, validating, ``__setattr__``) is paho's own. It is installed where paho's packet
decoder looks the class up.

Every received message is also an ``MQTTMessage`` whose constructor builds an
``MQTTMessageInfo`` with a ``threading.Condition``: 3.1 µs of the 3.5 µs it takes, for an object
that only a message being *published* uses (to wait for its acknowledgement). ``LazyInfoMessage``
builds it when first read, so publishing (ingest's backfill commands) is unchanged.

``tests/test_paho_speedup.py`` checks that properties decode the same with and without the
first, and that messages are received and published with the second. paho-mqtt is pinned
below 3.
"""

from __future__ import annotations

from typing import Any

import paho.mqtt.client as paho_client
from paho.mqtt import _packet
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

_TABLES = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
_ATTRIBUTES = tuple(name.replace(" ", "") for name in _TABLES.names)


class SharedTableProperties(Properties):
    def __init__(self, packetType: int) -> None:
        # object.__setattr__ as paho's own __setattr__ does for these four names.
        object.__setattr__(self, "packetType", packetType)
        object.__setattr__(self, "types", _TABLES.types)
        object.__setattr__(self, "names", _TABLES.names)
        object.__setattr__(self, "properties", _TABLES.properties)

    def clear(self) -> None:
        attributes: dict[str, Any] = self.__dict__
        for name in _ATTRIBUTES:
            attributes.pop(name, None)


_INFO_SLOT: Any = paho_client.MQTTMessage.__dict__["info"]  # the base class's slot descriptor


class LazyInfoMessage(paho_client.MQTTMessage):
    __slots__ = ()

    def __init__(self, mid: int = 0, topic: bytes = b"") -> None:
        # paho's own fields and defaults, but for ``info``.
        self.timestamp = 0.0
        self.state = paho_client.mqtt_ms_invalid
        self.dup = False
        self.mid = mid
        self._topic = topic
        self.payload = b""
        self.qos = 0
        self.retain = False
        self.properties = None

    @property
    def info(self) -> paho_client.MQTTMessageInfo:
        try:
            info: paho_client.MQTTMessageInfo = _INFO_SLOT.__get__(self)
        except AttributeError:
            info = paho_client.MQTTMessageInfo(self.mid)
            _INFO_SLOT.__set__(self, info)
        return info

    @info.setter
    def info(self, value: paho_client.MQTTMessageInfo) -> None:
        _INFO_SLOT.__set__(self, value)


def install() -> None:
    """Make paho's packet decoder build its properties with the shared tables, and paho's client
    its messages with a lazy ``info`` (idempotent)."""
    _packet.Properties = SharedTableProperties  # type: ignore[attr-defined]
    paho_client.MQTTMessage = LazyInfoMessage  # type: ignore[misc]
