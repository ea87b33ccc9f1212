"""Scenario 3: the broker restarts mid-stream.

- ``broker-restart``: mosquitto (with persistence) gets SIGTERM mid-stream, saves its sessions
  and is started again on the same port and data directory ``down_s`` later. The publisher
  reconnects and re-sends what was not acknowledged; ingest reconnects to its restored
  session. Pass: 0 lost, 0 duplicates.
- ``broker-kill``: ingest is stopped (SIGTERM, as in a deploy) while the stream goes on, so the
  broker queues messages for its session in memory; then mosquitto gets SIGKILL, and is started
  again. What it had queued and not yet saved is gone from the broker; ingest finds the holes
  in each source's ``seq`` and asks the simulated devices (lab.sim.resend), which hold what
  they sent, to resend them (backfill, MQTT contract 1.1). Pass: every message lost by the
  broker recovered, lost end to end 0. One pump's devices lost their buffer: its gap must end
  ``unrecoverable`` with a telemetry_gap alert (the only one), and nothing may be stored that
  no device sent.
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
    total,
    wait_until,
)
from lab.embedded import EmbeddedBroker
from lab.processes import ServiceProcess, metrics_service
from lab.sim.fleet import Outgoing
from lab.sim.resend import DeviceBuffers, ResendResponder
from services.settings import parse_mqtt_url


@dataclass(frozen=True)
class BrokerSize:
    rate: float
    before_s: float
    down_s: float
    after_s: float
    queued_s: float
    """broker-kill: how long the broker queues for the stopped ingest before its SIGKILL."""
    give_up_s: float = 20.0
    """broker-kill: ingest gives a gap up (unrecoverable) this long after finding it."""


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


def run_kill(lab: Lab, size: Size, seed: int) -> Outcome:  # noqa: PLR0915 - one timeline
    """What the broker lost is asked for again (backfill) from the simulated devices, which hold
    what they sent, except one pump's devices, which lost their buffer: its gap must end
    ``unrecoverable``, with the telemetry_gap alert, and nothing stored that was not sent."""
    spec = SIZES[size]
    outcome = Outcome(
        "broker-kill",
        f"mosquitto SIGKILLed with {spec.queued_s:.0f} s of messages queued for a stopped ingest; "
        "backfill asks the devices again",
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
    # The devices hold everything they send; one pump's lose it all before anyone asks.
    forgetful = stream[0].serial
    buffers = DeviceBuffers([*stream, barrier, *closers])
    buffers.lose(forgetful)
    database_url = lab.database()
    broker = Restartable(lab.path("kill-mosquitto"))
    lab.stack.callback(broker.close)
    ingest = ingest_service(
        lab, database_url, broker.url, name="kill-ingest", **_backfill_env(spec.give_up_s)
    )
    alerts = lab.service(
        metrics_service(
            "alerts",
            {
                "PUMPWATCH_DATABASE_URL": database_url,
                "PUMPWATCH_MQTT_URL": broker.url,
                "PUMPWATCH_NOTIFY_ENABLED": "false",
                # The gap is given up on after give_up_s; the rule adds no wait of its own here.
                "PUMPWATCH_RULES__TELEMETRY_GAP_MIN_MINUTES": "0.01",
            },
            lab.path("kill-alerts.log"),
        )
    )
    ingest.start()
    alerts.start()
    publisher = PacedPublisher(broker.url, stream, rate=spec.rate, retry_for_s=120).start()
    devices: ResendResponder | None = None
    samples: dict[str, float] = {}
    try:
        time.sleep(spec.before_s)
        outcome.check(ingest.terminate() == 0, "ingest did not stop cleanly on SIGTERM")
        time.sleep(spec.queued_s)
        broker.kill()
        time.sleep(spec.down_s)
        broker.start()
        devices = lab.stack.enter_context(
            ResendResponder(parse_mqtt_url(broker.url), buffers, client_id="kill-devices")
        )
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
        took = wait_until(
            lambda: _open_gaps(database_url) == 0,
            "every gap to be recovered or given up on",
            timeout_s=spec.give_up_s + 300,
            every_s=0.25,
            alive=ingest,
        )
        outcome.figures["every gap recovered or given up on after the closers"] = seconds(took)
        wait_until(
            lambda: _gap_alerts(database_url) != [],
            "the telemetry_gap alert",
            timeout_s=120,
            every_s=0.25,
            alive=alerts,
        )
        samples = ingest.metrics()
        outcome.check(ingest.terminate() == 0, "ingest did not stop cleanly on SIGTERM")
    except (TimeoutError, RuntimeError) as exc:
        outcome.problems.append(str(exc).splitlines()[0])
    finally:
        publisher.stop.set()
        ingest.stop()
        alerts.stop()
    acknowledged = stream[: publisher.acked]
    sent = [*acknowledged, barrier, *closers]
    closing = asyncio.run(check_stored(database_url, closers))
    outcome.check(not closing.lost, "a source's message after the restart was not stored")
    result = asyncio.run(check_stored(database_url, sent))
    lost = set(result.lost)
    asked = _asked(devices, stream)
    forgot = {m.msg_id for m in acknowledged if m.serial == forgetful}
    unrecoverable = asyncio.run(_in_gaps(database_url, acknowledged, lost, "unrecoverable"))
    outcome.attempted = len(stream)
    outcome.acknowledged = len(acknowledged)
    outcome.stored = result.stored - 1 - len(closers)
    outcome.duplicated = result.duplicated
    # Lost end to end: every acknowledged message not stored, except the forgetful pump's that
    # lie in an unrecoverable gap (flagged, alerted, and truly gone from its device).
    excused = lost & forgot & unrecoverable
    outcome.lost = len(lost - excused)
    healthy_asked = {i for i in asked if i not in forgot}
    outcome.figures.update(
        {
            "lost by the broker (PUBACKed, never delivered; asked for by backfill)": (
                f"{len(asked):,}"
            ),
            "of those, from devices holding their buffers": f"{len(healthy_asked):,}",
            "recovered by backfill": _share(len(healthy_asked - lost), len(healthy_asked)),
            "lost end to end (devices holding their buffers)": (f"{len(lost - forgot):,}"),
            "device that lost its buffer: messages lost": f"{len(lost & forgot):,}",
            "…in unrecoverable gaps": f"{len(excused):,}",
            "…telemetry_gap alert": ", ".join(_gap_alerts(database_url)) or "none",
            "stored that no device sent (invented)": f"{result.unexpected:,}",
            "resend requests (ingest)": (
                f"{total(samples, 'pumpwatch_ingest_backfill_requests_total'):,.0f}"
            ),
            "gaps recovered / unrecoverable (ingest)": (
                f"{total(samples, 'pumpwatch_ingest_backfill_gaps_recovered_total'):,.0f} / "
                f"{total(samples, 'pumpwatch_ingest_backfill_gaps_unrecoverable_total'):,.0f}"
            ),
        }
    )
    outcome.check(len(asked) > 0, "the SIGKILL lost nothing: the check proved nothing")
    outcome.check(
        bool(lost & forgot), "the forgetful device lost nothing to the broker: proved nothing"
    )
    outcome.check(result.unexpected == 0, "messages stored that no device sent")
    outcome.check(
        _gap_alerts(database_url) == [forgetful],
        f"telemetry_gap alerts: {_gap_alerts(database_url)}, expected only {forgetful}",
    )
    outcome.elapsed_s = time.monotonic() - started
    return outcome


def _backfill_env(give_up_s: float) -> dict[str, str]:
    """Backfill on a bench's time scale: ask after 1 s, again every 2-4 s, give up after
    ``give_up_s``."""
    return {
        "PUMPWATCH_BACKFILL_SETTLE_S": "1",
        "PUMPWATCH_BACKFILL_POLL_INTERVAL_S": "0.2",
        "PUMPWATCH_BACKFILL_RETRY_INITIAL_S": "2",
        "PUMPWATCH_BACKFILL_RETRY_MAX_S": "4",
        "PUMPWATCH_BACKFILL_GIVE_UP_AFTER_S": f"{give_up_s:g}",
        "PUMPWATCH_INGEST_GAUGE_INTERVAL_S": "1",
    }


def _share(part: int, whole: int) -> str:
    return f"{part:,}" + (f" ({100 * part / whole:.1f} %)" if whole else "")


def _asked(devices: ResendResponder | None, stream: list[Outgoing]) -> set[str]:
    """The msg_ids of the stream's messages that some resend request covered."""
    if devices is None:
        return set()
    by_seq = {(m.serial, _source(m), json.loads(m.payload)["seq"]): m.msg_id for m in stream}
    asked: set[str] = set()
    for request in devices.requested():
        c = request.command
        for seq in range(c.from_seq, c.to_seq + 1):
            found = by_seq.get((request.serial, c.source_id, seq))
            if found is not None:
                asked.add(found)
    return asked


