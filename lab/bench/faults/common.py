"""What every fault scenario shares: the outcome it reports, the lab it runs in (a broker of its
own, scratch databases), the real services as child processes, a paced publisher, and the
checks of what was stored.

Everything listens on 127.0.0.1 only, every loop is bounded in count and time, and every child
process is ended by the scenario that started it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import asyncpg

from lab import embedded
from lab.bench.ingest import _drop_database, _fresh_database
from lab.embedded import EmbeddedBroker
from lab.processes import ServiceProcess, metrics_service
from lab.sim.fleet import Fleet, Outgoing
from lab.sim.publisher import PublishError, publish_all
from services.settings import parse_mqtt_url

Size = Literal["reduced", "full"]

STORED_IDS = """
SELECT msg_id::text AS msg_id FROM readings
UNION ALL
SELECT msg_id::text AS msg_id FROM events
"""


# -- the outcome ------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one scenario did and found, Jepsen-style: the counts of the history, and whether
    the checker found it valid (every invariant held and the fault really was injected)."""

    scenario: str
    title: str
    attempted: int | None = None
    """Messages published (or requests sent, or canaries planted)."""
    acknowledged: int | None = None
    """Of those, acknowledged: PUBACKed by the broker (or answered)."""
    stored: int | None = None
    """Distinct acknowledged messages found in the database."""
    lost: int | None = None
    """Acknowledged and absent from the database (or, for PHI, canaries found where they must
    never be)."""
    duplicated: int | None = None
    """Rows stored more than once for one message (or alerts/notifications doubled)."""
    problems: list[str] = field(default_factory=list)
    """Every broken invariant or precondition; the outcome is valid only when empty."""
    figures: dict[str, str] = field(default_factory=dict)
    """Further figures, in print order: recovery times, latencies, memory, reasons."""
    elapsed_s: float = 0.0

    @property
    def valid(self) -> bool:
        return not self.problems and not self.lost and not self.duplicated

    def check(self, condition: bool, problem: str) -> bool:
        """Record ``problem`` unless ``condition`` holds; returns ``condition``."""
        if not condition:
            self.problems.append(problem)
        return condition


# -- the lab ----------------------------------------------------------------------------------


@dataclass
class Lab:
    """Where scenarios run: a scratch directory, an admin URL of a PostgreSQL server (scratch
    databases are created on it and dropped), and a cleanup stack."""

    admin_url: str
    scratch: Path
    stack: contextlib.ExitStack

    def database(self) -> str:
        """A fresh, migrated database, dropped at the end."""
        url = asyncio.run(_fresh_database(self.admin_url))
        self.stack.callback(lambda: asyncio.run(_drop_database(self.admin_url, url)))
        return url

    def broker(self, name: str = "mosquitto") -> EmbeddedBroker:
        """A mosquitto of the scenario's own (with persistence and the project's limits)."""
        broker = embedded.start_mosquitto(self.scratch / name)
        self.stack.callback(broker.stop)
        return broker

    def path(self, name: str) -> Path:
        return self.scratch / name

    def service(self, service: ServiceProcess) -> ServiceProcess:
        """``service``, stopped (SIGTERM) at the end if it still runs."""
        self.stack.callback(service.stop)
        return service


# -- the services as child processes (lab.processes) -------------------------------------------


def total(samples: dict[str, float], name: str) -> float:
    """The sum of a metric over all its label values."""
    return sum(v for k, v in samples.items() if k == name or k.startswith(name + "{"))


def ingest_service(
    lab: Lab, database_url: str, broker_url: str, *, name: str = "ingest", **env: str
) -> ServiceProcess:
    """Ingest on the scenario's database and broker (a client id of its own), stopped at the
    end."""
    settings = {
        "PUMPWATCH_DATABASE_URL": database_url,
        "PUMPWATCH_MQTT_URL": broker_url,
        "PUMPWATCH_MQTT_CLIENT_ID": f"faults-{name}-{uuid.uuid4().hex[:6]}",
    }
    return lab.service(metrics_service("ingest", settings | env, lab.path(f"{name}.log")))


# -- publishing -------------------------------------------------------------------------------


def days_before_now(days: float) -> datetime:
    return (datetime.now(UTC) - timedelta(days=days)).replace(second=0, microsecond=0)


def fleet_stream(
    count: int, *, pumps: int, seed: int, telemetry_only: bool = False
) -> list[Outgoing]:
    """``count`` valid messages of a fault-free fleet, every one recorded before now."""
    interval = timedelta(minutes=15)
    # Readings alone would need count / pumps intervals; events add a few per cent.
    span = interval * (count / pumps) * 1.2 + timedelta(days=1)
    fleet = Fleet(pumps=pumps, seed=seed, start=days_before_now(span.total_seconds() / 86400))
    messages: list[Outgoing] = []
    while len(messages) < count:
        batch = fleet.take(count)
        if telemetry_only:
            batch = [m for m in batch if m.kind == "telemetry"]
        messages.extend(batch)
    messages = messages[:count]
    now = datetime.now(UTC)
    if not all(m.valid and m.msg_id for m in messages) or max(m.at for m in messages) >= now:
        raise RuntimeError("the simulated stream is not all valid and in the past")
    return messages


