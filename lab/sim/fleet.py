"""The simulated fleet: N pumps with their faults, as a time-ordered stream of MQTT messages.

Pure model: no I/O, no wall clock (the caller says how far to run). Deterministic: the same seed
and parameters give byte-identical payloads, message ids included, however the run is cut into
``advance``/``take`` calls.

    fleet = Fleet(pumps=50, seed=1, start=datetime(2026, 1, 1, tzinfo=UTC),
                  fault_rates={Fault.OVER_INFUSION: 0.05})
    messages = fleet.advance(datetime(2026, 1, 2, tzinfo=UTC))  # one day of traffic
"""

from __future__ import annotations

import heapq
import math
import random
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from lab.sim import truth as ground_truth
from lab.sim.claims import CLAIM_EVERY, ClaimProgrammer
from lab.sim.faults import Fault, fault_needs
from lab.sim.outgoing import Kind, Lost, Outgoing
from lab.sim.profiles import PumpProfile, generate_profiles
from lab.sim.pump import PumpSim
from lab.sim.truth import LIFE_RULES, Injected
from services.domain.alerting import RuleSettings

__all__ = ["LIFE_RULES", "Fault", "Fleet", "Injected", "Kind", "Lost", "Outgoing", "PumpProfile"]


class Fleet:
    """A deterministic fleet of simulated pumps.

    Each pump publishes one telemetry reading per ``interval`` from its home hub (pumps are
    staggered evenly across the interval), and events from the clinic's programmer: refills a
    few days before the low alarm, occasional prescription changes and clinician boluses.

    ``faults`` gives chosen pumps (by serial) their faults; ``fault_rates`` gives each fault to
    that share of the fleet, chosen from the seed among the pumps that can have it (occlusion
    needs a flow sensor, motor_stall a SynchroMed), so fewer if too few can. Both may be combined.
    Profiles do not depend on faults: build a fleet once to look at ``pumps``, then again with
    faults for the serials you picked.

    The demo's clinic (``lab.demo``): ``titrating`` pumps have their dose raised every few
    weeks (a patient growing tolerant); ``first_refill`` brings a pump's first refill visit this
    long after the start (its reservoir at the start is set to fit); the programmers of
    ``claimable`` pumps publish a ``claim`` event with a new code every ``CLAIM_EVERY`` from
    ``claims_from`` (default: the start) on (:mod:`lab.sim.claims`). None of these changes
    another message of the fleet.
    """

    def __init__(
        self,
        *,
        pumps: int,
        seed: int,
        start: datetime,
        interval: timedelta = timedelta(minutes=15),
        faults: Mapping[str, Iterable[Fault | str]] | None = None,
        fault_rates: Mapping[Fault, float] | Mapping[str, float] | None = None,
        topic_prefix: str = "",
        titrating: Iterable[str] = (),
        first_refill: Mapping[str, timedelta] | None = None,
        claimable: Iterable[str] = (),
        claims_from: datetime | None = None,
    ) -> None:
        if pumps < 1:
            raise ValueError("a fleet needs at least one pump")
        if start.tzinfo is None:
            raise ValueError("start must be timezone-aware")
        interval_s = round(interval.total_seconds())
        if interval_s < 1:
            raise ValueError("interval must be at least one second")
        self.seed = seed
        self.start = start
        self.interval = interval
        self.topic_prefix = topic_prefix.rstrip("/")
        self.pumps: list[PumpProfile] = _with_faults(
            generate_profiles(seed=seed, count=pumps), seed, faults or {}, fault_rates or {}
        )
        """The pumps, in index order, with their faults."""
        self.lost: list[Lost] = []
        """Messages the ``gap`` fault lost so far (their sequence numbers were consumed)."""
        t0 = math.ceil(start.timestamp())
        titrate = set(titrating)
        refills = dict(first_refill or {})
        claiming = list(claimable)
        for serial in {*titrate, *refills, *claiming}:
            if serial not in {p.serial for p in self.pumps}:
                raise ValueError(f"no pump {serial!r} in this fleet")
        self._sims = [
            PumpSim(
                profile,
                seed=seed,
                t0=t0,
                interval_s=interval_s,
                phase_s=interval_s * profile.index // pumps,
                topic_prefix=self.topic_prefix,
                lost=self.lost,
                titrating=profile.serial in titrate,
                first_refill_in_s=(
                    None
                    if profile.serial not in refills
                    else round(refills[profile.serial].total_seconds())
                ),
            )
            for profile in self.pumps
        ]
        claims_t = math.ceil((claims_from or start).timestamp())
        self._claimers = [
            ClaimProgrammer(
                serial,
                seed=seed,
                from_t=claims_t,
                every_s=round(CLAIM_EVERY.total_seconds()),
                topic_prefix=self.topic_prefix,
            )
            for serial in claiming
        ]
        self._heap = [(sim.next_at, i) for i, sim in enumerate(self._sims)]
        self._heap += [(c.next_at, len(self._sims) + i) for i, c in enumerate(self._claimers)]
        heapq.heapify(self._heap)
        self._by_serial = {p.serial: p for p in self.pumps}
        self.now = start
        """How far the simulation has run."""

    def pump(self, serial: str) -> PumpProfile:
        """The profile of the pump with this serial (KeyError if there is none)."""
        return self._by_serial[serial]

    def with_fault(self, fault: Fault) -> list[PumpProfile]:
        """The pumps that have this fault."""
        return [p for p in self.pumps if fault in p.faults]

    def healthy(self) -> list[PumpProfile]:
        """The pumps without any fault."""
        return [p for p in self.pumps if not p.faults]

    def fault_counts(self) -> dict[Fault, int]:
        """How many pumps have each fault (faults no pump has are left out)."""
        counts = Counter(fault for p in self.pumps for fault in p.faults)
        return {fault: counts[fault] for fault in Fault if counts[fault]}

    def truth(self, until: datetime, settings: RuleSettings | None = None) -> list[Injected]:
        """Which faults showed where and when up to ``until``, and what should alert for each
        (``lab.sim.truth``), in onset order. Pure: the fleet is not advanced (copies of its
        pumps run ahead where ``until`` is later than ``now``, or to date a harm). ``settings``:
        the rule thresholds the expectations follow (default: the domain table's)."""
        limit = math.floor(until.timestamp())
        probes = []
        for sim in self._sims:
            probe = sim.probe()
            while not probe.finished and probe.next_at <= limit:
                probe.step()
            if not probe.finished:
                probe.catch_up(min(limit, probe.silent_at))
            probes.append(probe)
        lost = [*self.lost, *(m for probe in probes for m in probe.lost_messages)]
        return ground_truth.collect(probes, limit, lost, settings or RuleSettings())

    def planned_refills(self) -> dict[str, datetime]:
        """The clinic's next planned refill visit of each pump that will be refilled (as of
        ``now``: a prescription change may still bring one forward). Pumps whose refill is
        missed, or that fell silent, have none."""
        out: dict[str, datetime] = {}
        for sim in self._sims:
            at = sim.planned_refill_at
            if at is not None:
                out[sim.profile.serial] = datetime.fromtimestamp(at, UTC)
        return out

    def next_due(self) -> datetime | None:
        """When the next message may be due (it may turn out lost); None if all fell silent."""
        if not self._heap:
            return None
        return datetime.fromtimestamp(self._heap[0][0], UTC)

    def advance(self, until: datetime) -> list[Outgoing]:
        """Run to simulation time ``until``; every message due by then, in time order.

        A time before ``now`` returns nothing (the simulation does not go back)."""
        limit = math.floor(until.timestamp())
        heap = self._heap
        out: list[Outgoing] = []
        while heap and heap[0][0] <= limit:
            message = self._step_next()
            if message is not None:
                out.append(message)
        self.now = max(self.now, until)
        return out

    def take(self, count: int) -> list[Outgoing]:
        """Exactly ``count`` further messages, advancing simulation time as far as needed.

        Raises RuntimeError if every pump has fallen silent before ``count`` were sent."""
        out: list[Outgoing] = []
        while len(out) < count:
            if not self._heap:
                raise RuntimeError(f"every pump fell silent after {len(out)} of {count} messages")
            message = self._step_next()
            if message is not None:
                out.append(message)
        if out:
            self.now = max(self.now, out[-1].at.astimezone(UTC))
        return out

    def _step_next(self) -> Outgoing | None:
        """Step the pump due first; its message, if this step sends one."""
        heap = self._heap
        i = heap[0][1]
        sim: PumpSim | ClaimProgrammer = (
            self._sims[i] if i < len(self._sims) else self._claimers[i - len(self._sims)]
        )
        message = sim.step()
        if sim.finished:
            heapq.heappop(heap)
        else:
            heapq.heapreplace(heap, (sim.next_at, i))
        return message


