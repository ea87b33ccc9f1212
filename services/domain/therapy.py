"""Therapy arithmetic: what a pump delivers, when its reservoir reaches its low alarm and runs
empty, what a refill should find, and how measured delivery compares with the program.

Pure functions, no I/O; ``now`` and the pump's zone are passed in. Units are in the names
(mL, mL/day, mcg/day, mcg/mL). Every datetime must be timezone-aware; instants returned are UTC.

Time. A flex schedule's steps start at wall-clock times of the pump's zone; delivery is
integrated over real elapsed time. Integrating over wall-clock time and then correcting for each
UTC-offset shift inside the window gives both exactly and cheaply::

    delivered = W(wall(start), wall(end)) + sum over shifts of W(wall after, wall before)

where ``W`` integrates the schedule over wall-clock time (whole days count in O(1): days x the
daily volume). A shift forward (spring) subtracts the wall-clock hour that never happened; a shift
back (autumn) adds the hour that happened twice. So a step that starts inside a skipped hour
begins when the clock jumps past its start, and steps inside a repeated hour run twice: the pump
follows its wall clock. Shifts are found by probing the zone's offset once per day, cached per
zone and year (fixed-offset zones have none); zones shift at most once a day.

A program with a flex schedule delivers what its steps say (``rate_ml_per_day``, their 24-hour
average, is then not used); without one, the constant rate.

Forecasts follow docs/contract/http.md: ``low_alarm_at`` is when the reservoir reaches its
low-alarm volume at ``factor`` x the programmed delivery, projected from one reading; None when
the program delivers nothing.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta, timezone, tzinfo
from functools import lru_cache
from itertools import pairwise
from typing import Literal

from services.domain.alerting import Bolus, Patient, Reading, RuleSettings, Step, Therapy

_DAY_S = 86400
_DAY = timedelta(days=1)
_EPS = 1e-9
"""Below this (mL, or a fraction), a difference is rounding, not a finding: floating-point noise
must not decide on which side of a threshold a value falls."""
REFILL_JUMP_ML = 1.0
"""A measured level rising by more than this between two readings is a refill (level sensors
are noisy to a few tenths of a mL; refills add tens)."""
HORIZON_DAYS = 36525.0
"""Forecasts further than 100 years ahead are "never" (None): no pump or patient lasts that
long, and offset shifts would have to be found year by year all the way."""
MIN_FIT_POINTS = 3
"""A level-derived delivery is a least-squares fit over at least this many readings."""

Basis = Literal["measured", "calculated"]
Classification = Literal["none", "over_delivery", "under_delivery"]


# --- units -------------------------------------------------------------------------------------


def ml_per_day(dose_mcg_per_day: float, concentration_mcg_per_ml: float) -> float:
    """Flow from dose: 400 mcg/day at 2000 mcg/mL is 0.2 mL/day."""
    if concentration_mcg_per_ml <= 0:
        raise ValueError("concentration_mcg_per_ml must be positive")
    return dose_mcg_per_day / concentration_mcg_per_ml


def mcg_per_day(rate_ml_per_day: float, concentration_mcg_per_ml: float) -> float:
    """Dose from flow: 0.2 mL/day at 2000 mcg/mL is 400 mcg/day."""
    return rate_ml_per_day * concentration_mcg_per_ml


def bolus_ml(bolus: Bolus, concentration_mcg_per_ml: float) -> float:
    return ml_per_day(bolus.dose_mcg, concentration_mcg_per_ml)


def days_until(at: datetime, now: datetime) -> float:
    """Days from ``now`` to ``at`` in real elapsed time (negative when ``at`` has passed)."""
    return (_utc(at) - _utc(now)) / _DAY


# --- the daily profile of a program --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Profile:
    """A program as segments of the local day: segment i runs from ``starts_s[i]`` (seconds after
    local midnight; the first is 0) to the next start at ``rates[i]`` mL/day."""

    starts_s: tuple[int, ...]
    rates: tuple[float, ...]
    cum_ml: tuple[float, ...]
    """Delivered from local midnight to each segment's start."""
    daily_ml: float

    @property
    def rounding_ml(self) -> float:
        """Volumes closer than this are equal: sums of a day's steps carry rounding errors."""
        return 1e-12 * self.daily_ml

    @property
    def constant(self) -> bool:
        return len(self.rates) == 1

    def partial_ml(self, second: float) -> float:
        """Delivered from local midnight to ``second`` of the day (wall-clock time)."""
        i = bisect_right(self.starts_s, second) - 1
        return self.cum_ml[i] + self.rates[i] * (second - self.starts_s[i]) / _DAY_S

    def second_reaching(self, volume_ml: float) -> float:
        """The earliest second of the day by which ``volume_ml`` (0 < v <= the daily volume)
        has been delivered since local midnight."""
        ends = (*self.starts_s[1:], _DAY_S)
        last = 0.0
        for start, end, rate, cum in zip(self.starts_s, ends, self.rates, self.cum_ml, strict=True):
            if rate <= 0:
                continue
            last = float(end)
            # A volume that a segment's end reaches but for rounding is reached there, not
            # after the idle steps that may follow.
            if cum + rate * (end - start) / _DAY_S >= volume_ml - self.rounding_ml:
                return min(float(end), max(float(start), start + (volume_ml - cum) * _DAY_S / rate))
        return last  # rounding left volume_ml a hair above the day's total


