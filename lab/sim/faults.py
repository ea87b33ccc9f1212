"""The failures the simulator can give a pump, and which pumps can have each."""

from __future__ import annotations

from enum import StrEnum


class Fault(StrEnum):
    """A failure mode of one simulated pump, with what its telemetry and refills then show."""

    MOTOR_STALL = "motor_stall"
    """Intermittent stalls: ``motor_stall`` alarm, no delivery while stalled; more residual than
    expected at refill. SynchroMed pumps only (Prometra has no motor)."""
    OCCLUSION = "occlusion"
    """Catheter blocked for days at a time: measured flow near 0 and the measured volume flat while
    the programme runs. Pumps with a flow sensor only (others cannot show it live)."""
    OVER_INFUSION = "over_infusion"
    """Delivers ~1.2x the programmed rate; a calculated pump's volume does not show it; less
    residual than expected at refill."""
    MISSED_REFILL = "missed_refill"
    """The clinic never refills: the volume reaches the low alarm, then empty."""
    BATTERY = "battery"
    """Premature battery depletion: ERI within days, then EOS, when delivery stops."""
    SILENCE = "silence"
    """The pump stops publishing after a few days."""
    MALFORMED = "malformed"
    """A share of its messages is broken in ways the contract must refuse."""
    GAP = "gap"
    """Some messages are lost before the broker: their sequence numbers are consumed, not sent."""


def fault_needs(fault: Fault) -> str | None:
    """What a pump needs to have this fault, in words, or None if any pump can have it."""
    if fault is Fault.MOTOR_STALL:
        return "a SynchroMed II pump (it has a motor)"
    if fault is Fault.OCCLUSION:
        return "a pump with a flow sensor (measured basis)"
    return None
