"""Scenario 3: the broker restarts mid-stream.

- ``broker-restart``: mosquitto (with persistence) gets SIGTERM mid-stream, saves its sessions
  and is started again on the same port and data directory ``down_s`` later. The publisher
  reconnects and re-sends what was not acknowledged; ingest reconnects to its restored
  session. Pass: 0 lost, 0 duplicates.
- ``broker-kill``: ingest is stopped (SIGTERM, as in a deploy) while the stream goes on, so the
  broker queues messages for its session in memory; then mosquitto gets SIGKILL, and is started
  again. What it had queued and not yet saved is gone: lost before pumpwatch ever saw it. The
  figure is how much, and whether sequence-gap detection flagged every lost message (a
  ``sequence_gaps`` row of that pump and source covering its ``seq``). Pass: 100 % flagged;
  messages lost and *not* flagged are counted as lost.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path

from lab import embedded
from lab.bench.faults.common import (
    Lab,
    Outcome,
    PacedPublisher,
    Size,
    check_stored,
    fetch,
    fetchval,
    fleet_stream,
    ingest_service,
    publish,
    seconds,
    wait_until,
)
from lab.embedded import EmbeddedBroker
from lab.processes import ServiceProcess
from lab.sim.fleet import Outgoing


@dataclass(frozen=True)
class BrokerSize:
    rate: float
    before_s: float
    down_s: float
    after_s: float
    queued_s: float
    """broker-kill: how long the broker queues for the stopped ingest before its SIGKILL."""


SIZES: dict[Size, BrokerSize] = {
    "reduced": BrokerSize(rate=300, before_s=2, down_s=2, after_s=3, queued_s=2),
    "full": BrokerSize(rate=1_000, before_s=10, down_s=5, after_s=15, queued_s=5),
}


class Restartable:
    """A mosquitto of the scenario's own, stopped and started on the same port and data
    directory (so the same persistence file)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.current: EmbeddedBroker | None = embedded.start_mosquitto(data_dir)
        self.port = self.current.port
        self.url = self.current.url

    def stop(self) -> None:
        assert self.current is not None
        self.current.stop()
        self.current = None

    def kill(self) -> None:
        import os
        import signal

        assert self.current is not None
        os.kill(self.current.pid, signal.SIGKILL)
        self.current.stop()  # reaps the process and closes its log
        self.current = None

    def start(self) -> None:
        assert self.current is None
        self.current = embedded.start_mosquitto(self.data_dir, port=self.port)

    def close(self) -> None:
        if self.current is not None:
            self.stop()


def _stream(spec: BrokerSize, seed: int, extra_s: float) -> list[Outgoing]:
    seconds_of_traffic = spec.before_s + spec.down_s + spec.after_s + extra_s
    return fleet_stream(
        round(spec.rate * seconds_of_traffic) + 1, pumps=50, seed=seed, telemetry_only=True
    )


def run_restart(lab: Lab, size: Size, seed: int) -> Outcome:
    """Twice: ingest on its default plain subscription (the strict check: nothing may be lost),
    then on a shared subscription (scale-out), where mosquitto 2.0 does not restore the
    subscription from its persistence file: what is published between the broker's start and
    ingest's re-subscription is dropped by the broker, and must be flagged as sequence gaps."""
    spec = SIZES[size]
    outcome = Outcome(
        "broker-restart", f"mosquitto restarted gracefully mid-stream ({spec.down_s:.0f} s down)"
    )
    started = time.monotonic()
    plain = _restart_once(lab, spec, seed, outcome, share_group=None, name="plain")
    outcome.attempted = plain.attempted
    outcome.acknowledged = plain.acknowledged
    outcome.stored = plain.stored
    outcome.lost = plain.lost
    outcome.duplicated = plain.duplicated
    outcome.figures.update({f"plain subscription: {k}": v for k, v in plain.figures.items()})
    shared = _restart_once(
        lab, spec, seed + 1, outcome, share_group="pumpwatch-ingest", name="shared"
    )
    outcome.lost = (outcome.lost or 0) + (shared.lost or 0)
    outcome.duplicated = (outcome.duplicated or 0) + (shared.duplicated or 0)
    outcome.figures.update({f"shared subscription: {k}": v for k, v in shared.figures.items()})
    outcome.elapsed_s = time.monotonic() - started
    return outcome