@lru_cache(maxsize=1024)
def _profile(therapy: Therapy) -> _Profile:
    if not therapy.schedule:
        _check_rate(therapy.rate_ml_per_day)
        return _Profile((0,), (therapy.rate_ml_per_day,), (0.0,), therapy.rate_ml_per_day)
    steps: dict[int, float] = {}
    for step in sorted(therapy.schedule, key=lambda s: s.start_minute):
        _check_step(step)
        steps[step.start_minute * 60] = step.rate_ml_per_day  # a repeated start: the last wins
    starts = list(steps)
    rates = list(steps.values())
    if starts[0] != 0:  # before the first step, the last step of the day before still runs
        starts.insert(0, 0)
        rates.insert(0, rates[-1])
    cum = [0.0]
    for i in range(1, len(starts)):
        cum.append(cum[-1] + rates[i - 1] * (starts[i] - starts[i - 1]) / _DAY_S)
    daily = cum[-1] + rates[-1] * (_DAY_S - starts[-1]) / _DAY_S
    return _Profile(tuple(starts), tuple(rates), tuple(cum), daily)


def _check_rate(rate_ml_per_day: float) -> None:
    if not rate_ml_per_day >= 0 or math.isinf(rate_ml_per_day):
        raise ValueError(f"rate_ml_per_day must be finite and >= 0, not {rate_ml_per_day}")


def _check_step(step: Step) -> None:
    if not 0 <= step.start_minute < 1440:
        raise ValueError(
            f"a flex step must start within the day, not at minute {step.start_minute}"
        )
    _check_rate(step.rate_ml_per_day)


def daily_ml(therapy: Therapy) -> float:
    """What the program delivers in a 24-hour local day (the flex steps integrated)."""
    return _profile(therapy).daily_ml


# --- wall-clock time and offset shifts -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Shift:
    """The zone's UTC offset changes from ``before`` to ``after`` at the instant ``at``."""

    at: datetime
    before: timedelta
    after: timedelta

    @property
    def wall_before(self) -> datetime:
        """The wall clock just before the shift (it jumps from here)."""
        return (self.at + self.before).replace(tzinfo=None)

    @property
    def wall_after(self) -> datetime:
        """The wall clock at the shift (it jumps to here)."""
        return (self.at + self.after).replace(tzinfo=None)


def _utc(at: datetime) -> datetime:
    # Aware datetimes sharing one ZoneInfo subtract by wall clock; in UTC, by elapsed time.
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(f"datetime {at.isoformat()} must be timezone-aware")
    return at.astimezone(UTC)


def _offset(at: datetime, tz: tzinfo) -> timedelta:
    return at.astimezone(tz).utcoffset() or timedelta(0)


def _wall(at: datetime, tz: tzinfo) -> datetime:
    return at.astimezone(tz).replace(tzinfo=None)


def _second_of_day(wall: datetime) -> float:
    return wall.hour * 3600 + wall.minute * 60 + wall.second + wall.microsecond / 1e6


