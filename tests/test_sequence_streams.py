"""Ingest's stream upsert (services/ingest/sql.py ADVANCE_SEQUENCE_STREAMS) on real PostgreSQL:
every stream moves to its new maximum, and exactly the streams whose batch does not just
continue them (sequence.continues) come back, with the maximum and its time from before, which
the writer needs to open gaps and fill them. A stream left out wrongly would hide a gap."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import asyncpg

from services.domain.sequence import continues
from services.ingest import sql

BASE = datetime(2026, 11, 1, tzinfo=UTC)


def _arrived(rng: random.Random, previous: int | None) -> set[int]:
    """Numbers of one batch, of the shapes a stream meets: the next run, a run with a hole, a
    jump, late ones, the maximum again, a lone number, anything."""
    start = 0 if previous is None else previous + 1
    run = rng.randint(1, 6)
    low = max(0, start - 5)
    shapes = (
        lambda: set(range(start, start + run)),  # the next numbers (continues)
        lambda: set(range(start, start + run + 2)) - {start + 1},  # a hole inside the run
        lambda: set(range(start + 2, start + 2 + run)),  # a jump past the next number
        lambda: {rng.randint(low, max(low, start - 1)) for _ in range(run)},  # late
        lambda: {max(0, start - 1), start},  # the maximum again, then the next
        lambda: {max(0, start + rng.randint(-3, 3))},  # one number, anywhere near
        lambda: {rng.randint(0, start + 8) for _ in range(run)},  # anything
    )
    return rng.choice(shapes)()


async def test_only_the_streams_a_batch_does_not_continue_come_back(database_url: str) -> None:
    rng = random.Random(20)
    conn = await asyncpg.connect(database_url)
    try:
        serials = [f"NGPSEQ{i:04d}" for i in range(400)]
        await conn.execute(sql.INSERT_PUMPS, serials, [None] * len(serials))
        previous: dict[tuple[str, str], int | None] = {}
        for i, serial in enumerate(serials):
            key = (serial, "" if i % 3 else "HUB-1")
            previous[key] = None if i % 5 == 0 else rng.randint(0, 50)
        existing = [(k, p) for k, p in previous.items() if p is not None]
        await conn.execute(
            "INSERT INTO sequence_state (serial, source_id, max_seq, max_recorded_at) "
            "SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::timestamptz[])",
            [k[0] for k, _ in existing],
            [k[1] for k, _ in existing],
            [p for _, p in existing],
            [BASE + timedelta(minutes=p) for _, p in existing],
        )
        arrived = {k: _arrived(rng, p) for k, p in previous.items()}
        keys = sorted(arrived)
        rows = await conn.fetch(
            sql.ADVANCE_SEQUENCE_STREAMS,
            [k[0] for k in keys],
            [k[1] for k in keys],
            [max(arrived[k]) for k in keys],
            [BASE + timedelta(minutes=max(arrived[k]), seconds=1) for k in keys],
            [min(arrived[k]) for k in keys],
            [len(arrived[k]) for k in keys],
        )
        back = {(r["serial"], r["source_id"]): r for r in rows}
        expected = {k for k in keys if not continues(previous[k], arrived[k])}
        assert set(back) == expected
        # both kinds are there in numbers, so the comparison means something
        assert 100 < len(expected) < len(keys) - 50, len(expected)
        for key, row in back.items():
            assert row["previous_max"] == previous[key], key
            at = previous[key]
            assert row["previous_max_at"] == (None if at is None else BASE + timedelta(minutes=at))
        state = {
            (r["serial"], r["source_id"]): (r["max_seq"], r["max_recorded_at"])
            for r in await conn.fetch("SELECT * FROM sequence_state")
        }
        for key in keys:
            before = previous[key]
            top = max(arrived[key])
            if before is None or top > before:
                assert state[key] == (top, BASE + timedelta(minutes=top, seconds=1)), key
            else:  # only late numbers: the maximum and its time stay
                assert state[key] == (before, BASE + timedelta(minutes=before)), key
    finally:
        await conn.close()


TOP = 2**63 - 1
"""The largest sequence number the contract allows."""


async def test_numbers_at_the_ends_of_their_range_never_overflow(database_url: str) -> None:
    """A stream at the largest number that then starts again at 0, a batch holding both ends,
    and the next number after a maximum of 0: the statement answers as continues() does (an
    overflow would refuse the batch, and every later message of the stream with it)."""
    conn = await asyncpg.connect(database_url)
    try:
        serials = ["NGPSEQEND1", "NGPSEQEND2", "NGPSEQEND3", "NGPSEQEND4"]
        await conn.execute(sql.INSERT_PUMPS, serials, [None] * len(serials))
        await conn.execute(
            "INSERT INTO sequence_state (serial, source_id, max_seq, max_recorded_at) "
            "VALUES ('NGPSEQEND1', '', $1, $3), ('NGPSEQEND3', '', 0, $3), "
            "('NGPSEQEND4', '', $2, $3)",
            TOP,
            TOP - 1,
            BASE,
        )
        previous = {"NGPSEQEND1": TOP, "NGPSEQEND2": None, "NGPSEQEND3": 0, "NGPSEQEND4": TOP - 1}
        arrived = {
            "NGPSEQEND1": {0},
            "NGPSEQEND2": {0, TOP},
            "NGPSEQEND3": {1},
            "NGPSEQEND4": {TOP},
        }
        rows = await conn.fetch(
            sql.ADVANCE_SEQUENCE_STREAMS,
            serials,
            [""] * len(serials),
            [max(arrived[s]) for s in serials],
            [BASE + timedelta(minutes=1)] * len(serials),
            [min(arrived[s]) for s in serials],
            [len(arrived[s]) for s in serials],
        )
        back = {r["serial"]: r["previous_max"] for r in rows}
        assert back == {"NGPSEQEND1": TOP, "NGPSEQEND2": None}
        assert {s for s in serials if not continues(previous[s], arrived[s])} == set(back)
        assert (
            await conn.fetchval("SELECT max_seq FROM sequence_state WHERE serial = 'NGPSEQEND4'")
            == TOP
        )
    finally:
        await conn.close()
