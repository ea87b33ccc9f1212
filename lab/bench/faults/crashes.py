"""Scenario 1: ingest SIGKILLed at random moments (seeded) while a QoS 1 stream arrives.

A paced publisher sends the stream to the scenario's own mosquitto; `pumpwatch ingest` (the real
command) stores it. At ``kills`` moments spread over the stream (each at a random point of its
share, plus a random delay of up to 0.3 s) ingest gets SIGKILL, and is started again with the
same client id: the broker resumes the persistent session and redelivers what was not
acknowledged. Checked at the end: every message the broker acknowledged to the publisher is in
the database (readings or events) exactly once. Recovery time of each life is restart → its
first commit (ingest's own ``last_commit_timestamp`` metric).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from lab.bench.faults.common import (
    Lab,
    Outcome,
    PacedPublisher,
    Size,
    check_stored,
    fetchval,
    fleet_stream,
    ingest_service,
    percentile,
    publish,
    seconds,
    total,
    wait_until,
)
from lab.processes import ServiceProcess

LAST_COMMIT = "pumpwatch_ingest_last_commit_timestamp_seconds"
DUPLICATES = "pumpwatch_ingest_messages_duplicate_total"
LEDGER_COUNT = "SELECT count(*) FROM ingested_messages"


@dataclass(frozen=True)
class CrashSize:
    messages: int
    pumps: int
    kills: int
    rate: float
    """Messages per second published (each life gets a few seconds of traffic)."""


SIZES: dict[Size, CrashSize] = {
    "reduced": CrashSize(messages=10_000, pumps=50, kills=10, rate=500),
    "full": CrashSize(messages=100_000, pumps=50, kills=10, rate=3_000),
}


@dataclass(frozen=True)
class Kill:
    life: int
    acked: int
    """Messages the broker had acknowledged to the publisher at the kill."""
    stored: int
    """Rows in the dedup ledger at the kill."""

    @property
    def in_flight(self) -> bool:
        return self.stored < self.acked


def run(lab: Lab, size: Size, seed: int) -> Outcome:  # noqa: PLR0915 - one timeline, in order
    spec = SIZES[size]
    outcome = Outcome(
        "crashes",
        f"ingest SIGKILLed {spec.kills}x: {spec.messages:,} QoS 1 messages, {spec.pumps} pumps",
    )
    started = time.monotonic()
    rng = random.Random(seed)
    stream = fleet_stream(spec.messages + 1, pumps=spec.pumps, seed=seed)
    stream, barrier = stream[:-1], stream[-1]
    database_url = lab.database()
    broker = lab.broker("crashes-mosquitto")
    ingest = ingest_service(lab, database_url, broker.url, name="crashes-ingest")
    share = spec.messages / (spec.kills + 1)
    thresholds = [round(share * (i + rng.uniform(0.2, 0.9))) for i in range(spec.kills)]

    ingest.start()  # ready: subscribed, the session exists before the first message
    publisher = PacedPublisher(broker.url, stream, rate=spec.rate)
    # Each life's traffic is held half a share past its kill's threshold until the kill: the
    # kills stay mid-stream and each restart has traffic to commit, however slow the machine.
    publisher.hold(thresholds[0] + round(share / 2))
    publisher.start()
    recoveries: list[float] = []
    kills: list[Kill] = []
    redelivered = 0.0
    try:
        for life, threshold in enumerate(thresholds):
            if life:
                publisher.hold(threshold + round(share / 2))
                ingest.start(wait_ready=False)
                recoveries.append(_first_commit(ingest))
            wait_until(
                _reached(publisher, threshold),
                f"the publisher to reach {threshold} messages",
                timeout_s=600,
                alive=ingest,
            )
            time.sleep(rng.uniform(0.0, 0.3))
            samples = ingest.samples() or {}
            redelivered += total(samples, DUPLICATES)
            # Acknowledged first, stored second: fewer stored means the kill hit work in flight.
            acked = publisher.acked
            stored = int(asyncio.run(fetchval(database_url, LEDGER_COUNT)))
            outcome.check(ingest.alive, f"ingest died by itself in life {life}")
            ingest.kill()
            kills.append(Kill(life, acked, stored))
        publisher.hold(None)
        ingest.start(wait_ready=False)
        recoveries.append(_first_commit(ingest))
        publisher.join(900)
        # The session delivers in order: once the barrier is stored, all before it came.
        publish(broker.url, [barrier], client="crashes-barrier")
        wait_until(
            lambda: int(asyncio.run(fetchval(database_url, LEDGER_COUNT))) >= spec.messages + 1,
            "every message to be stored",
            timeout_s=300,
            every_s=0.25,
            alive=ingest,
        )
        samples = ingest.samples() or {}
        redelivered += total(samples, DUPLICATES)
        outcome.check(ingest.terminate() == 0, "ingest did not stop cleanly on SIGTERM")
    except (TimeoutError, RuntimeError) as exc:
        outcome.problems.append(str(exc).splitlines()[0])
    finally:
        publisher.stop.set()
        ingest.stop()

    acknowledged = stream[: publisher.acked]
    result = asyncio.run(check_stored(database_url, [*acknowledged, barrier]))
    outcome.attempted = len(stream)
    outcome.acknowledged = len(acknowledged)
    outcome.stored = result.stored - 1  # the barrier is not part of the stream
    outcome.lost = len(result.lost)
    outcome.duplicated = result.duplicated
    in_flight = sum(k.in_flight for k in kills)
    mid_stream = sum(0 < k.stored < spec.messages for k in kills)
    outcome.check(len(kills) == spec.kills, f"{len(kills)} of {spec.kills} kills happened")
    outcome.check(mid_stream == len(kills), f"only {mid_stream} kills came mid-stream")
    outcome.check(in_flight >= 1, "no kill interrupted work in flight")
    outcome.check(publisher.acked == len(stream), "the publisher did not finish")
    outcome.figures.update(
        {
            "kills (mid-stream / with work in flight)": (
                f"{len(kills)} ({mid_stream} / {in_flight})"
            ),
            "recovery p50 / p99 / max (restart → first commit)": " / ".join(
                seconds(percentile(recoveries, p)) for p in (50, 99, 100)
            ),
            "redelivered, found already stored": f"{redelivered:,.0f}",
        }
    )
    if result.lost:
        outcome.figures["lost, e.g."] = ", ".join(result.lost[:3])
    outcome.elapsed_s = time.monotonic() - started
    return outcome


def _reached(publisher: PacedPublisher, count: int) -> Callable[[], bool]:
    return lambda: publisher.acked >= count or publisher.done


def _first_commit(ingest: ServiceProcess) -> float:
    """Seconds from the last start to the first commit of this life."""

    def committed() -> bool:
        samples = ingest.samples()
        return samples is not None and samples.get(LAST_COMMIT, 0.0) > 0

    wait_until(
        committed, "the restarted ingest's first commit", timeout_s=120, every_s=0.02, alive=ingest
    )
    samples = ingest.samples() or {}
    return max(0.0, samples.get(LAST_COMMIT, 0.0) - ingest.started_at)