def _wall_ml(profile: _Profile, start: datetime, end: datetime) -> float:
    """The program integrated over wall-clock time from ``start`` to ``end`` (naive, local);
    signed: negative when ``end`` is earlier."""
    days = (end.date() - start.date()).days
    return (
        days * profile.daily_ml
        + profile.partial_ml(_second_of_day(end))
        - profile.partial_ml(_second_of_day(start))
    )


@lru_cache(maxsize=512)
def _shifts_in_year(tz: tzinfo, year: int) -> tuple[_Shift, ...]:
    """The zone's offset shifts in (``year``-01-01, next year-01-01] UTC."""
    if isinstance(tz, timezone):
        return ()
    probe = datetime(year, 1, 1, tzinfo=UTC)
    end = datetime(year + 1, 1, 1, tzinfo=UTC)
    offset = _offset(probe, tz)
    shifts: list[_Shift] = []
    while probe < end:
        following = min(probe + _DAY, end)
        next_offset = _offset(following, tz)
        if next_offset != offset:
            shifts.append(_locate_shift(tz, probe, following, offset))
        probe, offset = following, next_offset
    return tuple(shifts)


def _locate_shift(tz: tzinfo, low: datetime, high: datetime, before: timedelta) -> _Shift:
    """The first second in (low, high] whose offset differs from ``before``, by bisection."""
    low_s, high_s = math.floor(low.timestamp()), math.ceil(high.timestamp())
    while high_s - low_s > 1:
        middle = (low_s + high_s) // 2
        if _offset(datetime.fromtimestamp(middle, UTC), tz) == before:
            low_s = middle
        else:
            high_s = middle
    at = datetime.fromtimestamp(high_s, UTC)
    return _Shift(at, before, _offset(at, tz))


def _shifts(tz: tzinfo, start: datetime, end: datetime) -> list[_Shift]:
    """Shifts with ``start < at <= end`` (UTC instants), in order."""
    return [
        shift
        for year in range(start.year - 1, end.year + 1)
        for shift in _shifts_in_year(tz, year)
        if start < shift.at <= end
    ]


# --- delivery ------------------------------------------------------------------------------------


def delivered_ml(therapy: Therapy, start: datetime, end: datetime, tz: tzinfo) -> float:
    """What the program delivers from ``start`` to ``end`` (0 when ``end`` is not later).

    A flex schedule is integrated step by step in the local time of ``tz``; a constant rate
    does not depend on the zone."""
    start_utc, end_utc = _utc(start), _utc(end)
    if end_utc <= start_utc:
        return 0.0
    profile = _profile(therapy)
    if profile.constant:
        return profile.daily_ml * ((end_utc - start_utc) / _DAY)
    total = _wall_ml(profile, _wall(start_utc, tz), _wall(end_utc, tz))
    for shift in _shifts(tz, start_utc, end_utc):
        total += _wall_ml(profile, shift.wall_after, shift.wall_before)
    return max(0.0, total)


def time_to_deliver(
    therapy: Therapy, volume_ml: float, start: datetime, tz: tzinfo
) -> datetime | None:
    """The earliest instant (UTC) by which the program has delivered ``volume_ml`` since
    ``start``: the inverse of :func:`delivered_ml`. ``start`` itself for a volume <= 0; None when
    the program delivers nothing, or not within :data:`HORIZON_DAYS` (or the calendar)."""
    start_utc = _utc(start)
    if volume_ml <= 0:
        return start_utc
    profile = _profile(therapy)
    if profile.daily_ml <= 0 or volume_ml / profile.daily_ml > HORIZON_DAYS:
        return None
    try:
        if profile.constant:
            return start_utc + timedelta(days=volume_ml / profile.daily_ml)
        return _flex_time_to_deliver(profile, volume_ml, start_utc, tz)
    except OverflowError:
        return None


def _flex_time_to_deliver(
    profile: _Profile, volume_ml: float, start: datetime, tz: tzinfo
) -> datetime:
    at, remaining = start, volume_ml
    while True:
        wall = _wall(at, tz)
        # Between shifts, wall-clock time runs with real time: solve there, then check that no
        # shift came first; if one did, deliver up to it and go on from there.
        candidate = at + (_wall_reaching(profile, wall, remaining) - wall)
        shift = next(iter(_shifts(tz, at, candidate)), None)
        if shift is None:
            return candidate
        remaining -= _wall_ml(profile, wall, shift.wall_before)
        at = shift.at
        if remaining <= profile.rounding_ml:
            return at


