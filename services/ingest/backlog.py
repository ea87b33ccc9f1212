"""The in-memory backlog between the MQTT bridge and the batch writer."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True)
class Incoming:
    """One message as the broker handed it over, not yet judged."""

    mid: int
    qos: int
    topic: str
    payload: bytes
    received_at: float
    generation: int


class Backlog:
    """Messages received and not yet committed, bounded; the bridge pauses reading when full."""

    def __init__(self, capacity: int, batch_size: int) -> None:
        self.capacity = capacity
        self.batch_size = batch_size
        self._items: deque[Incoming] = deque()
        self._nonempty = asyncio.Event()
        self._full_batch = asyncio.Event()
        self.closed = False
        self.on_drained: Callable[[], None] = lambda: None

    def __len__(self) -> int:
        return len(self._items)

    def oldest_received_at(self) -> float | None:
        try:
            return self._items[0].received_at
        except IndexError:
            return None

    @property
    def full(self) -> bool:
        return len(self._items) >= self.capacity

    def put(self, item: Incoming) -> None:
        self._items.append(item)
        self._nonempty.set()
        if len(self._items) >= self.batch_size:
            self._full_batch.set()

    def close(self) -> None:
        """No more messages will come: ``take`` returns what is left, then empty batches."""
        self.closed = True
        self._nonempty.set()
        self._full_batch.set()

    async def take(self, max_wait_s: float) -> list[Incoming]:
        """The next batch: as soon as one is full, or ``max_wait_s`` after its first message."""
        await self._nonempty.wait()
        if len(self._items) < self.batch_size and not self.closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._full_batch.wait(), max_wait_s)
        return self.take_now()

    def take_now(self) -> list[Incoming]:
        count = min(len(self._items), self.batch_size)
        batch = [self._items.popleft() for _ in range(count)]
        if not self._items and not self.closed:
            self._nonempty.clear()
        if len(self._items) < self.batch_size and not self.closed:
            self._full_batch.clear()
        if len(self._items) <= self.capacity // 2:
            self.on_drained()
        return batch