class PacedPublisher:
    """Publishes a stream from a thread at about ``rate`` messages per second, in chunks of
    ``chunk`` (each on a fresh connection, returning once the broker acknowledged every message
    of the chunk; about 20 chunks a second by default). ``acked`` counts messages of
    acknowledged chunks: the history's "acknowledged" set is ``stream[:acked]``."""

    def __init__(
        self,
        broker_url: str,
        stream: Sequence[Outgoing],
        *,
        rate: float,
        chunk: int | None = None,
        protocol: Literal["5", "3.1.1"] = "5",
        ack_timeout_s: float = 60.0,
        retry_for_s: float = 0.0,
    ) -> None:
        self.target = parse_mqtt_url(broker_url)
        self.retry_for_s = retry_for_s
        self.retries = 0
        """Chunks sent again because the broker could not be reached or stopped answering."""
        self.stream = stream
        self.rate = rate
        # About 20 chunks a second: the flow is smooth, so work is always in flight.
        self.chunk = chunk or max(20, round(rate / 20))
        self.protocol = protocol
        self.ack_timeout_s = ack_timeout_s
        self.acked = 0
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="faults-publisher", daemon=True)
        self.started_at = 0.0
        self.finished_at = 0.0
        self._hold_at: int | None = None

    def hold(self, count: int | None) -> None:
        """Publish no further than ``count`` messages until it is raised (None: the whole
        stream). A scenario that acts at a point of the stream holds the stream a little past
        it, so that on a slow machine the stream cannot end before the act."""
        self._hold_at = count

    def start(self) -> PacedPublisher:
        self.started_at = time.monotonic()
        self._thread.start()
        return self

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self.stop.set()
            self._thread.join(30)
            raise RuntimeError(f"publishing did not finish within {timeout_s:.0f} s")
        if self.error is not None:
            raise RuntimeError(f"publishing failed: {self.error}") from self.error

    def _run(self) -> None:
        failing_since = 0.0
        try:
            n = 0
            while self.acked < len(self.stream) and not self.stop.is_set():
                limit = len(self.stream) if self._hold_at is None else self._hold_at
                if self.acked >= limit:
                    self.stop.wait(0.02)  # held: until the scenario raises the limit
                    continue
                upto = min(self.acked + self.chunk, len(self.stream), limit)
                try:
                    report = publish_all(
                        self.target,
                        self.stream[self.acked : upto],
                        client_id=f"faults-pub-{n}-{uuid.uuid4().hex[:6]}",
                        protocol=self.protocol,
                        ack_timeout_s=self.ack_timeout_s,
                    )
                except PublishError:
                    # The broker went away mid-chunk: like a device, send the whole chunk again
                    # (same msg_ids: what did arrive is recognised as a duplicate).
                    failing_since = failing_since or time.monotonic()
                    if time.monotonic() - failing_since > self.retry_for_s:
                        raise
                    self.retries += 1
                    self.stop.wait(0.2)
                    continue
                failing_since = 0.0
                if report.published != upto - self.acked or report.refused:
                    raise RuntimeError(
                        f"the broker acknowledged {report.published} of a chunk of "
                        f"{upto - self.acked} ({report.refused} refused)"
                    )
                self.acked = upto
                n += 1
                # Pace: the chunk's share of time, from the start (so slow chunks catch up).
                due = self.started_at + self.acked / self.rate
                self.stop.wait(max(0.0, due - time.monotonic()))
        except BaseException as exc:  # reported by join()
            self.error = exc
        finally:
            self.finished_at = time.monotonic()


def publish(broker_url: str, messages: Sequence[Outgoing], *, client: str = "faults") -> int:
    """Publish as fast as the broker takes them; returns how many it acknowledged."""
    report = publish_all(
        parse_mqtt_url(broker_url),
        messages,
        client_id=f"{client}-{uuid.uuid4().hex[:8]}",
        ack_timeout_s=60.0,
    )
    return report.published


# -- checks -----------------------------------------------------------------------------------


async def fetch(url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(query, *args)
    finally:
        await conn.close()


async def fetchval(url: str, query: str, *args: Any) -> Any:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(query, *args)
    finally:
        await conn.close()


@dataclass(frozen=True)
class StoredCheck:
    stored: int
    """Distinct acknowledged messages stored."""
    lost: list[str]
    duplicated: int
    """Extra rows: stored rows beyond one per distinct message."""
    unexpected: int
    """Stored messages that were never acknowledged (not an error: published, not yet acked
    when the run's accounting closed — counted for the record)."""
    ledger: int


async def check_stored(url: str, acknowledged: Iterable[Outgoing]) -> StoredCheck:
    """Compare the acknowledged messages with readings and events and the dedup ledger."""
    wanted = {m.msg_id for m in acknowledged if m.msg_id}
    rows = await fetch(url, STORED_IDS)
    seen = Counter(str(r["msg_id"]) for r in rows)
    duplicated = sum(n - 1 for n in seen.values() if n > 1)
    lost = sorted(wanted - seen.keys())
    ledger = int(await fetchval(url, "SELECT count(*) FROM ingested_messages"))
    return StoredCheck(
        stored=len(wanted & seen.keys()),
        lost=lost,
        duplicated=duplicated,
        unexpected=len(seen.keys() - wanted),
        ledger=ledger,
    )


def wait_until(
    condition: Callable[[], bool],
    what: str,
    *,
    timeout_s: float,
    every_s: float = 0.05,
    alive: ServiceProcess | None = None,
) -> float:
    """Poll ``condition``; returns the seconds it took. Raises on timeout or if ``alive``
    exited."""
    started = time.monotonic()
    while not condition():
        if alive is not None and not alive.alive:
            raise RuntimeError(f"{alive.command} exited while waiting for {what}:\n{alive.log()}")
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"waited {timeout_s:.0f} s for {what}")
        time.sleep(every_s)
    return time.monotonic() - started


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (``p`` in 0..100); 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def seconds(value: float) -> str:
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"
