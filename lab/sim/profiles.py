"""Who the simulated pumps are: model, reservoir, drug, programme, and the devices that report."""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Literal

from lab.sim.faults import Fault
from lab.sim.program import Mode, Program, Step

Basis = Literal["measured", "calculated"]


@dataclass(frozen=True, slots=True)
class _Model:
    name: str
    capacity_ml: int
    low_alarm_ml: float
    weight: float


# Shares are our own choice. Low alarms: SynchroMed II 2.0 mL; Prometra plans refills at 3.0 mL.
_MODELS = (
    _Model("SynchroMed II 8637-40", 40, 2.0, 0.45),
    _Model("SynchroMed II 8637-20", 20, 2.0, 0.20),
    _Model("Prometra II", 20, 3.0, 0.20),
    _Model("Prometra II", 40, 3.0, 0.15),
)
_FLOW_SENSOR_SHARE = 0.5
"""Share of Prometra pumps that have a flow sensor and report a measured volume."""
_CONCENTRATIONS = (500, 1000, 2000)
"""Baclofen mcg/mL in maintenance use (Lioresal and Gablofen labelling)."""
_REFILL_DAYS = (45.0, 180.0)
"""Days from full to the low alarm: the concentration is chosen to fit where it can, so that
refills (a few days earlier, or at 180 days for the drug's age) come every 1 to 6 months."""
_FLEX_SHARE = 0.25
_FLEX_MIN_STEP_MIN = 180
_UTC_OFFSETS_MIN = (0, 60, 60, 60, 120, -300, -480)
_HUB_FIRMWARE = ("2.4.1", "2.4.1", "2.5.0")
_PROGRAMMER_FIRMWARE = ("3.1.0", "3.2.2")


@dataclass(frozen=True, slots=True)
class PumpProfile:
    """One simulated pump as implanted at the start of the simulation.

    The programme (``mode``, ``rate_ml_per_day``, ``daily_dose_mcg``, ``schedule``) is the initial
    one; prescription changes during the run alter the pump's state, not its profile."""

    index: int
    serial: str
    model: str
    capacity_ml: int
    low_alarm_ml: float
    has_flow_sensor: bool
    basis: Basis
    drug: str
    concentration_mcg_per_ml: int
    mode: Mode
    rate_ml_per_day: float
    daily_dose_mcg: float
    schedule: tuple[Step, ...]
    utc_offset_minutes: int
    hub_id: str
    hub_firmware: str
    programmer_id: str
    programmer_firmware: str
    faults: frozenset[Fault] = frozenset()

    @property
    def program(self) -> Program:
        """The initial programme."""
        return Program(
            mode=self.mode,
            concentration_mcg_per_ml=self.concentration_mcg_per_ml,
            rate_ml_per_day=self.rate_ml_per_day,
            daily_dose_mcg=self.daily_dose_mcg,
            steps=self.schedule,
        )

    @property
    def days_to_low_alarm_when_full(self) -> float:
        """Days from a full reservoir to the low alarm at the initial programmed rate."""
        return (self.capacity_ml - self.low_alarm_ml) / self.rate_ml_per_day

    def supports(self, fault: Fault) -> bool:
        """Whether this pump can have the fault (a motor to stall, a sensor to see a blockage)."""
        if fault is Fault.MOTOR_STALL:
            return self.model.startswith("SynchroMed")
        if fault is Fault.OCCLUSION:
            return self.has_flow_sensor
        return True


def generate_profiles(*, seed: int, count: int) -> list[PumpProfile]:
    """``count`` pumps, the same for the same seed, with no faults.

    Serials come from one fleet-wide stream (they must be unique); everything else from a stream
    per pump, so a pump does not change when the fleet grows."""
    serial_rng = random.Random(f"pumpwatch-sim:{seed}:serials")
    serials: list[str] = []
    seen: set[str] = set()
    while len(serials) < count:
        serial = (
            f"NGP{serial_rng.randint(100000, 999999)}{serial_rng.choice(string.ascii_uppercase)}"
        )
        if serial not in seen:
            seen.add(serial)
            serials.append(serial)
    return [
        _profile(index, serial, random.Random(f"pumpwatch-sim:{seed}:{index}:profile"))
        for index, serial in enumerate(serials)
    ]


def _profile(index: int, serial: str, rng: random.Random) -> PumpProfile:
    model = rng.choices(_MODELS, weights=[m.weight for m in _MODELS])[0]
    sensor = model.name.startswith("Prometra") and rng.random() < _FLOW_SENSOR_SHARE
    dose = _dose(rng)
    concentration = _concentration(rng, dose, model)
    if rng.random() < _FLEX_SHARE:
        starts = _flex_starts(rng, rng.randint(2, 4))
        weights = [rng.uniform(0.5, 1.6) for _ in starts]
        program = Program.flex(
            dose_mcg=dose, concentration_mcg_per_ml=concentration, starts=starts, weights=weights
        )
    else:
        program = Program.continuous(dose_mcg=dose, concentration_mcg_per_ml=concentration)
    return PumpProfile(
        index=index,
        serial=serial,
        model=model.name,
        capacity_ml=model.capacity_ml,
        low_alarm_ml=model.low_alarm_ml,
        has_flow_sensor=sensor,
        basis="measured" if sensor else "calculated",
        drug="baclofen",
        concentration_mcg_per_ml=concentration,
        mode=program.mode,
        rate_ml_per_day=program.rate_ml_per_day,
        daily_dose_mcg=program.daily_dose_mcg,
        schedule=program.steps,
        utc_offset_minutes=rng.choice(_UTC_OFFSETS_MIN),
        hub_id=f"HUB-{rng.randint(1000, 9999)}",
        hub_firmware=rng.choice(_HUB_FIRMWARE),
        programmer_id=f"PRG-{rng.randint(1000, 9999)}",
        programmer_firmware=rng.choice(_PROGRAMMER_FIRMWARE),
    )


def _flex_starts(rng: random.Random, count: int) -> list[int]:
    """Step starts on the half hour (local minutes), each step lasting at least three hours."""
    while True:
        starts = sorted(half_hour * 30 for half_hour in rng.sample(range(48), count))
        lengths = [(starts[(i + 1) % count] - start) % 1440 for i, start in enumerate(starts)]
        if min(lengths) >= _FLEX_MIN_STEP_MIN:
            return starts


def _dose(rng: random.Random) -> int:
    """Maintenance dose, mcg/day: mostly 300-800, some lower and higher (range 20-2000)."""
    draw = rng.random()
    if draw < 0.85:
        dose = rng.uniform(300, 800)
    elif draw < 0.95:
        dose = rng.uniform(100, 300)
    else:
        dose = rng.uniform(800, 1200)
    return int(round(dose / 5) * 5)


def _concentration(rng: random.Random, dose: float, model: _Model) -> int:
    """A concentration that puts refills 1-6 months apart, or the one that comes closest."""
    usable = model.capacity_ml - model.low_alarm_ml
    lo, hi = _REFILL_DAYS

    def days(concentration: int) -> float:
        return usable / (dose / concentration)

    fitting = [c for c in _CONCENTRATIONS if lo <= days(c) <= hi]
    if fitting:
        return rng.choice(fitting)
    return min(_CONCENTRATIONS, key=lambda c: min(abs(days(c) - lo), abs(days(c) - hi)))
