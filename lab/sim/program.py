"""A programmed therapy: continuous or a flex schedule, and the volume it delivers over time."""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

DAY_S = 86400
Mode = Literal["continuous", "flex"]


@dataclass(frozen=True, slots=True)
class Step:
    """One step of a flex schedule: from ``start_minute`` (local time) until the next step."""

    start_minute: int
    rate_ml_per_day: float

    @property
    def start(self) -> str:
        """The start as ``HH:MM``, as the contract writes it."""
        return f"{self.start_minute // 60:02d}:{self.start_minute % 60:02d}"


class Program:
    """What the pump is told to deliver: mode, average rate, daily dose, flex steps.

    ``delivered_ml(a, b)`` integrates the programmed rate between two instants given in local
    seconds (Unix seconds plus the pump's UTC offset): a flex schedule step by step, so delivery
    follows the time of day.
    """

    __slots__ = (
        "_bounds",
        "_cumulative",
        "_rates_per_s",
        "body",
        "concentration_mcg_per_ml",
        "daily_dose_mcg",
        "mode",
        "rate_ml_per_day",
        "steps",
    )

    def __init__(
        self,
        *,
        mode: Mode,
        concentration_mcg_per_ml: float,
        rate_ml_per_day: float,
        daily_dose_mcg: float,
        steps: tuple[Step, ...] = (),
    ) -> None:
        self.mode: Mode = mode
        self.concentration_mcg_per_ml = concentration_mcg_per_ml
        self.rate_ml_per_day = rate_ml_per_day
        self.daily_dose_mcg = daily_dose_mcg
        self.steps = steps
        # Segments of one local day: [bounds[i], bounds[i+1]) at rates_per_s[i]; cumulative[i]
        # is the volume delivered from midnight to bounds[i]. Before the first step's start the
        # last step of the previous day still runs.
        if steps:
            bounds = [0] + [s.start_minute * 60 for s in steps if s.start_minute] + [DAY_S]
            rates = ([] if steps[0].start_minute == 0 else [steps[-1].rate_ml_per_day]) + [
                s.rate_ml_per_day for s in steps
            ]
        else:
            bounds = [0, DAY_S]
            rates = [rate_ml_per_day]
        self._bounds = bounds
        self._rates_per_s = [r / DAY_S for r in rates]
        cumulative = [0.0]
        for i, rate in enumerate(self._rates_per_s):
            cumulative.append(cumulative[-1] + rate * (bounds[i + 1] - bounds[i]))
        self._cumulative = cumulative
        body: dict[str, Any] = {
            "mode": mode,
            "rate_ml_per_day": rate_ml_per_day,
            "daily_dose_mcg": daily_dose_mcg,
        }
        if steps:
            body["schedule"] = [
                {"start": s.start, "rate_ml_per_day": s.rate_ml_per_day} for s in steps
            ]
        self.body = body
        """The contract's ``infusion`` object. Shared by every message: never mutate it."""

    @classmethod
    def continuous(cls, *, dose_mcg: float, concentration_mcg_per_ml: float) -> Program:
        """A constant rate giving ``dose_mcg`` per day."""
        return cls(
            mode="continuous",
            concentration_mcg_per_ml=concentration_mcg_per_ml,
            rate_ml_per_day=round(dose_mcg / concentration_mcg_per_ml, 6),
            daily_dose_mcg=dose_mcg,
        )

    @classmethod
    def flex(
        cls,
        *,
        dose_mcg: float,
        concentration_mcg_per_ml: float,
        starts: Sequence[int],
        weights: Sequence[float],
    ) -> Program:
        """A daily schedule whose steps start at ``starts`` (local minutes, ascending) with rates
        proportional to ``weights``, scaled so the day delivers about ``dose_mcg``.

        The reported rate and dose are those of the rounded steps: the 24 h time-weighted average,
        so that rate x concentration = dose exactly as the contract demands."""
        if len(starts) != len(weights) or len(starts) < 2:
            raise ValueError("a flex schedule needs at least two steps, one weight per step")
        durations = [
            ((starts[(i + 1) % len(starts)] - start) % 1440) or 1440
            for i, start in enumerate(starts)
        ]
        mean_weight = sum(w * d for w, d in zip(weights, durations, strict=True)) / 1440
        base = dose_mcg / concentration_mcg_per_ml / mean_weight
        steps = tuple(
            Step(start, round(base * weight, 4))
            for start, weight in zip(starts, weights, strict=True)
        )
        return cls._from_steps(steps, concentration_mcg_per_ml)

    @classmethod
    def _from_steps(cls, steps: tuple[Step, ...], concentration_mcg_per_ml: float) -> Program:
        durations = [
            ((steps[(i + 1) % len(steps)].start_minute - step.start_minute) % 1440) or 1440
            for i, step in enumerate(steps)
        ]
        average = sum(s.rate_ml_per_day * d for s, d in zip(steps, durations, strict=True)) / 1440
        rate = round(average, 6)
        return cls(
            mode="flex",
            concentration_mcg_per_ml=concentration_mcg_per_ml,
            rate_ml_per_day=rate,
            daily_dose_mcg=round(rate * concentration_mcg_per_ml, 2),
            steps=steps,
        )

    def with_dose(self, dose_mcg: float) -> Program:
        """The same kind of programme scaled to a new daily dose (a prescription change)."""
        if self.mode == "continuous":
            return Program.continuous(
                dose_mcg=dose_mcg, concentration_mcg_per_ml=self.concentration_mcg_per_ml
            )
        factor = dose_mcg / self.daily_dose_mcg
        steps = tuple(
            Step(s.start_minute, round(s.rate_ml_per_day * factor, 4)) for s in self.steps
        )
        return Program._from_steps(steps, self.concentration_mcg_per_ml)

    def delivered_ml(self, a: int, b: int) -> float:
        """Programmed volume between local instants ``a`` <= ``b`` (seconds)."""
        if len(self._rates_per_s) == 1:
            return self._rates_per_s[0] * (b - a)
        return self._integral(b) - self._integral(a)

    def _integral(self, x: int) -> float:
        days, second = divmod(x, DAY_S)
        i = bisect_right(self._bounds, second) - 1
        return (
            days * self._cumulative[-1]
            + self._cumulative[i]
            + self._rates_per_s[i] * (second - self._bounds[i])
        )
