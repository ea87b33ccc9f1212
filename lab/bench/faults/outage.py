"""Scenario 2: PostgreSQL goes away mid-stream, twice.

The scenario runs a PostgreSQL server of its own (pgserver, in its scratch directory: the
machine's shared server is never touched), `pumpwatch ingest` and `pumpwatch api` on it, and a
paced QoS 1 stream. Then:

A. **Stopped** (``pg_ctl stop -m fast``) for ``down_s`` seconds; halfway through, ingest is
   SIGKILLed and started again while the database is still away. Ingest must stay up (never
   exit by itself, so never crash-loop), commit nothing (it acknowledges only what it
   committed), and carry on when the server is back. The API must answer 503 problem documents
   (never a 500) and recover by itself.
B. **SIGKILLed** (the postmaster), started again after ``kill_down_s`` seconds: crash recovery.

At the end, every message the broker acknowledged is stored exactly once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab import embedded
from lab.bench.faults.common import (
    Lab,
    Outcome,
    PacedPublisher,
    Size,
    check_stored,
    fetchval,
    fleet_stream,
    ingest_service,
    publish,
    seconds,
    wait_until,
)
from lab.bench.ingest import _fresh_database
from lab.processes import ServiceProcess, api_service

LAST_COMMIT = "pumpwatch_ingest_last_commit_timestamp_seconds"
ADMIN_TOKEN = "faults-outage-admin-token-4f1c9a"  # noqa: S105 - a scratch API's bootstrap token


@dataclass(frozen=True)
class OutageSize:
    rate: float
    before_s: float
    down_s: float
    kill_down_s: float


SIZES: dict[Size, OutageSize] = {
    "reduced": OutageSize(rate=300, before_s=2, down_s=5, kill_down_s=2),
    "full": OutageSize(rate=500, before_s=10, down_s=60, kill_down_s=10),
}


class OwnPostgres:
    """A PostgreSQL server of the scenario's own (pgserver), stopped, killed and started."""

    def __init__(self, data_dir: Path) -> None:
        self.embedded = embedded.start_postgres(data_dir, database="postgres")
        self.server: Any = self.embedded._server
        self.url = self.embedded.url

    def stop(self) -> None:
        from pgserver._commands import pg_ctl  # type: ignore[attr-defined]

        pg_ctl(
            ["-w", "-m", "fast", "stop"],
            pgdata=self.server.pgdata,
            user=self.server.system_user,
            timeout=60,
        )

    def kill(self) -> None:
        pid = self.server.get_pid()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while _running(pid) and time.monotonic() < deadline:
            time.sleep(0.05)

    def start(self) -> None:
        """Start again (after a SIGKILL: crash recovery), retrying while the killed server's
        backends are still going away."""
        deadline = time.monotonic() + 60
        while True:
            try:
                with self.server._lock:
                    self.server.ensure_postgres_running()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def close(self) -> None:
        self.embedded.stop()


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Probe:
    """Polls the API and ingest from a thread, recording what they answered in each phase."""

    api: ServiceProcess
    ingest: ServiceProcess
    serial: str
    phase: str = "before"
    api_statuses: dict[str, Counter[int]] = field(default_factory=dict)
    ingest_ready: dict[str, Counter[int]] = field(default_factory=dict)
    ingest_health: dict[str, Counter[int]] = field(default_factory=dict)
    api_errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        import httpx

        with httpx.Client(
            base_url=self.api.base_url,
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            timeout=10,
        ) as client:
            while not self.stop.wait(0.25):
                phase = self.phase
                try:
                    answer = client.get(f"/v1/pumps/{self.serial}")
                    status = answer.status_code
                    if status >= 500 and (status != 503 or "retry-after" not in answer.headers):
                        self.api_errors.append(f"{phase}: {status} {answer.text[:120]}")
                except httpx.HTTPError as exc:
                    status = 0
                    self.api_errors.append(f"{phase}: {type(exc).__name__}")
                self.api_statuses.setdefault(phase, Counter())[status] += 1
                ready = self.ingest.get("/readyz", timeout_s=3.0)[0]
                self.ingest_ready.setdefault(phase, Counter())[ready] += 1
                health = self.ingest.get("/healthz", timeout_s=3.0)[0]
                self.ingest_health.setdefault(phase, Counter())[health] += 1