def _with_faults(
    profiles: list[PumpProfile],
    seed: int,
    faults: Mapping[str, Iterable[Fault | str]],
    rates: Mapping[Fault, float] | Mapping[str, float],
) -> list[PumpProfile]:
    """The profiles with their faults: chosen ones by serial, the rest drawn per fault."""
    assigned: dict[str, set[Fault]] = {p.serial: set() for p in profiles}
    by_serial = {p.serial: p for p in profiles}
    for serial, kinds in faults.items():
        if serial not in by_serial:
            raise ValueError(f"no pump {serial!r} in this fleet")
        for kind in kinds:
            fault = Fault(kind)
            if not by_serial[serial].supports(fault):
                raise ValueError(
                    f"{fault} needs {fault_needs(fault)}; {serial} is a {by_serial[serial].model}"
                    f" ({by_serial[serial].basis} basis)"
                )
            assigned[serial].add(fault)
    for kind, share in sorted(rates.items()):
        fault = Fault(kind)
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"fault rate for {fault} must be between 0 and 1, not {share}")
        eligible = [p for p in profiles if p.supports(fault)]
        wanted = min(len(eligible), round(share * len(profiles)))
        for profile in random.Random(f"pumpwatch-sim:{seed}:faults:{fault}").sample(
            eligible, wanted
        ):
            assigned[profile.serial].add(fault)
    return [replace(p, faults=frozenset(assigned[p.serial])) for p in profiles]