def _wall_reaching(profile: _Profile, wall: datetime, volume_ml: float) -> datetime:
    """The earliest wall-clock time by which ``volume_ml`` (> 0) has been delivered since
    ``wall``, ignoring offset shifts."""
    total = profile.partial_ml(_second_of_day(wall)) + volume_ml
    days = math.floor(total / profile.daily_ml)
    rest = total - days * profile.daily_ml
    if rest <= profile.rounding_ml:  # whole days' worth: reached on the day before, maybe early
        days -= 1
        rest += profile.daily_ml
    midnight = datetime.combine(wall.date(), time())
    reached = midnight + timedelta(days=days, seconds=profile.second_reaching(rest))
    return max(reached, wall)


# --- forecasts -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Forecast:
    """When the reservoir reaches its low-alarm volume and runs empty (the API's forecast
    object). Both instants are UTC; None when the program delivers nothing (or not within
    :data:`HORIZON_DAYS`). A reservoir already
    at or below a level when read reaches it at the reading's time: we do not project backwards
    (a refill may lie between), so ``days_to_low_alarm`` is then zero or negative."""

    volume_ml: float
    """At the reading, after the boluses given since."""
    low_alarm_ml: float
    rate_ml_per_day: float
    """The daily volume at the forecast's factor (the flex steps integrated over 24 h)."""
    low_alarm_at: datetime | None
    empty_at: datetime | None
    basis: Basis

    def days_to_low_alarm(self, now: datetime) -> float | None:
        return None if self.low_alarm_at is None else days_until(self.low_alarm_at, now)


def forecast(
    reading: Reading,
    *,
    low_alarm_ml: float,
    tz: tzinfo,
    factor: float = 1.0,
    boluses_ml: float = 0.0,
) -> Forecast:
    """Project ``reading`` forward at ``factor`` x the programmed delivery (1.145: the labelled
    worst case). ``boluses_ml``: bolus volume delivered after the reading, not yet in its
    volume."""
    if not factor > 0:
        raise ValueError(f"factor must be positive, not {factor}")
    volume = max(0.0, reading.volume_ml - boluses_ml)
    therapy, at = reading.therapy, _utc(reading.recorded_at)
    return Forecast(
        volume_ml=volume,
        low_alarm_ml=low_alarm_ml,
        rate_ml_per_day=factor * daily_ml(therapy),
        low_alarm_at=_reaching(therapy, volume, low_alarm_ml, at, tz, factor=factor),
        empty_at=_reaching(therapy, volume, 0.0, at, tz, factor=factor),
        basis=reading.basis or "calculated",
    )


def _reaching(
    therapy: Therapy, volume_ml: float, level_ml: float, at: datetime, tz: tzinfo, *, factor: float
) -> datetime | None:
    if daily_ml(therapy) <= 0:
        return None
    if volume_ml <= level_ml:
        return at
    return time_to_deliver(therapy, (volume_ml - level_ml) / factor, at, tz)


def effective_low_alarm_ml(
    reading: Reading, patient: Patient | None, settings: RuleSettings
) -> float:
    """The larger of the pump's low alarm (the reading's, else the default) and the patient's
    personal margin."""
    pump = settings.default_low_alarm_ml if reading.low_alarm_ml is None else reading.low_alarm_ml
    margin = None if patient is None else patient.low_alarm_margin_ml
    return pump if margin is None else max(pump, margin)


def volume_now(reading: Reading, now: datetime, tz: tzinfo, factor: float = 1.0) -> float:
    """The reservoir projected from ``reading`` to ``now`` (never below 0)."""
    used = factor * delivered_ml(reading.therapy, reading.recorded_at, now, tz)
    return max(0.0, reading.volume_ml - used)


# --- refill reconciliation ----------------------------------------------------------------------


def boluses_ml(
    boluses: Iterable[Bolus], concentration_mcg_per_ml: float, since: datetime, until: datetime
) -> float:
    """Volume of the boluses given in [since, until): one given at the moment of a refill
    belongs to the period that refill starts."""
    low, high = _utc(since), _utc(until)
    return sum(
        bolus_ml(b, concentration_mcg_per_ml) for b in boluses if low <= _utc(b.recorded_at) < high
    )


