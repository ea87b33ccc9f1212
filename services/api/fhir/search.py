"""FHIR search parameters of the FHIR routes: the ``device`` and ``patient`` references, ``date``
values (prefix and precision) as bounds of ``recorded_at``, ``code`` tokens as the measures (and
panels) they select, and paging (``_count``, ``_cursor``)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Annotated

from fastapi import Query
from pydantic import StringConstraints

from services.api.fhir.resources import (
    MDC,
    MEASURES,
    OBSERVATION_SYSTEM,
    PANEL_CODE,
    PANEL_SYSTEM,
    Measure,
)
from services.api.problems import FieldError, Problem

DEFAULT_COUNT = 50
MAX_COUNT = 500


# --- search parameters ---------------------------------------------------------------------------

_SERIAL = r"[A-Za-z0-9-]{4,32}"
_UUID = r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}"
DEVICE_REFERENCE = rf"^(Device/)?{_SERIAL}$"
PATIENT_REFERENCE = rf"^(Patient/)?{_UUID}$"
# FHIR date search values with the prefixes served (not ne, ap): a year, a month, a day of the
# calendar (leap years included), or a date-time to the minute, second or fraction, which then
# needs a UTC offset. Whatever the pattern admits is served; nothing else is.
_YEAR = r"[1-9][0-9]{3}"
_LEAP_YEAR = r"([1-9][0-9](0[48]|[2468][048]|[13579][26])|(1[26]|[2468][048]|[3579][26])00)"
_MONTH = r"(0[1-9]|1[0-2])"
_DAY = rf"({_YEAR}-((0[13578]|1[02])-(0[1-9]|[12][0-9]|3[01])|(0[469]|11)-(0[1-9]|[12][0-9]|30)"
_DAY += rf"|02-(0[1-9]|1[0-9]|2[0-8]))|{_LEAP_YEAR}-02-29)"
_TIME = r"(T([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9](\.[0-9]{1,9})?)?"
_TIME += r"(Z|[+-](0[0-9]|1[0-3]):[0-5][0-9]|[+-]14:00))"
DATE_SEARCH = rf"^(eq|gt|lt|ge|le|sa|eb)?({_YEAR}(-{_MONTH})?|{_DAY}{_TIME}?)$"

DateSearch = Annotated[str, StringConstraints(pattern=DATE_SEARCH)]
CodeSearch = Annotated[str, StringConstraints(min_length=1, max_length=500)]

Count = Annotated[
    int,
    Query(
        alias="_count",
        title="_count",
        ge=1,
        le=MAX_COUNT,
        description=f"Resources per page (1-{MAX_COUNT}).",
        examples=[DEFAULT_COUNT],
    ),
]
PageCursor = Annotated[
    str | None,
    Query(
        alias="_cursor",
        title="_cursor",
        max_length=500,
        description="Opaque: taken from the `next` link of the previous page.",
    ),
]

_EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
_LATEST = datetime.max.replace(tzinfo=UTC)
_DATE = re.compile(DATE_SEARCH)
_DATE_PREFIX = re.compile(r"(eq|gt|lt|ge|le|sa|eb)?")
_CLOCK = re.compile(r"[0-9:.]+")


def _shift(at: datetime, by: timedelta) -> datetime:
    try:
        return at + by
    except OverflowError:
        return _LATEST


def _next_month(year: int, month: int) -> datetime:
    if year == 9999 and month == 12:
        return _LATEST
    return datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)


def _bad_date(why: str) -> Problem:
    return Problem(
        422,
        f"date: {why}",
        kind="validation",
        errors=[FieldError(field="query.date", message=why)],
    )


def date_range(value: str) -> tuple[datetime, datetime]:
    """The instants [start, end) a FHIR date search value (without prefix, of the form
    ``DATE_SEARCH`` allows) stands for: the whole year, month, day (UTC), minute, second or
    fraction it names."""
    if len(value) == 4:
        year = int(value)
        return datetime(year, 1, 1, tzinfo=UTC), _next_month(year, 12)
    if len(value) == 7:
        year, month = int(value[:4]), int(value[5:])
        return datetime(year, month, 1, tzinfo=UTC), _next_month(year, month)
    try:
        if len(value) == 10:
            day = date.fromisoformat(value)
            start = datetime(day.year, day.month, day.day, tzinfo=UTC)
            return start, _shift(start, timedelta(days=1))
        given = datetime.fromisoformat(value)
    except ValueError as exc:
        raise _bad_date("not a calendar date") from exc
    clock = _CLOCK.match(value, 11)  # hh:mm[:ss[.fff]], the precision given
    digits = 0 if clock is None else len(clock.group())
    if digits <= 5:
        width = timedelta(minutes=1)
    elif digits == 8:
        width = timedelta(seconds=1)
    else:
        width = timedelta(microseconds=10 ** (6 - min(digits - 9, 6)))
    try:
        start = given.astimezone(UTC)
    except OverflowError:
        return _LATEST, _LATEST
    return start, _shift(start, width)


def date_bounds(values: Sequence[str]) -> tuple[datetime, datetime]:
    """``recorded_at`` from (inclusive) and until (exclusive) for the ``date`` parameters,
    which all apply (AND)."""
    low, high = _EARLIEST, _LATEST
    for value in values:
        if _DATE.fullmatch(value) is None:
            raise _bad_date("not a FHIR date search value this server serves")
        found = _DATE_PREFIX.match(value)
        assert found is not None  # the pattern matches any string
        prefix = found.group(1) or "eq"
        start, end = date_range(value[found.end() :])
        if prefix == "eq":
            low, high = max(low, start), min(high, end)
        elif prefix == "ge":
            low = max(low, start)
        elif prefix in ("gt", "sa"):
            low = max(low, end)
        elif prefix in ("lt", "eb"):
            high = min(high, start)
        else:  # le
            high = min(high, end)
    return low, high


def _matches(system: str | None, code: str, measure: Measure | None) -> bool:
    """Whether a ``code`` token (``system`` None: no ``|``, any system; ``code`` empty: every
    code of the system) names a measure's Observation (one of its codings) or, ``measure``
    None, a panel."""
    codings = (
        [(PANEL_SYSTEM, PANEL_CODE)]
        if measure is None
        else [(OBSERVATION_SYSTEM, measure.code)] + ([(MDC, measure.mdc[0])] if measure.mdc else [])
    )
    return any(
        (system is None or system == own_system) and code in ("", own_code)
        for own_system, own_code in codings
    )


def wanted_observations(params: Sequence[str]) -> tuple[tuple[Measure, ...], bool]:
    """The measures the ``code`` parameters select, and whether the readings' panels are
    selected: each parameter a comma-separated list of tokens (``code``, ``system|code``,
    ``system|``) of which one must match; all parameters apply. Without any, every measure and
    no panel: a panel is found by its code only (``pump-reading``)."""
    wanted: list[Measure | None] = list(MEASURES)
    if params:
        wanted.append(None)
    for param in params:
        tokens: list[tuple[str | None, str]] = []
        for token in param.split(","):
            system, bar, code = token.rpartition("|")
            if not bar:
                if code:
                    tokens.append((None, code))
            elif system:  # `|code` (no system) names none of these codes
                tokens.append((system, code))
        wanted = [m for m in wanted if any(_matches(sy, co, m) for sy, co in tokens)]
    measures = tuple(m for m in wanted if m is not None)
    return measures, None in wanted


def device_serial(reference: str) -> str:
    return reference.removeprefix("Device/")


PANEL_SLOT = -1
"""Where a reading's panel is within its Observations (first; its measures are 0, 1, ...)."""


def cursor_slot(value: str | None) -> int:
    """The Observation of a reading a page starts at: ``p`` its panel, else a measure's index."""
    if value == "p":
        return PANEL_SLOT
    if value is None or not value.isdigit() or int(value) >= len(MEASURES):
        raise Problem(400, "cursor is not one this API gave out", kind="bad-cursor")
    return int(value)


def slot_cursor(slot: int) -> str:
    return "p" if slot == PANEL_SLOT else str(slot)
