"""When a failed delivery is tried again: exponential backoff with jitter, for a window."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

_MAX_DOUBLINGS = 60


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    first_s: float = 10.0
    """The wait after the first failed attempt; it doubles after each further failure…"""
    max_s: float = 3600.0
    """…up to this…"""
    jitter_fraction: float = 0.2
    """…spread at random by ± this fraction…"""
    window_s: float = 86400.0
    """…for this long after the delivery was due; the last attempt is at the window's end."""


def retry_delay_s(failed_attempts: int, policy: RetryPolicy, rand: float) -> float:
    """The wait after ``failed_attempts`` (≥ 1) failures; ``rand`` uniform in [0, 1)."""
    if failed_attempts < 1:
        raise ValueError("failed_attempts must be at least 1")
    doublings = min(failed_attempts - 1, _MAX_DOUBLINGS)
    base = min(policy.max_s, policy.first_s * 2.0**doublings)
    return base * (1.0 + policy.jitter_fraction * (2.0 * rand - 1.0))


def next_attempt(
    *, now: datetime, due_at: datetime, failed_attempts: int, policy: RetryPolicy, rand: float
) -> datetime | None:
    """When to try again after a failure at ``now``, or None: the window is over, give up.

    Never later than the window's end, so the last attempt is made at the end of the window
    (retries last at least the window)."""
    end = due_at + timedelta(seconds=policy.window_s)
    if now >= end:
        return None
    delay = timedelta(seconds=retry_delay_s(failed_attempts, policy, rand))
    return min(now + delay, end)
