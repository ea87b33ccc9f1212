"""The reservoir chart as inline SVG, drawn on the server (pure: series in, markup out)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from html import escape

WIDTH, HEIGHT = 760, 280
LEFT, RIGHT, TOP, BOTTOM = 48, 16, 16, 36


@dataclass(frozen=True, slots=True)
class Point:
    at: datetime
    volume_ml: float


@dataclass(frozen=True, slots=True)
class RefillMark:
    at: datetime
    label: str
    """What the refill showed, e.g. "+20 mL · discrepancy 1.2 mL over"."""
    flagged: bool


@dataclass(frozen=True, slots=True)
class Chart:
    readings: list[Point]
    projection: list[Point]
    low_alarm_ml: float | None
    capacity_ml: float | None
    refills: list[RefillMark]
    low_alarm_at: datetime | None
    empty_at: datetime | None
    start: datetime
    end: datetime


def _x(chart: Chart, at: datetime) -> float:
    span = (chart.end - chart.start).total_seconds() or 1.0
    return LEFT + (WIDTH - LEFT - RIGHT) * (at - chart.start).total_seconds() / span


def _y(top_ml: float, volume: float) -> float:
    return TOP + (HEIGHT - TOP - BOTTOM) * (1 - max(0.0, volume) / top_ml)


def _path(chart: Chart, top_ml: float, points: list[Point]) -> str:
    inside = [p for p in points if chart.start <= p.at <= chart.end]
    return " ".join(
        f"{'M' if i == 0 else 'L'}{_x(chart, p.at):.1f},{_y(top_ml, p.volume_ml):.1f}"
        for i, p in enumerate(inside)
    )


def render(chart: Chart) -> str:
    """An accessible SVG (role img, a title and a description) with axis labels in mL and dates."""
    volumes = [p.volume_ml for p in chart.readings + chart.projection]
    top_ml = max([chart.capacity_ml or 0.0, *volumes, (chart.low_alarm_ml or 0.0) * 2, 1.0])
    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        'aria-labelledby="chart-title chart-desc" xmlns="http://www.w3.org/2000/svg">',
        '<title id="chart-title">Reservoir volume</title>',
        f'<desc id="chart-desc">{escape(_description(chart))}</desc>',
    ]
    for fraction in (0.0, 0.25, 0.5, 0.75, 1.0):
        volume = top_ml * fraction
        y = _y(top_ml, volume)
        parts.append(
            f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>'
        )
        parts.append(
            f'<text class="axis" x="{LEFT - 6}" y="{y + 4:.1f}" '
            f'text-anchor="end">{volume:.0f}</text>'
        )
    parts.append(f'<text class="axis" x="{LEFT + 4}" y="{TOP + 12}">mL</text>')
    tick = chart.start
    step = timedelta(days=max(1, round((chart.end - chart.start).days / 6)))
    while tick <= chart.end:
        x = _x(chart, tick)
        parts.append(
            f'<text class="axis" x="{x:.1f}" y="{HEIGHT - 12}" '
            f'text-anchor="middle">{tick:%d %b}</text>'
        )
        tick += step
    if chart.low_alarm_ml is not None:
        y = _y(top_ml, chart.low_alarm_ml)
        parts.append(
            f'<line class="low-alarm" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>'
            f'<text class="low-alarm-label" x="{WIDTH - RIGHT - 4}" y="{y - 4:.1f}" '
            f'text-anchor="end">low alarm {chart.low_alarm_ml:g} mL</text>'
        )
    if chart.readings:
        parts.append(f'<path class="readings" d="{_path(chart, top_ml, chart.readings)}"/>')
    if chart.projection:
        parts.append(f'<path class="projection" d="{_path(chart, top_ml, chart.projection)}"/>')
    for row, (label, at) in enumerate(
        (("low alarm", chart.low_alarm_at), ("empty", chart.empty_at))
    ):
        if at is not None and chart.start <= at <= chart.end:
            x = _x(chart, at)
            # Labels end at their line (the chart's right edge is near) and sit on rows of their
            # own, so dates a few days apart do not overprint each other.
            parts.append(
                f'<line class="forecast-date" x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" '
                f'y2="{HEIGHT - BOTTOM}"/><text class="forecast-label" x="{x - 3:.1f}" '
                f'y="{TOP + 12 + 14 * row}" text-anchor="end">{label} {at:%d %b}</text>'
            )
    for mark in chart.refills:
        if chart.start <= mark.at <= chart.end:
            x = _x(chart, mark.at)
            css = "refill flagged" if mark.flagged else "refill"
            parts.append(
                f'<g class="{css}"><line x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" '
                f'y2="{HEIGHT - BOTTOM}"/><circle cx="{x:.1f}" cy="{TOP + 4}" r="4"/>'
                f"<title>{escape(mark.label)}</title></g>"
            )
    parts.append("</svg>")
    return "".join(parts)


def _description(chart: Chart) -> str:
    words = [f"{len(chart.readings)} hourly averages from {chart.start:%Y-%m-%d}"]
    if chart.readings:
        words.append(f"latest {chart.readings[-1].volume_ml:.1f} mL")
    if chart.low_alarm_at is not None:
        words.append(f"projected to reach the low alarm on {chart.low_alarm_at:%Y-%m-%d}")
    if chart.empty_at is not None:
        words.append(f"empty on {chart.empty_at:%Y-%m-%d}")
    if chart.refills:
        words.append(f"{len(chart.refills)} refills marked")
    return "; ".join(words) + "."