def _restart_once(  # noqa: PLR0915 - one timeline, in order
    lab: Lab, spec: BrokerSize, seed: int, outcome: Outcome, *, share_group: str | None, name: str
) -> Outcome:
    """One run; problems go to ``outcome``, counts and figures to the run's own."""
    run = Outcome(name, name)
    stream = _stream(spec, seed, 0)
    stream, barrier = stream[:-1], stream[-1]
    # Ten other pumps publish before the restart, right after the broker is back (before
    # ingest can have reconnected: its backoff has grown during the outage), and once it has.
    # (A gap needs a message before it and one after it from the same source.)
    window = fleet_stream(300, pumps=10, seed=seed + 1_000, telemetry_only=True)
    if {m.serial for m in window} & {m.serial for m in stream}:
        raise RuntimeError("the window's pumps are not distinct from the stream's")
    database_url = lab.database()
    broker = Restartable(lab.path(f"restart-{name}-mosquitto"))
    lab.stack.callback(broker.close)
    env = {} if share_group is None else {"PUMPWATCH_MQTT_SHARE_GROUP": share_group}
    ingest = ingest_service(lab, database_url, broker.url, name=f"restart-{name}-ingest", **env)
    ingest.start()
    published = publish(broker.url, window[:100], client="restart-window")
    publisher = PacedPublisher(broker.url, stream, rate=spec.rate, retry_for_s=120).start()
    try:
        time.sleep(spec.before_s)
        broker.stop()
        outcome.check(
            (broker.data_dir / "mosquitto.db").exists(),
            f"{name}: mosquitto saved no persistence file",
        )
        time.sleep(spec.down_s)
        broker.start()
        back = time.monotonic()
        in_window = publish(broker.url, window[100:200], client="restart-window")
        published += in_window
        early = not ingest.records("mqtt_reconnected")
        wait_until(
            lambda: len(ingest.records("mqtt_reconnected")) >= 1,
            "ingest to reconnect",
            timeout_s=60,
            alive=ingest,
        )
        run.figures["ingest reconnected after the restart"] = seconds(time.monotonic() - back)
        run.figures["published in the window before ingest reconnected"] = (
            f"{in_window}" if early else f"0 (ingest was quicker: {in_window} after)"
        )
        time.sleep(0.5)  # re-subscribed
        published += publish(broker.url, window[200:], client="restart-window")
        connected = ingest.records("mqtt_connected")
        outcome.check(
            len(connected) == 2 and connected[-1].get("session_present") is True,
            f"{name}: ingest's session was not restored from the persistence file",
        )
        publisher.join(600)
        _store_barrier(broker.url, database_url, barrier, ingest, client="restart-barrier")
        outcome.check(ingest.terminate() == 0, f"{name}: ingest did not stop cleanly on SIGTERM")
    except (TimeoutError, RuntimeError) as exc:
        outcome.problems.append(f"{name}: {str(exc).splitlines()[0]}")
    finally:
        publisher.stop.set()
        ingest.stop()
    acknowledged = [*stream[: publisher.acked], *window[:published]]
    result = asyncio.run(check_stored(database_url, [*acknowledged, barrier]))
    run.attempted = len(stream) + len(window)
    run.acknowledged = len(acknowledged)
    run.stored = result.stored - 1
    run.duplicated = result.duplicated
    run.figures["chunks re-sent by the publisher"] = f"{publisher.retries}"
    if share_group is None:
        run.lost = len(result.lost)
    else:
        flagged = asyncio.run(_flagged(database_url, acknowledged, set(result.lost)))
        run.lost = len(result.lost) - flagged
        run.figures.update(_loss_figures(len(result.lost), flagged))
    return run


def _store_barrier(
    broker_url: str, database_url: str, barrier: Outgoing, ingest: ServiceProcess, *, client: str
) -> None:
    """Publish the stream's last message and wait until ingest has stored it (and what came
    before it has committed)."""
    publish(broker_url, [barrier], client=client)
    wait_until(
        lambda: _stored(database_url, barrier),
        "the barrier to be stored",
        timeout_s=300,
        every_s=0.25,
        alive=ingest,
    )
    time.sleep(1.0)  # a batch before the barrier's may still be committing


def _stored(database_url: str, message: Outgoing) -> bool:
    found = asyncio.run(
        fetchval(
            database_url,
            "SELECT count(*) FROM ingested_messages WHERE msg_id = $1::uuid",
            message.msg_id,
        )
    )
    return bool(found)


