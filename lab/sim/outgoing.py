"""What the simulator emits: MQTT messages ready to publish, and the ones it lost on purpose."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from services.domain.contract import Reason

Kind = Literal["telemetry", "events"]


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One MQTT message as a pump (or its hub or programmer) publishes it."""

    topic: str
    payload: bytes
    kind: Kind
    msg_id: str | None
    """The payload's ``msg_id``; None when the payload carries none that can be parsed."""
    serial: str
    """The pump's serial, as in the topic (a malformed payload may claim another)."""
    valid: bool
    """True when the simulator meant the contract to accept the message."""
    at: datetime
    """Simulation time of sending, in the pump's UTC offset. Equals ``recorded_at`` except for a
    malformed message with a skewed clock."""
    reason: Reason | None = None
    """For a malformed message, the quarantine reason the contract must give."""


@dataclass(frozen=True, slots=True)
class Lost:
    """A message that the ``gap`` fault lost between the device and the broker."""

    serial: str
    source_id: str
    seq: int
    kind: Kind
    at: datetime
