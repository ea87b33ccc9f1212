"""Sequence bookkeeping, pure."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.domain.sequence import advance, continues, fill, missing_count


def test_first_numbers_of_a_stream_open_no_gap_before_them() -> None:
    step = advance(None, [7, 8, 9])
    assert step.max_seq == 9
    assert step.new_gaps == []
    assert step.late == []


def test_a_jump_opens_a_gap_and_holes_inside_a_batch_too() -> None:
    step = advance(9, [10, 13, 14, 20])
    assert step.max_seq == 20
    assert step.new_gaps == [(11, 12), (15, 19)]


def test_numbers_at_or_below_the_maximum_are_late() -> None:
    step = advance(20, [12, 20, 21])
    assert step.max_seq == 21
    assert step.late == [12, 20]
    assert step.new_gaps == []


def test_only_late_numbers_keep_the_maximum() -> None:
    assert advance(20, [3]).max_seq == 20


def test_advance_needs_numbers() -> None:
    with pytest.raises(ValueError, match="at least one"):
        advance(3, [])


def test_fill_splits_removes_or_ignores() -> None:
    assert fill((11, 15), [13]) == [(11, 12), (14, 15)]
    assert fill((11, 15), [11, 12, 13, 14, 15]) == []
    assert fill((11, 15), [11]) == [(12, 15)]
    assert fill((11, 15), [15]) == [(11, 14)]
    assert fill((11, 15), [3, 99]) == [(11, 15)]


@given(
    st.sets(st.integers(min_value=0, max_value=300), min_size=1, max_size=80),
    st.randoms(use_true_random=False),
)
@settings(max_examples=300, derandomize=True)
def test_gaps_plus_arrivals_cover_the_whole_range_whatever_the_order(
    arrived: set[int], rnd: object
) -> None:
    """Batches in any order: what is missing at the end is exactly the holes below the max."""
    assert isinstance(rnd, random.Random)
    order = sorted(arrived)
    rnd.shuffle(order)
    batches = [order[i : i + 7] for i in range(0, len(order), 7)]
    top: int | None = None
    gaps: list[tuple[int, int]] = []
    for batch in batches:
        step = advance(top, batch)
        for seq in step.late:
            gaps = [piece for gap in gaps for piece in fill(gap, [seq])]
        gaps.extend(step.new_gaps)
        top = step.max_seq
    first_batch_min = min(batches[0])
    expected_missing = {s for s in range(first_batch_min, max(arrived) + 1) if s not in arrived}
    got_missing = {s for first, last in gaps for s in range(first, last + 1)}
    # Numbers below the first batch's minimum were never expected (the stream's start is unknown).
    assert got_missing == expected_missing
    assert missing_count(gaps) == len(got_missing)


def test_continues_only_for_the_next_numbers_without_a_hole() -> None:
    assert continues(9, {10, 11, 12})
    assert continues(None, {7, 8, 9})
    assert not continues(9, {11, 12})  # 10 is missing
    assert not continues(9, {10, 12})  # 11 is missing
    assert not continues(9, {9, 10})  # 9 is late
    assert not continues(None, {7, 9})
    assert not continues(9, set())


@given(
    st.one_of(st.none(), st.integers(0, 40)),
    st.sets(st.integers(0, 60), min_size=1, max_size=12),
)
@settings(max_examples=500)
def test_continues_exactly_when_advance_finds_nothing(previous: int | None, seqs: set[int]) -> None:
    """The writer skips advance() when continues() holds: it must be the case where advance()
    would have found no gap and nothing late (and the other way round)."""
    step = advance(previous, seqs)
    assert continues(previous, seqs) == (not step.new_gaps and not step.late)