def _loss_figures(lost: int, flagged: int) -> dict[str, str]:
    share = f" ({100 * flagged / lost:.1f} %)" if lost else ""
    return {
        "lost by the broker (PUBACKed, never delivered)": f"{lost:,}",
        "of those, flagged by sequence-gap detection": f"{flagged:,}{share}",
    }


def run_kill(lab: Lab, size: Size, seed: int) -> Outcome:
    spec = SIZES[size]
    outcome = Outcome(
        "broker-kill",
        f"mosquitto SIGKILLed with {spec.queued_s:.0f} s of messages queued for a stopped ingest",
    )
    started = time.monotonic()
    # One more second of traffic than the timeline publishes: from it, each source's next
    # message, published once ingest is back, so that every gap has a message after it to be
    # seen by (however the publisher and ingest raced the broker's restart on a busy machine).
    length = round(spec.rate * (spec.before_s + spec.down_s + spec.after_s + spec.queued_s)) + 1
    longer = _stream(spec, seed, spec.queued_s + 1.0)
    stream, barrier = longer[: length - 1], longer[length - 1]
    closers = list({(m.serial, _source(m)): m for m in reversed(longer[length:])}.values())
    if {(m.serial, _source(m)) for m in closers} != {(m.serial, _source(m)) for m in stream}:
        raise RuntimeError("the extra second does not give every source a next message")
    database_url = lab.database()
    broker = Restartable(lab.path("kill-mosquitto"))
    lab.stack.callback(broker.close)
    ingest = ingest_service(lab, database_url, broker.url, name="kill-ingest")
    ingest.start()
    publisher = PacedPublisher(broker.url, stream, rate=spec.rate, retry_for_s=120).start()
    try:
        time.sleep(spec.before_s)
        outcome.check(ingest.terminate() == 0, "ingest did not stop cleanly on SIGTERM")
        time.sleep(spec.queued_s)
        broker.kill()
        time.sleep(spec.down_s)
        broker.start()
        ingest.start()
        connected = ingest.records("mqtt_connected")
        outcome.figures["session after the SIGKILL"] = (
            "restored" if connected and connected[-1].get("session_present") else "gone (new)"
        )
        publisher.join(600)
        ingest.wait_ready()  # subscribed: what follows reaches it
        _store_barrier(broker.url, database_url, barrier, ingest, client="kill-barrier")
        # After the barrier (a source's next message must not overtake it).
        publish(broker.url, closers[:-1], client="kill-closers")
        _store_barrier(broker.url, database_url, closers[-1], ingest, client="kill-closers")
        outcome.check(ingest.terminate() == 0, "ingest did not stop cleanly on SIGTERM")
    except (TimeoutError, RuntimeError) as exc:
        outcome.problems.append(str(exc).splitlines()[0])
    finally:
        publisher.stop.set()
        ingest.stop()
    acknowledged = stream[: publisher.acked]
    closing = asyncio.run(check_stored(database_url, closers))
    outcome.check(not closing.lost, "a source's message after the restart was not stored")
    result = asyncio.run(check_stored(database_url, [*acknowledged, barrier]))
    flagged = asyncio.run(_flagged(database_url, acknowledged, set(result.lost)))
    outcome.attempted = len(stream)
    outcome.acknowledged = len(acknowledged)
    outcome.stored = result.stored - 1
    outcome.lost = len(result.lost) - flagged
    outcome.duplicated = result.duplicated
    outcome.figures.update(_loss_figures(len(result.lost), flagged))
    outcome.check(len(result.lost) > 0, "the SIGKILL lost nothing: the check proved nothing")
    outcome.elapsed_s = time.monotonic() - started
    return outcome


def _source(message: Outgoing) -> str:
    source: str = json.loads(message.payload)["source"]["id"]
    return source


async def _flagged(database_url: str, acknowledged: list[Outgoing], lost: set[str]) -> int:
    """How many of the lost messages lie inside a recorded sequence gap of their source."""
    gaps = await fetch(
        database_url, "SELECT serial, source_id, first_missing, last_missing FROM sequence_gaps"
    )
    by_source: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for g in gaps:
        by_source.setdefault((g["serial"], g["source_id"]), []).append(
            (int(g["first_missing"]), int(g["last_missing"]))
        )
    flagged = 0
    for message in acknowledged:
        if message.msg_id not in lost:
            continue
        doc = json.loads(message.payload)
        ranges = by_source.get((doc["serial"], doc["source"]["id"]), [])
        if any(first <= doc["seq"] <= last for first, last in ranges):
            flagged += 1
    return flagged
