"""``pumpwatch simulate``: turn command-line options into a fleet and publish it."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from types import FrameType
from typing import Literal

from rich.console import Console

from lab.sim.fleet import Fault, Fleet, Outgoing
from lab.sim.publisher import (
    MqttVersion,
    PublishError,
    PublishReport,
    StopSignal,
    publish_all,
    run_live,
)
from lab.sim.resend import DeviceBuffers, ResendResponder, TransitLoss
from services.settings import MqttTarget

_FleetFactory = Callable[[datetime], Fleet]
_COUNT_MARGIN = 1.1
"""With ``--count``, the fleet starts early enough that this much more traffic would fit."""
_HELD_FOR = timedelta(days=7)
"""What each device holds for ``resend`` (MQTT contract 1.1: at least the last 7 days)."""


_CLAIMS_BEFORE = timedelta(minutes=30)
"""Claim codes shown from this long before now on: one is valid as soon as the fleet is live."""


class OptionError(ValueError):
    """An option value the simulator cannot use; the message names the option."""


def parse_fault(text: str) -> tuple[str, Fault]:
    """``SERIAL:KIND`` (``--fault``) → (serial, fault)."""
    serial, sep, kind = text.partition(":")
    if not sep or not serial:
        raise OptionError(f"--fault {text!r}: expected SERIAL:KIND, e.g. NGP204519H:motor_stall")
    return serial, _fault(kind, "--fault")


def parse_fault_rate(text: str) -> tuple[Fault, float]:
    """``KIND=FRACTION`` (``--fault-rate``) → (fault, fraction of the fleet)."""
    kind, sep, share = text.partition("=")
    if not sep:
        raise OptionError(f"--fault-rate {text!r}: expected KIND=FRACTION, e.g. gap=0.1")
    try:
        value = float(share)
    except ValueError:
        raise OptionError(f"--fault-rate {text!r}: {share!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise OptionError(f"--fault-rate {text!r}: the fraction must be between 0 and 1")
    return _fault(kind, "--fault-rate"), value


def simulate(
    target: MqttTarget,
    *,
    pumps: int = 50,
    seed: int = 1,
    interval_minutes: float = 15.0,
    accelerate: float = 1440.0,
    backfill_days: float = 30.0,
    rate: float | None = None,
    duration: float | None = None,
    count: int | None = None,
    fault: Sequence[str] = (),
    fault_rate: Sequence[str] = (),
    topic_prefix: str = "",
    client_id: str | None = None,
    qos: Literal[0, 1] = 1,
    protocol: MqttVersion = "5",
    progress: bool = True,
    stop: StopSignal | None = None,
    now: datetime | None = None,
    resend: bool = True,
    transit_loss: TransitLoss | None = None,
    start: datetime | None = None,
    titrating: Sequence[str] = (),
    first_refill: Mapping[str, timedelta] | None = None,
    claimable: Sequence[str] = (),
    resume_from: datetime | None = None,
) -> PublishReport:
    """Simulate a fleet of pumps and publish its messages to the broker at ``target``.

    Options (the CLI's ``--`` names):

    - ``pumps`` (``--pumps N``, 50): number of pumps.
    - ``seed`` (``--seed S``, 1): the same seed and options give the same pumps, faults and
      payloads (msg_ids included); only the start time, taken from the clock, differs.
    - ``interval_minutes`` (``--interval-minutes``, 15): one telemetry reading per pump per
      interval, pumps staggered across it.
    - ``accelerate`` (``--accelerate X``, 1440 = a day per minute): simulation time runs X times
      faster than the wall clock until it catches up with it, then in real time; recorded_at is
      never in the future.
    - ``backfill_days`` (``--backfill-days D``, 30): the fleet starts D days before now, so a
      live run first replays that history quickly.
    - ``rate`` (``--rate R``): cap on messages published per second (live runs).
    - ``duration`` (``--duration S``): stop a live run after S seconds (default: until Ctrl-C).
    - ``count`` (``--count N``): instead of a live run, generate exactly N messages from the
      start and publish them as fast as the broker accepts (a benchmark). The start moves further
      back than ``backfill_days`` if N messages would otherwise reach past now.
    - ``fault`` (``--fault SERIAL:KIND``, repeatable): give one pump a fault, e.g.
      ``NGP204519H:motor_stall``. Kinds: motor_stall (SynchroMed only), occlusion (pumps with a
      flow sensor only), over_infusion, missed_refill, battery, silence, malformed, gap.
    - ``fault_rate`` (``--fault-rate KIND=FRACTION``, repeatable): give the fault to that share
      of the fleet, e.g. ``malformed=0.05``.
    - ``topic_prefix`` (``--topic-prefix``): publish to ``<prefix>/pumps/...``.
    - ``client_id``: the MQTT client id (default: host name and process id).
    - ``qos``, ``protocol``: QoS 1 and MQTT 5 by default.
    - ``progress``: show a live progress display and print a summary table at the end.
    - ``stop``: ends the run when set; by default SIGINT and SIGTERM end it cleanly.
    - ``now``: the wall clock's current time (tests); the real clock by default.
    - ``resend`` (``--resend/--no-resend``, on): in a live run the devices hold what they sent
      (7 days of it) and answer pumpwatch's ``resend`` commands (backfill, MQTT contract 1.1;
      ``lab.sim.resend``) from one more MQTT client reading ``pumps/+/commands``. Messages the
      ``gap`` fault loses were never kept: those gaps stay unrecoverable.
    - ``transit_loss``: a few of one healthy pump's readings lost on the way to the broker but
      held by its hub (live runs with ``resend``): a gap backfill fills (the demo's).
    - ``start``: when the fleet starts (live runs), instead of ``backfill_days`` before now: the
      same seed and start replay the same history (the demo resuming its fleet).
    - ``titrating``, ``first_refill``, ``claimable``: the demo clinic's pumps
      (:class:`lab.sim.fleet.Fleet`); claim codes from 30 minutes before now on.
    - ``resume_from`` (live runs, with ``start``): the devices sent everything before this in
      an earlier run; the fleet runs up to it without publishing, then goes on as usual.

    Raises :class:`OptionError` for an unusable option and
    :class:`lab.sim.publisher.PublishError` when the broker cannot be used.
    """
    _require(pumps >= 1, "--pumps must be at least 1")
    _require(interval_minutes > 0, "--interval-minutes must be positive")
    _require(accelerate > 0, "--accelerate must be positive")
    _require(backfill_days >= 0, "--backfill-days must not be negative")
    _require(rate is None or rate > 0, "--rate must be positive")
    _require(duration is None or duration > 0, "--duration must be positive")
    _require(count is None or count >= 1, "--count must be at least 1")
    faults: dict[str, set[Fault]] = {}
    for text in fault:
        serial, kind = parse_fault(text)
        faults.setdefault(serial, set()).add(kind)
    rates = dict(parse_fault_rate(text) for text in fault_rate)
    wall_now = (now or datetime.now(UTC)).replace(microsecond=0)
    interval = timedelta(minutes=interval_minutes)
    client = client_id or f"pumpwatch-sim-{socket.gethostname()}-{os.getpid()}"[:64]

    def fleet_from(start: datetime) -> Fleet:
        try:
            return Fleet(
                pumps=pumps,
                seed=seed,
                start=start,
                interval=interval,
                faults=faults,
                fault_rates=rates,
                topic_prefix=topic_prefix,
                titrating=titrating,
                first_refill=first_refill,
                claimable=claimable,
                claims_from=max(start, wall_now - _CLAIMS_BEFORE),
            )
        except ValueError as exc:
            raise OptionError(str(exc)) from None

    with _stop_on_signals(stop) as stopping:
        if count is not None:
            fleet, messages = _generate(
                fleet_from,
                count,
                wall_now=wall_now,
                backfill_days=backfill_days,
                interval=interval,
                pumps=pumps,
            )
            if progress:
                _describe(fleet)
                Console(stderr=True).print(
                    f"generated {count:,} messages from {fleet.start:%Y-%m-%d %H:%M} "
                    f"to {fleet.now:%Y-%m-%d %H:%M} UTC"
                )
            return publish_all(
                target,
                messages,
                client_id=client,
                qos=qos,
                protocol=protocol,
                progress=progress,
                fleet=fleet,
                stop=stopping,
            )
        fleet = fleet_from(start or wall_now - timedelta(days=backfill_days))
        if resume_from is not None:
            _fast_forward(fleet, min(resume_from, wall_now))
        if progress:
            _describe(fleet)
        devices = DeviceBuffers(keep=math.ceil(_HELD_FOR / interval)) if resend else None
        with _answering(target, devices, topic_prefix, client, protocol):
            return run_live(
                target,
                fleet,
                client_id=client,
                rate_per_s=rate,
                accelerate=accelerate,
                duration_s=duration,
                stop=stopping,
                progress=progress,
                qos=qos,
                protocol=protocol,
                devices=devices,
                transit_loss=transit_loss if resend else None,
            )


def _fast_forward(fleet: Fleet, until: datetime) -> None:
    """Run the fleet to ``until`` without keeping what it sends (a day at a time: bounded
    memory)."""
    while fleet.now < until:
        fleet.advance(min(until, fleet.now + timedelta(days=1)))


@contextlib.contextmanager
def _answering(
    target: MqttTarget,
    devices: DeviceBuffers | None,
    topic_prefix: str,
    client_id: str,
    protocol: MqttVersion,
) -> Iterator[None]:
    """The simulated devices answering ``resend`` from what they hold (if they hold anything)."""
    if devices is None:
        yield
        return
    responder = ResendResponder(
        target,
        devices,
        topic_prefix=topic_prefix,
        client_id=f"{client_id[:56]}-devices",
        protocol=protocol,
    )
    try:
        responder.__enter__()
    except (OSError, TimeoutError) as exc:
        raise PublishError(f"the simulated devices cannot read their commands: {exc}") from exc
    try:
        yield
    finally:
        responder.__exit__(None, None, None)


def _generate(
    fleet_from: _FleetFactory,
    count: int,
    *,
    wall_now: datetime,
    backfill_days: float,
    interval: timedelta,
    pumps: int,
) -> tuple[Fleet, list[Outgoing]]:
    """``count`` messages from a fleet started early enough that none is recorded after now."""
    per_day = pumps * timedelta(days=1) / interval
    days = max(backfill_days, math.ceil(count / per_day * _COUNT_MARGIN + 1))
    for _ in range(4):
        fleet = fleet_from(wall_now - timedelta(days=days))
        messages = fleet.take(count)
        if fleet.now <= wall_now:
            return fleet, messages
        # Silent pumps and lost messages thin the traffic: start further back.
        days *= 2
    raise OptionError(f"--count {count}: cannot fit that many messages before now")


@contextlib.contextmanager
def _stop_on_signals(stop: StopSignal | None) -> Iterator[StopSignal]:
    """The given stop signal, or one that SIGINT and SIGTERM set (main thread only)."""
    if stop is not None:
        yield stop
        return
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield event
        return

    def handle(signum: int, frame: FrameType | None) -> None:
        event.set()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield event
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _describe(fleet: Fleet, limit: int = 20) -> None:
    """Name the faulty pumps, so that a demo can point at them."""
    faulty = [p for p in fleet.pumps if p.faults]
    console = Console(stderr=True)
    console.print(
        f"{len(fleet.pumps)} pumps from {fleet.start:%Y-%m-%d %H:%M} UTC, "
        f"{len(faulty)} with faults" + (":" if faulty else "")
    )
    for pump in faulty[:limit]:
        faults = ", ".join(sorted(pump.faults))
        console.print(f"  {pump.serial}  {pump.model:<22} {faults}", highlight=False)
    if len(faulty) > limit:
        console.print(f"  ... and {len(faulty) - limit} more")


def _fault(kind: str, option: str) -> Fault:
    try:
        return Fault(kind.strip())
    except ValueError:
        kinds = ", ".join(f.value for f in Fault)
        raise OptionError(f"{option}: unknown fault {kind!r} (one of {kinds})") from None


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise OptionError(message)
