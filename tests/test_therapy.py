"""Therapy arithmetic, pure: delivery, forecasts, refill reconciliation, measured delivery."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Literal
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.domain.alerting import Bolus, Patient, Reading, RuleSettings, Step, Therapy
from services.domain.therapy import (
    Ratio,
    days_until,
    delivered_ml,
    delivery_ratio,
    discrepancy,
    effective_low_alarm_ml,
    expected_residual,
    expected_residual_from_reading,
    forecast,
    mcg_per_day,
    ml_per_day,
    time_to_deliver,
    volume_now,
)

T0 = datetime(2026, 11, 24, 8, 30, tzinfo=UTC)
BERLIN = ZoneInfo("Europe/Berlin")
NIGHT_BOOST = (Step(6 * 60, 0.1), Step(22 * 60, 0.5))
"""0.1 mL/day from 06:00, 0.5 mL/day from 22:00 (through midnight): 0.2333 mL a day."""


def program(
    *,
    rate_ml_per_day: float = 0.2,
    concentration_mcg_per_ml: float = 2000.0,
    daily_dose_mcg: float | None = None,
    schedule: tuple[Step, ...] = (),
) -> Therapy:
    return Therapy(
        mode="flex" if schedule else "continuous",
        rate_ml_per_day=rate_ml_per_day,
        concentration_mcg_per_ml=concentration_mcg_per_ml,
        daily_dose_mcg=daily_dose_mcg,
        schedule=schedule,
    )


def reading(
    *,
    at: datetime = T0,
    volume_ml: float = 20.0,
    capacity_ml: float = 40.0,
    low_alarm_ml: float | None = 2.0,
    basis: Literal["measured", "calculated"] | None = "calculated",
    therapy: Therapy | None = None,
    flow_ml_per_day: float | None = None,
) -> Reading:
    return Reading(
        recorded_at=at,
        volume_ml=volume_ml,
        capacity_ml=capacity_ml,
        low_alarm_ml=low_alarm_ml,
        basis=basis,
        drug_name="baclofen",
        therapy=therapy or program(),
        measured_flow_ml_per_day=flow_ml_per_day,
    )


def local(tz: tzinfo, year: int, month: int, day: int, *hour_minute: int) -> datetime:
    hour, minute = (*hour_minute, 0, 0)[:2]
    return datetime(year, month, day, hour, minute, tzinfo=tz)


def by_the_minute(therapy: Therapy, start: datetime, end: datetime, tz: tzinfo) -> float:
    """An independent reference: walk real time minute by minute, look up the local step."""
    steps = sorted(therapy.schedule, key=lambda s: s.start_minute)
    total, at = 0.0, start.astimezone(UTC)
    while at < end:
        wall = at.astimezone(tz)
        minute = wall.hour * 60 + wall.minute
        rate = next((s.rate_ml_per_day for s in reversed(steps) if s.start_minute <= minute), None)
        total += (steps[-1].rate_ml_per_day if rate is None else rate) / 1440
        at += timedelta(minutes=1)
    return total


# --- units and the worked examples of domain.md -------------------------------------------------


def test_units_follow_the_worked_examples() -> None:
    assert ml_per_day(400, 2000) == pytest.approx(0.2)
    assert ml_per_day(400, 500) == pytest.approx(0.8)
    assert mcg_per_day(0.2, 2000) == pytest.approx(400)
    with pytest.raises(ValueError, match="positive"):
        ml_per_day(400, 0)


def test_a_40_ml_pump_at_400_mcg_per_day_of_2000_reaches_a_2_ml_alarm_after_190_days() -> None:
    rate = ml_per_day(400, 2000)
    found = forecast(
        reading(volume_ml=40.0, therapy=program(rate_ml_per_day=rate)), low_alarm_ml=2.0, tz=UTC
    )
    assert found.low_alarm_at is not None
    assert found.empty_at is not None
    assert found.days_to_low_alarm(T0) == pytest.approx(190, abs=1e-6)
    assert days_until(found.empty_at, T0) == pytest.approx(200, abs=1e-6)
    assert (found.rate_ml_per_day, found.low_alarm_ml, found.basis) == (0.2, 2.0, "calculated")


def test_a_20_ml_pump_at_400_mcg_per_day_of_500_reaches_it_after_about_22_days() -> None:
    rate = ml_per_day(400, 500)
    found = forecast(
        reading(volume_ml=20.0, capacity_ml=20.0, therapy=program(rate_ml_per_day=rate)),
        low_alarm_ml=2.0,
        tz=UTC,
    )
    assert found.days_to_low_alarm(T0) == pytest.approx(22.5)


def test_the_worst_case_factor_brings_the_dates_forward() -> None:
    found = forecast(reading(volume_ml=40.0), low_alarm_ml=2.0, tz=UTC, factor=1.145)
    assert found.days_to_low_alarm(T0) == pytest.approx(190 / 1.145, abs=1e-6)
    assert found.rate_ml_per_day == pytest.approx(0.229)


def test_boluses_since_the_reading_come_off_the_volume() -> None:
    found = forecast(reading(volume_ml=12.0), low_alarm_ml=2.0, tz=UTC, boluses_ml=1.0)
    assert found.volume_ml == 11.0
    assert found.days_to_low_alarm(T0) == pytest.approx(45)


def test_at_or_below_the_low_alarm_the_forecast_says_the_reading_time() -> None:
    old = T0 - timedelta(days=3)
    found = forecast(reading(at=old, volume_ml=1.5), low_alarm_ml=2.0, tz=UTC)
    assert found.low_alarm_at == old
    assert found.days_to_low_alarm(T0) == pytest.approx(-3)
    assert found.empty_at == old + timedelta(days=7.5)
    assert forecast(reading(volume_ml=2.0), low_alarm_ml=2.0, tz=UTC).low_alarm_at == T0


def test_a_zero_rate_forecasts_nothing() -> None:
    found = forecast(
        reading(volume_ml=1.0, therapy=program(rate_ml_per_day=0.0)), low_alarm_ml=2.0, tz=UTC
    )
    assert (found.low_alarm_at, found.empty_at, found.days_to_low_alarm(T0)) == (None, None, None)


def test_a_bad_factor_is_refused() -> None:
    with pytest.raises(ValueError, match="factor"):
        forecast(reading(), low_alarm_ml=2.0, tz=UTC, factor=0.0)


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        delivered_ml(program(), datetime(2026, 1, 1), T0, UTC)


def test_the_effective_low_alarm_is_the_larger_of_pump_and_personal_margin() -> None:
    rules = RuleSettings()
    assert effective_low_alarm_ml(reading(), None, rules) == 2.0
    assert effective_low_alarm_ml(reading(), Patient("high", 4.0), rules) == 4.0
    assert effective_low_alarm_ml(reading(low_alarm_ml=3.0), Patient("high", 2.5), rules) == 3.0
    assert effective_low_alarm_ml(reading(low_alarm_ml=None), Patient(), rules) == 2.0
    custom = RuleSettings(default_low_alarm_ml=3.0)
    assert effective_low_alarm_ml(reading(low_alarm_ml=None), None, custom) == 3.0


def test_volume_now_projects_forward_and_never_below_zero() -> None:
    start = reading(volume_ml=10.0)
    assert volume_now(start, T0 + timedelta(days=10), UTC) == pytest.approx(8.0)
    assert volume_now(start, T0 + timedelta(days=10), UTC, factor=1.5) == pytest.approx(7.0)
    assert volume_now(start, T0 + timedelta(days=100), UTC) == 0.0
    assert volume_now(start, T0 - timedelta(days=1), UTC) == 10.0


# --- flex schedules, midnight and DST -----------------------------------------------------------


def test_a_flex_schedule_integrates_across_midnight() -> None:
    night = program(rate_ml_per_day=0.2333, schedule=NIGHT_BOOST)
    start, end = local(BERLIN, 2026, 11, 24, 21), local(BERLIN, 2026, 11, 25, 7)
    # 21-22 at 0.1, 22-06 at 0.5, 06-07 at 0.1 (mL/day)
    assert delivered_ml(night, start, end, BERLIN) == pytest.approx((0.1 + 8 * 0.5 + 0.1) / 24)


def test_before_the_first_step_the_last_step_of_the_day_before_runs() -> None:
    night = program(schedule=NIGHT_BOOST)
    start, end = local(BERLIN, 2026, 11, 24, 0), local(BERLIN, 2026, 11, 24, 6)
    assert delivered_ml(night, start, end, BERLIN) == pytest.approx(6 * 0.5 / 24)


def test_many_days_of_a_flex_schedule_agree_with_a_minute_by_minute_walk() -> None:
    night = program(schedule=NIGHT_BOOST)
    start, end = local(BERLIN, 2026, 3, 26, 13, 7), local(BERLIN, 2026, 4, 2, 2, 41)
    assert delivered_ml(night, start, end, BERLIN) == pytest.approx(
        by_the_minute(night, start, end, BERLIN), rel=1e-9
    )
    # 400 days on the wall clock, which skips 02:00-03:00 (at 0.5 mL/day) twice and repeats
    # it once in between
    long_end = local(BERLIN, 2027, 4, 30, 13, 7)
    assert delivered_ml(night, start, long_end, BERLIN) == pytest.approx(
        400 * (16 * 0.1 + 8 * 0.5) / 24 - 0.5 / 24, rel=1e-12
    )


def test_the_spring_dst_day_has_one_hour_less_of_the_step_that_spans_it() -> None:
    # Europe/Berlin 2026-03-29: 02:00 CET becomes 03:00 CEST.
    early = program(schedule=(Step(0, 1.0), Step(6 * 60, 0.0)))
    start, end = local(BERLIN, 2026, 3, 29), local(BERLIN, 2026, 3, 30)
    assert delivered_ml(early, start, end, BERLIN) == pytest.approx(5 / 24)
    assert delivered_ml(program(rate_ml_per_day=0.24), start, end, BERLIN) == pytest.approx(0.23)


def test_the_autumn_dst_day_has_one_hour_more_of_the_step_that_spans_it() -> None:
    # Europe/Berlin 2026-10-25: 03:00 CEST becomes 02:00 CET.
    early = program(schedule=(Step(0, 1.0), Step(6 * 60, 0.0)))
    start, end = local(BERLIN, 2026, 10, 25), local(BERLIN, 2026, 10, 26)
    assert delivered_ml(early, start, end, BERLIN) == pytest.approx(7 / 24)
    assert delivered_ml(early, start, end, BERLIN) == pytest.approx(
        by_the_minute(early, start, end, BERLIN)
    )


def test_a_step_starting_in_the_skipped_hour_starts_when_the_clock_jumps() -> None:
    burst = program(schedule=(Step(0, 0.0), Step(150, 24.0), Step(240, 0.0)))  # 02:30-04:00
    start = local(BERLIN, 2026, 3, 29)
    assert delivered_ml(burst, start, local(BERLIN, 2026, 3, 30), BERLIN) == pytest.approx(1.0)
    reached = time_to_deliver(burst, 0.5, start, BERLIN)
    assert reached is not None
    assert reached.astimezone(BERLIN) == local(BERLIN, 2026, 3, 29, 3, 30)


def test_time_to_deliver_crosses_dst_exactly() -> None:
    early = program(schedule=(Step(0, 1.0), Step(6 * 60, 0.0)))
    reached = time_to_deliver(early, 0.25, local(BERLIN, 2026, 10, 25), BERLIN)
    assert reached == datetime(2026, 10, 25, 4, tzinfo=UTC)  # 6 real hours: 05:00 CET
    reached = time_to_deliver(early, 0.2, local(BERLIN, 2026, 3, 29), BERLIN)
    assert reached == datetime(2026, 3, 29, 3, 48, tzinfo=UTC)  # 4.8 real hours: 05:48 CEST


def test_time_to_deliver_skips_the_idle_part_of_the_day() -> None:
    early = program(schedule=(Step(0, 1.0), Step(6 * 60, 0.0)))
    start = local(BERLIN, 2026, 11, 24, 12)
    reached = time_to_deliver(early, 0.3, start, BERLIN)  # 0.25 on the 25th, 0.05 on the 26th
    assert reached is not None
    assert reached.astimezone(BERLIN) == local(BERLIN, 2026, 11, 26, 1, 12)
    # exactly one day's worth is reached when that day's delivery ends, not at its midnight
    reached = time_to_deliver(early, 0.25, start, BERLIN)
    assert reached is not None
    assert reached.astimezone(BERLIN) == local(BERLIN, 2026, 11, 25, 6)


def test_time_to_deliver_edges() -> None:
    assert time_to_deliver(program(), 0.0, T0, UTC) == T0
    assert time_to_deliver(program(rate_ml_per_day=0.0), 1.0, T0, UTC) is None
    idle = program(schedule=(Step(0, 0.0), Step(600, 0.0)))
    assert time_to_deliver(idle, 1.0, T0, BERLIN) is None
    assert time_to_deliver(program(rate_ml_per_day=1e-9), 40.0, T0, UTC) is None  # past 9999


def test_bad_schedules_are_refused() -> None:
    with pytest.raises(ValueError, match="within the day"):
        delivered_ml(program(schedule=(Step(1440, 0.1),)), T0, T0 + timedelta(days=1), UTC)
    with pytest.raises(ValueError, match=">= 0"):
        delivered_ml(program(rate_ml_per_day=-0.1), T0, T0 + timedelta(days=1), UTC)


# --- refill reconciliation -----------------------------------------------------------------------


def test_expected_residual_subtracts_programmed_delivery_and_boluses_in_the_period() -> None:
    since, until = T0, T0 + timedelta(days=100)
    boluses = [
        Bolus(since - timedelta(hours=1), 500.0),  # before the period: not counted
        Bolus(since, 100.0),
        Bolus(since + timedelta(days=50), 100.0),
        Bolus(until, 500.0),  # given at the refill itself: the next period's
    ]
    assert expected_residual(40.0, program(), since, until, UTC, boluses) == pytest.approx(19.9)
    assert expected_residual(10.0, program(), since, until, UTC, []) == 0.0


def test_the_fallback_advances_the_last_reading_to_the_refill() -> None:
    before = reading(volume_ml=5.0)
    at = T0 + timedelta(days=5)
    assert expected_residual_from_reading(before, at, UTC) == pytest.approx(4.0)
    given_bolus = [Bolus(T0 + timedelta(days=1), 200.0)]
    assert expected_residual_from_reading(before, at, UTC, given_bolus) == pytest.approx(3.9)


def test_a_discrepancy_is_signed_expected_minus_actual() -> None:
    over = discrepancy(10.0, 7.0, 30.0)
    assert over.delta_ml == 3.0
    assert over.relative == pytest.approx(0.1)
    under = discrepancy(10.0, 13.0, 30.0)
    assert under.delta_ml == -3.0
    rules = RuleSettings()
    assert (over.classify(rules, 40.0), under.classify(rules, 40.0)) == (
        "over_delivery",
        "under_delivery",
    )
    assert discrepancy(5.0, 4.0, 0.0).relative is None
    assert discrepancy(5.0, 4.0, None).relative is None


@pytest.mark.parametrize(
    ("expected", "actual", "should_have", "kind"),
    [
        (20.0, 18.0, 100.0, "none"),  # exactly 2 mL
        (20.0, 17.99, 100.0, "over_delivery"),  # just over 2 mL
        (18.0, 20.0, 100.0, "none"),
        (18.0, 20.01, 100.0, "under_delivery"),
        (11.45, 10.0, 10.0, "none"),  # exactly 14.5 %
        (11.46, 10.0, 10.0, "over_delivery"),  # just over 14.5 %
        (10.0, 11.45, 10.0, "none"),
        (10.0, 11.46, 10.0, "under_delivery"),
        (11.46, 10.0, None, "none"),  # the share is unknown: 2 mL alone decides
    ],
)
def test_discrepancy_boundaries_in_a_40_ml_pump(
    expected: float, actual: float, should_have: float | None, kind: str
) -> None:
    assert discrepancy(expected, actual, should_have).classify(RuleSettings(), 40.0) == kind


@pytest.mark.parametrize(
    ("expected", "actual", "capacity", "kind"),
    [
        (10.0, 9.0, 20.0, "none"),  # exactly 1 mL in a 20 mL pump
        (10.0, 8.99, 20.0, "over_delivery"),  # just over 1 mL
        (9.0, 10.0, 20.0, "none"),
        (9.0, 10.01, 20.0, "under_delivery"),
        (10.0, 8.99, 40.0, "none"),  # the same 1.01 mL in a 40 mL pump: below its 2 mL
        (10.0, 8.99, 20.01, "none"),  # just larger than small
        (10.0, 8.99, None, "none"),  # size unknown: the large pump's limit
        (10.0, 7.99, None, "over_delivery"),
    ],
)
def test_discrepancy_limit_by_pump_size(
    expected: float, actual: float, capacity: float | None, kind: str
) -> None:
    """Maino et al. (Neuromodulation 2017): over 1 mL in a 20 mL pump, over 2 mL in a 40 mL
    pump is potentially consequential. The relative rule is out of the way (nothing known
    about what should have been delivered)."""
    assert discrepancy(expected, actual, None).classify(RuleSettings(), capacity) == kind


# --- measured delivery ---------------------------------------------------------------------------


def flow_readings(
    flow_ml_per_day: float, *, hours: int, every_minutes: int = 60, end: datetime = T0
) -> list[Reading]:
    count = hours * 60 // every_minutes
    return [
        reading(
            at=end - timedelta(minutes=every_minutes * (count - i)),
            flow_ml_per_day=flow_ml_per_day,
        )
        for i in range(count + 1)
    ]


def test_delivery_ratio_from_a_flow_sensor() -> None:
    found = delivery_ratio(
        flow_readings(0.1, hours=24), window_start=T0 - timedelta(hours=12), window_end=T0, tz=UTC
    )
    assert found is not None
    assert (found.method, found.hours) == ("flow", 12.0)
    assert found.ratio == pytest.approx(0.5)
    assert found.programmed_ml == pytest.approx(0.1)


def test_flow_is_weighted_by_time() -> None:
    readings = [
        reading(at=T0 - timedelta(hours=12)),
        reading(at=T0 - timedelta(hours=3), flow_ml_per_day=0.2),
        reading(at=T0, flow_ml_per_day=0.0),
    ]
    found = delivery_ratio(readings, window_start=T0 - timedelta(hours=12), window_end=T0, tz=UTC)
    assert found is not None
    assert found.ratio == pytest.approx(0.75)


def test_flow_that_covers_part_of_the_window_says_how_much() -> None:
    found = delivery_ratio(
        flow_readings(0.2, hours=6), window_start=T0 - timedelta(hours=12), window_end=T0, tz=UTC
    )
    assert found is not None
    assert found.hours == 6.0
    assert found.ratio == pytest.approx(1.0)


def test_a_logged_bolus_counts_as_programmed_flow() -> None:
    # 0.2 mL/day as programmed, plus a 200 mcg bolus (0.1 mL at 2 mg/mL) in the hour before
    # T0 - 3 h: the flow sensor sees it, and the log says it was asked for.
    readings = flow_readings(0.2, hours=12)
    bolus_hour = T0 - timedelta(hours=3)
    readings = [
        reading(at=r.recorded_at, flow_ml_per_day=0.2 + 0.1 * 24)
        if r.recorded_at == bolus_hour
        else r
        for r in readings
    ]

    def window(boluses: list[Bolus]) -> Ratio | None:
        return delivery_ratio(
            readings, window_start=T0 - timedelta(hours=12), window_end=T0, tz=UTC, boluses=boluses
        )

    unlogged = window([])
    assert unlogged is not None
    assert unlogged.ratio == pytest.approx(2.0)  # 0.2 mL delivered, 0.1 mL programmed
    logged = window([Bolus(bolus_hour - timedelta(minutes=30), 200.0)])
    assert logged is not None
    assert logged.ratio == pytest.approx(1.0)
    assert logged.programmed_ml == pytest.approx(0.2)
    # a bolus outside the window is not part of it
    earlier = window([Bolus(T0 - timedelta(hours=13), 200.0)])
    assert earlier is not None
    assert earlier.ratio == pytest.approx(2.0)


def test_a_logged_bolus_counts_as_programmed_level() -> None:
    readings = level_readings(delivered_ml_per_day=0.2, hours=24)
    bolus_at = T0 - timedelta(hours=10, minutes=30)
    dropped = [
        reading(at=r.recorded_at, volume_ml=r.volume_ml - 0.5, basis="measured")
        if r.recorded_at > bolus_at
        else r
        for r in readings
    ]
    start = T0 - timedelta(hours=24)
    unlogged = delivery_ratio(dropped, window_start=start, window_end=T0, tz=UTC)
    assert unlogged is not None
    assert unlogged.ratio > 2.0  # the 0.5 mL step reads as fast delivery
    half_ml = Bolus(bolus_at, 1000.0)
    logged = delivery_ratio(dropped, window_start=start, window_end=T0, tz=UTC, boluses=[half_ml])
    assert logged is not None
    assert logged.ratio == pytest.approx(1.0)


def level_readings(
    *,
    delivered_ml_per_day: float,
    hours: int,
    start_volume_ml: float = 20.0,
    noise_ml: float = 0.0,
    seed: int = 7,
    therapy: Therapy | None = None,
    tz: tzinfo = UTC,
) -> list[Reading]:
    """Hourly level readings ending at T0, the level falling at the given true rate (or, for a
    flex program, at that share of the program)."""
    noise = random.Random(seed)
    start = T0 - timedelta(hours=hours)
    out = []
    for i in range(hours + 1):
        at = start + timedelta(hours=i)
        if therapy is None:
            used = delivered_ml_per_day * i / 24
        else:
            used = delivered_ml_per_day * delivered_ml(therapy, start, at, tz)
        out.append(
            reading(
                at=at,
                volume_ml=start_volume_ml - used + noise.gauss(0, noise_ml),
                basis="measured",
                therapy=therapy,
            )
        )
    return out


def test_delivery_ratio_from_noisy_levels_fits_every_point() -> None:
    program_ml_per_day = program(rate_ml_per_day=1.6)
    fit_errors, two_point_errors = [], []
    for seed in range(40):
        readings = [
            reading(
                at=r.recorded_at,
                volume_ml=r.volume_ml,
                basis="measured",
                therapy=program_ml_per_day,
            )
            for r in level_readings(delivered_ml_per_day=0.8, hours=48, noise_ml=0.02, seed=seed)
        ]
        found = delivery_ratio(
            readings, window_start=T0 - timedelta(hours=24), window_end=T0, tz=UTC
        )
        assert found is not None
        assert (found.method, found.hours) == ("level", 24.0)
        assert found.ratio == pytest.approx(0.5, abs=0.05)
        fit_errors.append(abs(found.ratio - 0.5))
        # what the window's two end points alone would say
        two_points = (readings[24].volume_ml - readings[-1].volume_ml) / 1.6
        two_point_errors.append(abs(two_points - 0.5))
    assert sum(fit_errors) < 0.6 * sum(two_point_errors)


def test_a_level_fit_against_a_flex_program_is_exact_without_noise() -> None:
    night = program(schedule=NIGHT_BOOST)
    readings = level_readings(delivered_ml_per_day=0.6, hours=36, therapy=night, tz=BERLIN)
    found = delivery_ratio(
        readings, window_start=T0 - timedelta(hours=30), window_end=T0, tz=BERLIN
    )
    assert found is not None
    assert found.ratio == pytest.approx(0.6)


def test_a_refill_inside_the_window_is_not_negative_delivery() -> None:
    before = level_readings(delivered_ml_per_day=0.2, hours=30, start_volume_ml=3.0)
    refilled = [
        reading(at=r.recorded_at, volume_ml=r.volume_ml + 35.0, basis="measured")
        if r.recorded_at > T0 - timedelta(hours=8)
        else r
        for r in before
    ]
    found = delivery_ratio(refilled, window_start=T0 - timedelta(hours=24), window_end=T0, tz=UTC)
    assert found is not None
    assert found.ratio == pytest.approx(1.0)
    assert found.hours == 7.0  # from the first reading after the refill


def test_a_level_that_rises_within_the_noise_delivered_nothing() -> None:
    rising = level_readings(delivered_ml_per_day=-0.5, hours=12)  # +0.25 mL in all: no refill
    found = delivery_ratio(rising, window_start=T0 - timedelta(hours=12), window_end=T0, tz=UTC)
    assert found is not None
    assert (found.ratio, found.delivered_ml) == (0.0, 0.0)


def test_delivery_ratio_cannot_say_without_the_data() -> None:
    start = T0 - timedelta(hours=12)
    calculated = [reading(at=T0 - timedelta(hours=h), volume_ml=20 - h / 100) for h in range(13)]
    assert delivery_ratio(calculated, window_start=start, window_end=T0, tz=UTC) is None
    two = level_readings(delivered_ml_per_day=0.2, hours=1)
    assert delivery_ratio(two, window_start=start, window_end=T0, tz=UTC) is None
    stopped = [
        reading(
            at=r.recorded_at,
            volume_ml=r.volume_ml,
            basis="measured",
            therapy=program(rate_ml_per_day=0.0),
        )
        for r in level_readings(delivered_ml_per_day=0.0, hours=13)
    ]
    assert delivery_ratio(stopped, window_start=start, window_end=T0, tz=UTC) is None
    with pytest.raises(ValueError, match="after"):
        delivery_ratio(calculated, window_start=T0, window_end=T0, tz=UTC)


# --- properties ----------------------------------------------------------------------------------

instants = st.datetimes(
    min_value=datetime(2025, 1, 1), max_value=datetime(2028, 12, 31), timezones=st.just(UTC)
)
durations = st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=400))
rates = st.floats(min_value=0.001, max_value=5.0)
zones = st.sampled_from([UTC, BERLIN, ZoneInfo("America/New_York"), ZoneInfo("Australia/Sydney")])
schedules = st.lists(
    st.builds(Step, st.integers(0, 1439), st.just(0.0) | st.floats(min_value=0.001, max_value=5.0)),
    min_size=0,
    max_size=5,
).map(tuple)


def programs(rate: st.SearchStrategy[float] = rates) -> st.SearchStrategy[Therapy]:
    return st.builds(lambda r, s: program(rate_ml_per_day=r, schedule=s), rate, schedules)


@given(programs(), instants, durations, durations, zones)
@settings(max_examples=200)
def test_delivery_is_additive_over_adjacent_windows_and_never_negative(
    therapy: Therapy, start: datetime, first: timedelta, second: timedelta, tz: tzinfo
) -> None:
    middle, end = start + first, start + first + second
    one, two = delivered_ml(therapy, start, middle, tz), delivered_ml(therapy, middle, end, tz)
    assert one >= 0
    assert two >= 0
    assert one + two == pytest.approx(delivered_ml(therapy, start, end, tz), rel=1e-9, abs=1e-9)
    assert delivered_ml(therapy, end, start, tz) == 0.0 or first + second == timedelta(0)


@given(programs(), instants, durations, zones)
@settings(max_examples=200)
def test_time_to_deliver_inverts_delivered_ml(
    therapy: Therapy, start: datetime, span: timedelta, tz: tzinfo
) -> None:
    volume = delivered_ml(therapy, start, start + span, tz)
    reached = time_to_deliver(therapy, volume, start, tz)
    if volume == 0:
        assert reached == start
        return
    assert reached is not None
    # The earliest instant: it delivers the same volume, and it is not after the end -- to a
    # millisecond: a volume's rounding error becomes time divided by the rate.
    assert reached <= start + span + timedelta(milliseconds=1)
    assert delivered_ml(therapy, start, reached, tz) == pytest.approx(volume, rel=1e-9, abs=1e-9)


@given(programs(), st.floats(0.1, 40.0), st.floats(0.1, 40.0), zones)
@settings(max_examples=100)
def test_more_volume_never_forecasts_earlier(
    therapy: Therapy, volume: float, more: float, tz: tzinfo
) -> None:
    less_found = forecast(reading(volume_ml=volume, therapy=therapy), low_alarm_ml=2.0, tz=tz)
    more_found = forecast(
        reading(volume_ml=volume + more, therapy=therapy), low_alarm_ml=2.0, tz=tz
    )
    for earlier, later in (
        (less_found.low_alarm_at, more_found.low_alarm_at),
        (less_found.empty_at, more_found.empty_at),
    ):
        # None: never (nothing delivered, or beyond the 100-year horizon), the latest of all
        assert later is None or (earlier is not None and earlier <= later)


@given(programs(), st.floats(2.5, 40.0), st.floats(0.05, 0.95), zones)
@settings(max_examples=100)
def test_a_lower_rate_never_forecasts_earlier(
    therapy: Therapy, volume: float, share: float, tz: tzinfo
) -> None:
    slower = program(
        rate_ml_per_day=therapy.rate_ml_per_day * share,
        schedule=tuple(Step(s.start_minute, s.rate_ml_per_day * share) for s in therapy.schedule),
    )
    fast = forecast(reading(volume_ml=volume, therapy=therapy), low_alarm_ml=2.0, tz=tz)
    slow = forecast(reading(volume_ml=volume, therapy=slower), low_alarm_ml=2.0, tz=tz)
    # None: never (nothing delivered, or beyond the 100-year horizon), the latest of all
    assert slow.low_alarm_at is None or (
        fast.low_alarm_at is not None and slow.low_alarm_at >= fast.low_alarm_at
    )


@given(st.floats(0.0, 40.0), st.floats(0.0, 10.0), instants, zones)
def test_a_zero_rate_never_forecasts(volume: float, alarm: float, at: datetime, tz: tzinfo) -> None:
    stopped = program(rate_ml_per_day=0.0, schedule=())
    found = forecast(reading(at=at, volume_ml=volume, therapy=stopped), low_alarm_ml=alarm, tz=tz)
    assert (found.low_alarm_at, found.empty_at) == (None, None)
    assert (
        volume_now(reading(at=at, volume_ml=volume, therapy=stopped), at + timedelta(days=9), tz)
        == volume
    )


@given(st.floats(0.0, 2000.0), st.sampled_from([50.0, 500.0, 1000.0, 2000.0]))
def test_units_round_trip(dose_mcg_per_day: float, concentration: float) -> None:
    rate = ml_per_day(dose_mcg_per_day, concentration)
    assert mcg_per_day(rate, concentration) == pytest.approx(dose_mcg_per_day, rel=1e-12)
    assert ml_per_day(mcg_per_day(rate, concentration), concentration) == pytest.approx(
        rate, rel=1e-12
    )
