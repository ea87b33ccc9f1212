"""The dose history as inline SVG, drawn on the server (pure: doses in, markup out).

The programmed daily dose is a step line (a dose holds until the next change); each change is a
dot labelled with its percentage. Colours are presentation attributes, not only CSS classes, so
the same markup draws in the PDF report (fpdf2 reads SVG) as on the page.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, tzinfo
from html import escape

WIDTH, HEIGHT = 760, 260
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 40, 36
INK, MUTED, GRID, UP, DOWN = "#0b5cad", "#555e68", "#e3e6ea", "#a4000f", "#2e7d32"


@dataclass(frozen=True, slots=True)
class Dose:
    at: datetime
    daily_dose_mcg: float
    change: float | None
    """The change from the dose before, as a fraction (+0.2: 20 % more); None for the first."""


def _x(start: datetime, end: datetime, at: datetime) -> float:
    span = (end - start).total_seconds() or 1.0
    fraction = min(max((at - start).total_seconds() / span, 0.0), 1.0)
    return LEFT + (WIDTH - LEFT - RIGHT) * fraction


def _y(top: float, dose: float) -> float:
    return TOP + (HEIGHT - TOP - BOTTOM) * (1 - max(0.0, dose) / top)


def _months(start: datetime, end: datetime, tz: tzinfo) -> list[datetime]:
    """The first of each month between start and end (in the clinic's zone), at most ~8 ticks."""
    local = start.astimezone(tz)
    year, month = local.year, local.month
    ticks: list[datetime] = []
    while True:
        month += 1
        if month > 12:
            year, month = year + 1, 1
        tick = datetime(year, month, 1, tzinfo=tz)
        if tick > end:
            break
        ticks.append(tick)
    step = max(1, -(-len(ticks) // 8))
    return ticks[::step]


def percent(change: float) -> str:
    """A change as people say it: +20%, -15%."""
    return f"{change:+.0%}"


def render(doses: list[Dose], start: datetime, end: datetime, tz: tzinfo) -> str:
    """An accessible SVG (role img, a title and a description): mcg/day over the months."""
    top = max([d.daily_dose_mcg for d in doses] + [1.0]) * 1.2
    parts = [
        f'<svg class="dose-chart" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" '
        f'height="{HEIGHT}" role="img" aria-labelledby="dose-title dose-desc" '
        'xmlns="http://www.w3.org/2000/svg">',
        '<title id="dose-title">Programmed daily dose</title>',
        f'<desc id="dose-desc">{escape(_description(doses, start, end, tz))}</desc>',
    ]
    for fraction in (0.0, 0.25, 0.5, 0.75, 1.0):
        level = top * fraction
        y = _y(top, level)
        parts.append(
            f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" '
            f'stroke="{GRID}" stroke-width="1"/>'
            f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11" '
            f'fill="{MUTED}">{level:.0f}</text>'
        )
    parts.append(f'<text x="4" y="{TOP - 20}" font-size="11" fill="{MUTED}">mcg/day</text>')
    for tick in _months(start, end, tz):
        parts.append(
            f'<text x="{_x(start, end, tick):.1f}" y="{HEIGHT - 12}" text-anchor="middle" '
            f'font-size="11" fill="{MUTED}">{tick:%b %Y}</text>'
        )
    shown = [d for d in doses if d.at < end]
    if shown:
        points: list[tuple[float, float]] = []
        for i, dose in enumerate(shown):
            x = _x(start, end, dose.at)
            y = _y(top, dose.daily_dose_mcg)
            if i:
                points.append((x, points[-1][1]))
            points.append((x, y))
        points.append((_x(start, end, end), points[-1][1]))
        d = " ".join(f"{'M' if i == 0 else 'L'}{x:.1f},{y:.1f}" for i, (x, y) in enumerate(points))
        parts.append(
            f'<path class="dose-line" d="{d}" fill="none" stroke="{INK}" stroke-width="2"/>'
        )
    for dose in shown:
        if dose.change is None or dose.at < start:
            continue
        x, y = _x(start, end, dose.at), _y(top, dose.daily_dose_mcg)
        colour = UP if dose.change > 0 else DOWN
        label = f"{dose.daily_dose_mcg:g} mcg/day ({percent(dose.change)})"
        parts.append(
            f'<g class="dose-change"><circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{colour}"/>'
            f'<text x="{x:.1f}" y="{y - 8:.1f}" text-anchor="middle" font-size="11" '
            f'fill="{colour}">{escape(percent(dose.change))}</text>'
            f"<title>{escape(f'{dose.at.astimezone(tz):%Y-%m-%d}: {label}')}</title></g>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _description(doses: list[Dose], start: datetime, end: datetime, tz: tzinfo) -> str:
    changes = [d for d in doses if d.change is not None and start <= d.at < end]
    words = [f"Programmed daily dose from {start.astimezone(tz):%Y-%m-%d}"]
    if doses:
        words.append(f"now {doses[-1].daily_dose_mcg:g} mcg/day")
    words.append(f"{len(changes)} change{'s' if len(changes) != 1 else ''}")
    words += [
        f"{d.at.astimezone(tz):%Y-%m-%d} to {d.daily_dose_mcg:g} mcg/day ({percent(d.change)})"
        for d in changes
        if d.change is not None
    ]
    return "; ".join(words) + "."
