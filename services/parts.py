"""A part: work that a service process runs beside its own, on a thread of its own.

``pumpwatch alerts`` runs the notification worker this way (unless told not to). The command
line builds the part and hands it to the service, so that no service package imports another:
the service knows only this interface.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from prometheus_client import CollectorRegistry


class Part(Protocol):
    def start(self) -> None:
        """Start on a thread of its own; returns once it runs."""

    def stop(self) -> None:
        """Ask it to finish (work in flight completes, for a while)."""

    def join(self, timeout_s: float) -> bool:
        """Wait for it to end; False if it still runs after ``timeout_s``."""


PartFactory = Callable[[CollectorRegistry, Callable[[str], None]], Part]
"""Builds a part given the host's metrics registry (the part's metrics are served beside the
host's) and the function it calls, from its thread, if it fails (with the reason)."""
