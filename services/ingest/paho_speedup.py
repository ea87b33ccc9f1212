"""A measured speed-up for paho-mqtt 2.x receiving MQTT 5 PUBLISH packets.

For every MQTT 5 packet, paho's ``Properties.__init__`` rebuilds two lookup tables of 28 entries
(property names and types) that never change, and ``Properties.clear`` walks all 28 names with
string replacing and ``hasattr``. Decoding one PUBLISH took 9.7 µs, of which 6.7 µs went there
(``decode_publish`` drops to 2.9 µs with the tables shared); profiling ingest under load showed
this as the largest single cost after the socket reads.

The subclass below shares one copy of the tables and clears by dictionary ``pop``; everything
else (reading, validating, ``__setattr__``) is paho's own. It is installed where paho's packet
decoder looks the class up. ``tests/test_paho_speedup.py`` checks that properties decode the
same with and without it. paho-mqtt is pinned below 3.
"""

from __future__ import annotations

from typing import Any

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


def install() -> None:
    """Make paho's packet decoder build its properties with the shared tables (idempotent)."""
    _packet.Properties = SharedTableProperties  # type: ignore[attr-defined]