def expected_residual(  # noqa: PLR0917 - the arithmetic reads in this order
    previous_refill_added_ml: float,
    therapy: Therapy,
    since: datetime,
    until: datetime,
    tz: tzinfo,
    boluses: Iterable[Bolus],
) -> float:
    """What should be left at a refill at ``until``: the volume after the previous refill (at
    ``since``) minus the programmed delivery since, boluses (in [since, until)) included at the
    therapy's concentration. Never below 0: a program that would have emptied the pump expects
    an empty pump, not a negative one."""
    used = delivered_ml(therapy, since, until, tz) + boluses_ml(
        boluses, therapy.concentration_mcg_per_ml, since, until
    )
    return max(0.0, previous_refill_added_ml - used)


def should_have_delivered_ml(
    therapy: Therapy, since: datetime, until: datetime, tz: tzinfo, boluses: Iterable[Bolus]
) -> float:
    """Programmed delivery plus boluses from ``since`` to ``until``."""
    return delivered_ml(therapy, since, until, tz) + boluses_ml(
        boluses, therapy.concentration_mcg_per_ml, since, until
    )


def expected_residual_from_reading(
    reading: Reading, until: datetime, tz: tzinfo, boluses: Iterable[Bolus] = ()
) -> float:
    """The contract's fallback when a refill names no expected residual and no previous refill
    is known: the last reading before the refill, advanced by the programmed rate (and the
    boluses given since the reading)."""
    given = boluses_ml(
        boluses, reading.therapy.concentration_mcg_per_ml, reading.recorded_at, until
    )
    return max(0.0, volume_now(reading, until, tz) - given)


@dataclass(frozen=True, slots=True)
class Discrepancy:
    """Expected minus actual residual at a refill. Positive: less left than expected
    (over-infusion, an earlier pocket fill, unlogged boluses); negative: more left
    (under-delivery: a stall, an occlusion)."""

    expected_residual_ml: float
    actual_residual_ml: float
    delta_ml: float
    relative: float | None
    """``delta_ml`` as a fraction of what should have been delivered; None when that is 0 or
    unknown."""

    def classify(self, settings: RuleSettings, capacity_ml: float | None) -> Classification:
        """Counts when |delta| exceeds the absolute limit for a pump of ``capacity_ml`` (1 mL
        for a 20 mL pump, 2 mL for a 40 mL pump, by default) or |relative| >
        discrepancy_rel_fraction."""
        limit = settings.discrepancy_limit_ml(capacity_ml)
        beyond = abs(self.delta_ml) > limit + _EPS or (
            self.relative is not None
            and abs(self.relative) > settings.discrepancy_rel_fraction + _EPS
        )
        if not beyond:
            return "none"
        return "over_delivery" if self.delta_ml > 0 else "under_delivery"


def discrepancy(
    expected_residual_ml: float,
    actual_residual_ml: float,
    should_have_delivered_ml: float | None,
) -> Discrepancy:
    delta = expected_residual_ml - actual_residual_ml
    relative = (
        delta / should_have_delivered_ml
        if should_have_delivered_ml is not None and should_have_delivered_ml > 0
        else None
    )
    return Discrepancy(expected_residual_ml, actual_residual_ml, delta, relative)


# --- measured delivery ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ratio:
    """Delivered / programmed over (part of) a window."""

    ratio: float
    hours: float
    """How many hours of the window the data behind the ratio covers: less than the window
    when the data starts late, ends early, or a refill inside the window cut it."""
    method: Literal["flow", "level"]
    delivered_ml: float
    programmed_ml: float


