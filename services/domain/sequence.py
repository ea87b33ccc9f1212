"""Sequence-number bookkeeping: which messages of a (pump, source) stream never arrived.

Each source numbers the messages it publishes for a pump 0, 1, 2, … A jump past the highest
number seen opens a gap; a late arrival inside a gap closes that part of it. A number at or below
the highest seen that is in no gap is stale (a re-send with a new id, or a source that restarted
its count) and changes nothing.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

Range = tuple[int, int]
"""An inclusive range of missing sequence numbers."""


@dataclass(frozen=True, slots=True)
class Advance:
    max_seq: int
    new_gaps: list[Range] = field(default_factory=list)
    late: list[int] = field(default_factory=list)
    """Numbers at or below the previous maximum: they may fill a known gap."""


def advance(previous_max: int | None, seqs: Iterable[int]) -> Advance:
    """Fold the numbers that arrived in one batch into a stream whose highest so far is given.

    The first numbers ever seen for a stream open no gap before them: we cannot know where the
    source started."""
    ordered = sorted(set(seqs))
    if not ordered:
        raise ValueError("advance() needs at least one sequence number")
    late = [s for s in ordered if previous_max is not None and s <= previous_max]
    fresh = [s for s in ordered if previous_max is None or s > previous_max]
    gaps: list[Range] = []
    expected = None if previous_max is None else previous_max + 1
    for seq in fresh:
        if expected is not None and seq > expected:
            gaps.append((expected, seq - 1))
        expected = seq + 1
    top = fresh[-1] if fresh else previous_max
    assert top is not None
    return Advance(max_seq=top, new_gaps=gaps, late=late)


def continues(previous_max: int | None, seqs: Collection[int]) -> bool:
    """Whether distinct numbers just continue the stream: the next ones after the previous
    maximum (any run of consecutive numbers for a new stream), so :func:`advance` would find no
    gap and nothing late."""
    if not seqs:
        return False
    low, high = min(seqs), max(seqs)
    if high - low + 1 != len(seqs):
        return False
    return previous_max is None or low == previous_max + 1


def fill(gap: Range, arrived: Iterable[int]) -> list[Range]:
    """What remains of a gap once the given numbers have arrived."""
    first, last = gap
    remaining: list[Range] = []
    cursor = first
    for seq in sorted(set(arrived)):
        if seq < cursor or seq > last:
            continue
        if seq > cursor:
            remaining.append((cursor, seq - 1))
        cursor = seq + 1
    if cursor <= last:
        remaining.append((cursor, last))
    return remaining


def missing_count(gaps: Iterable[Range]) -> int:
    return sum(last - first + 1 for first, last in gaps)