def _open_gaps(database_url: str) -> int:
    query = "SELECT count(*) FROM sequence_gaps WHERE state = 'open'"
    return int(asyncio.run(fetchval(database_url, query)))


def _gap_alerts(database_url: str) -> list[str]:
    query = "SELECT DISTINCT serial FROM alerts WHERE rule = 'telemetry_gap' ORDER BY serial"
    return [r["serial"] for r in asyncio.run(fetch(database_url, query))]


def _source(message: Outgoing) -> str:
    source: str = json.loads(message.payload)["source"]["id"]
    return source


async def _flagged(database_url: str, acknowledged: list[Outgoing], lost: set[str]) -> int:
    """How many of the lost messages lie inside a recorded sequence gap of their source."""
    return len(await _in_gaps(database_url, acknowledged, lost))


async def _in_gaps(
    database_url: str, acknowledged: list[Outgoing], lost: set[str], state: str | None = None
) -> set[str]:
    """The lost messages that lie inside a recorded sequence gap of their source (in ``state``,
    if given)."""
    gaps = await fetch(
        database_url,
        "SELECT serial, source_id, first_missing, last_missing FROM sequence_gaps "
        "WHERE $1::text IS NULL OR state = $1",
        state,
    )
    by_source: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for g in gaps:
        by_source.setdefault((g["serial"], g["source_id"]), []).append(
            (int(g["first_missing"]), int(g["last_missing"]))
        )
    flagged: set[str] = set()
    for message in acknowledged:
        if message.msg_id not in lost:
            continue
        doc = json.loads(message.payload)
        ranges = by_source.get((doc["serial"], doc["source"]["id"]), [])
        if any(first <= doc["seq"] <= last for first, last in ranges):
            flagged.add(message.msg_id)
    return flagged