def delivery_ratio(
    readings: Sequence[Reading],
    *,
    window_start: datetime,
    window_end: datetime,
    tz: tzinfo,
    boluses: Sequence[Bolus] = (),
) -> Ratio | None:
    """Delivered / programmed over [window_start, window_end], from a flow sensor when the
    readings carry its flow, else from a level sensor's volumes (``basis == "measured"``).
    The logged ``boluses`` count as programmed: a pump that gave one delivered what it was
    told to.

    - Flow: a reading's flow is its average since the reading before, so each pair of
      consecutive readings says what flowed between them; time-weighted over the window.
    - Level: a least-squares fit over every reading of the window (and the ones bracketing it),
      from the last volume jump up (a refill) on, of volume against programmed delivery --
      elapsed time weighted by the schedule, for a constant rate the same as against time. The
      ratio is minus the slope, at least 0.

    ``hours`` says how much of the window is covered; callers that need the whole window
    compare it with the window's length. None when the data cannot say at all: no flow and
    fewer than three level readings (after the refill cut), or nothing programmed."""
    start, end = _utc(window_start), _utc(window_end)
    if end <= start:
        raise ValueError("window_end must be after window_start")
    ordered = _ordered(readings)
    found = _flow_ratio(ordered, start, end, tz, boluses)
    return found if found is not None else _level_ratio(ordered, start, end, tz, boluses)


def _ordered(readings: Iterable[Reading]) -> list[Reading]:
    by_time = {_utc(r.recorded_at): r for r in readings}
    return [by_time[at] for at in sorted(by_time)]


def _bracket(readings: list[Reading], start: datetime, end: datetime) -> list[Reading]:
    """The readings of [start, end] with the last one before and the first one after."""
    times = [_utc(r.recorded_at) for r in readings]
    first = max(bisect_right(times, start) - 1, 0)
    last = next((i for i, at in enumerate(times) if at >= end), len(times) - 1)
    return readings[first : last + 1]


def _overlap_hours(low: datetime, high: datetime, start: datetime, end: datetime) -> float:
    return max(timedelta(0), min(high, end) - max(low, start)) / timedelta(hours=1)


def _told_ml(
    before: Reading, low: datetime, high: datetime, tz: tzinfo, boluses: Sequence[Bolus]
) -> float:
    """What the pump was told to deliver in [low, high): its program (as of ``before``) and
    the boluses logged in that time."""
    return delivered_ml(before.therapy, low, high, tz) + boluses_ml(
        boluses, before.therapy.concentration_mcg_per_ml, low, high
    )


def _flow_ratio(
    readings: list[Reading],
    start: datetime,
    end: datetime,
    tz: tzinfo,
    boluses: Sequence[Bolus],
) -> Ratio | None:
    delivered = programmed = hours = 0.0
    span = _bracket(readings, start, end)
    for before, after in pairwise(span):
        flow = after.measured_flow_ml_per_day
        low = max(_utc(before.recorded_at), start)
        high = min(_utc(after.recorded_at), end)
        if flow is None or high <= low:
            continue
        delivered += flow * ((high - low) / _DAY)
        programmed += _told_ml(before, low, high, tz, boluses)
        hours += (high - low) / timedelta(hours=1)
    if programmed <= 0:
        return None
    return Ratio(delivered / programmed, hours, "flow", delivered, programmed)


def _level_ratio(
    readings: list[Reading],
    start: datetime,
    end: datetime,
    tz: tzinfo,
    boluses: Sequence[Bolus],
) -> Ratio | None:
    span = _bracket([r for r in readings if r.basis == "measured"], start, end)
    points = span[_after_last_refill(span) :]
    if len(points) < MIN_FIT_POINTS:
        return None
    programmed = [0.0]
    for before, after in pairwise(points):
        programmed.append(
            programmed[-1] + _told_ml(before, before.recorded_at, after.recorded_at, tz, boluses)
        )
    slope = _slope(programmed, [p.volume_ml for p in points])
    if slope is None:
        return None
    ratio = max(0.0, -slope)
    hours = _overlap_hours(_utc(points[0].recorded_at), _utc(points[-1].recorded_at), start, end)
    return Ratio(ratio, hours, "level", ratio * programmed[-1], programmed[-1])


def _after_last_refill(points: list[Reading]) -> int:
    """Index of the first reading after the last volume jump up (0 when there is none)."""
    for i in range(len(points) - 1, 0, -1):
        if points[i].volume_ml - points[i - 1].volume_ml > REFILL_JUMP_ML:
            return i
    return 0


def _slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Least-squares slope of ys against xs; None when the xs do not vary."""
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    if spread <= 0:
        return None
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread
