"""Time for the notification worker: its clock (the wall clock, or a test's), timestamps as
ISO 8601 in UTC, and the waits of its loops, which end early when ``stop`` is set."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import UTC, datetime

Clock = Callable[[], datetime]


def wall_clock() -> datetime:
    return datetime.now(UTC)


def iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat()


async def wait(event: asyncio.Event, stop: asyncio.Event, timeout_s: float) -> None:
    """Until ``event`` or ``stop`` is set, or the timeout."""
    waiters = {
        asyncio.ensure_future(event.wait()),
        asyncio.ensure_future(stop.wait()),
    }
    _, pending = await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    for waiter in pending:
        waiter.cancel()


async def pause(stop: asyncio.Event, seconds: float) -> None:
    """``seconds``, or until ``stop`` is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