def run(lab: Lab, size: Size, seed: int) -> Outcome:  # noqa: PLR0915 - one timeline, in order
    spec = SIZES[size]
    outcome = Outcome(
        "outage",
        f"PostgreSQL stopped {spec.down_s:.0f} s (ingest SIGKILLed meanwhile), then SIGKILLed",
    )
    started = time.monotonic()
    span_s = 2 * spec.before_s + spec.down_s + spec.kill_down_s + 8
    stream = fleet_stream(round(spec.rate * span_s) + 1, pumps=50, seed=seed)
    stream, barrier = stream[:-1], stream[-1]

    postgres = OwnPostgres(lab.path("postgres"))
    lab.stack.callback(postgres.close)
    database_url = asyncio.run(_fresh_database(postgres.url))
    broker = lab.broker("outage-mosquitto")
    ingest = ingest_service(lab, database_url, broker.url, name="outage-ingest")
    api = lab.service(
        api_service(
            {"PUMPWATCH_DATABASE_URL": database_url, "PUMPWATCH_ADMIN_TOKEN": ADMIN_TOKEN},
            lab.path("outage-api.log"),
        )
    )
    ingest.start()
    api.start()
    probe = Probe(api, ingest, stream[0].serial)
    prober = threading.Thread(target=probe.run, name="outage-probe", daemon=True)
    prober.start()
    publisher = PacedPublisher(broker.url, stream, rate=spec.rate).start()
    figures: dict[str, str] = {}
    try:
        time.sleep(spec.before_s)
        # -- A: stopped ----------------------------------------------------------------------
        probe.phase = "stopped"
        postgres.stop()
        stopped_at = time.time()
        time.sleep(spec.down_s / 2)
        committed_before_kill = (ingest.samples() or {}).get(LAST_COMMIT, 0.0)
        ingest.kill()
        ingest.start(wait_ready=False)  # the database is away: up, never ready
        restarted_at = time.monotonic()
        time.sleep(max(0.0, spec.down_s / 2 - 0.5))
        outcome.check(
            ingest.alive,
            f"ingest exited by itself while the database was stopped ({ingest.exit_text})",
        )
        samples = ingest.samples() or {}
        outcome.check(
            committed_before_kill <= stopped_at + 0.5 and samples.get(LAST_COMMIT, 0.0) == 0.0,
            "ingest committed while the database was stopped",
        )
        figures["ingest restarted during the outage: up, not ready"] = (
            f"{time.monotonic() - restarted_at:.1f} s, /readyz "
            f"{dict(probe.ingest_ready.get('stopped', {}))}"
        )
        postgres.start()
        probe.phase = "recovering"
        back_at = time.monotonic()
        figures["ingest: database back → first commit"] = seconds(_first_commit(ingest, back_at))
        figures["API: database back → answering"] = seconds(_api_back(probe, back_at))
        probe.phase = "between"
        time.sleep(spec.before_s)
        # -- B: SIGKILLed --------------------------------------------------------------------
        probe.phase = "killed"
        postgres.kill()
        time.sleep(spec.kill_down_s)
        outcome.check(
            ingest.alive,
            f"ingest exited by itself while the database was down ({ingest.exit_text})",
        )
        down_until = time.time()  # nothing can commit before the server is back
        postgres.start()
        probe.phase = "recovering after kill"
        back_at = time.monotonic()
        figures["ingest: crash-recovered database → first commit"] = seconds(
            _first_commit(ingest, back_at, after=down_until)
        )
        figures["API: crash-recovered database → answering"] = seconds(_api_back(probe, back_at))
        probe.phase = "after"
        publisher.join(600)
        publish(broker.url, [barrier], client="outage-barrier")
        wait_until(
            lambda: (
                int(asyncio.run(fetchval(database_url, "SELECT count(*) FROM ingested_messages")))
                >= len(stream) + 1
            ),
            "every message to be stored",
            timeout_s=300,
            every_s=0.25,
            alive=ingest,
        )
        outcome.check(ingest.alive, f"ingest exited by itself ({ingest.exit_text})")
        probe.stop.set()
        prober.join(15)
        outcome.check(ingest.terminate() == 0, "ingest did not stop cleanly on SIGTERM")
        outcome.check(api.terminate() == 0, "the API did not stop cleanly on SIGTERM")
    except (TimeoutError, RuntimeError) as exc:
        outcome.problems.append(str(exc).splitlines()[0])
    finally:
        probe.stop.set()
        prober.join(15)
        publisher.stop.set()
        ingest.stop()
        api.stop()

    acknowledged = stream[: publisher.acked]
    result = asyncio.run(check_stored(database_url, [*acknowledged, barrier]))
    outcome.attempted = len(stream)
    outcome.acknowledged = len(acknowledged)
    outcome.stored = result.stored - 1
    outcome.lost = len(result.lost)
    outcome.duplicated = result.duplicated
    outcome.check(ingest.starts == 2, f"ingest was started {ingest.starts} times, not twice")
    down_api = probe.api_statuses.get("stopped", Counter()) + probe.api_statuses.get(
        "killed", Counter()
    )
    outcome.check(
        down_api.get(503, 0) > 0, "the API never answered 503 while the database was down"
    )
    for error in probe.api_errors[:3]:
        outcome.problems.append(f"API answered {error}")
    outcome.figures.update(figures)
    outcome.figures["API answers while down (status x count)"] = _statuses(down_api)
    down_health = probe.ingest_health.get("stopped", Counter()) + probe.ingest_health.get(
        "killed", Counter()
    )
    outcome.figures["ingest /healthz while down"] = _statuses(down_health)
    outcome.elapsed_s = time.monotonic() - started
    return outcome


def _statuses(counts: Counter[int]) -> str:
    return ", ".join(f"{status or 'no answer'} x {n}" for status, n in sorted(counts.items()))


def _first_commit(ingest: ServiceProcess, since: float, after: float | None = None) -> float:
    """Seconds from ``since`` (monotonic) until ingest commits (after ``after``, a time.time())."""
    floor = after if after is not None else 0.0

    def committed() -> bool:
        samples = ingest.samples()
        return samples is not None and samples.get(LAST_COMMIT, 0.0) > floor

    wait_until(committed, "ingest to commit again", timeout_s=180, every_s=0.05, alive=ingest)
    return time.monotonic() - since


def _api_back(probe: Probe, since: float) -> float:
    import httpx

    with httpx.Client(
        base_url=probe.api.base_url,
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=10,
    ) as client:

        def answering() -> bool:
            return client.get(f"/v1/pumps/{probe.serial}").status_code in (200, 404)

        wait_until(answering, "the API to answer again", timeout_s=120, every_s=0.1)
    return time.monotonic() - since
