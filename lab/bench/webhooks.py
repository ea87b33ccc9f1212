"""``pumpwatch bench webhooks``: alert commit → signed webhook received, under ingest load.

The alert benchmark's load (``lab.bench.alerts``, phase 2): a stream of simulated messages
(1,000 pumps at 15-minute readings, a share of them with a stalling motor, so alerts open,
escalate and resolve all through it) published as fast as the broker takes it to the real
``pumpwatch ingest`` and ``pumpwatch alerts`` processes (production settings, wall clock) on a
broker and a scratch database of the bench's own. Every pump belongs to a patient of one clinic
with one webhook subscribed to every alert event, pointing at the bench's receiver (an HTTP
server on 127.0.0.1, allowed by ``PUMPWATCH_WEBHOOK_ALLOW_HOSTS``); MQTT deliveries run as well
(the notification worker has a broker).

The notification worker runs as a separate ``pumpwatch notify`` process beside ``pumpwatch
alerts`` with ``PUMPWATCH_NOTIFY_ENABLED=false`` (the deployment the compose file describes), or,
with ``in_process`` (``--in-process``), on the alert service's own thread (its default).

Latency of a webhook = when the receiver read it minus when the alert change committed. The
commit is when its outbox row became visible: a connection of the bench reads new outbox rows
every 10 ms (so the commit is known to 10 ms, and the latency is if anything that much too
low); each row's webhook-id follows from the row (``routing.message_id``). The receiver and
the outbox watch run in a process of their own (:class:`_Probe`): in the bench's process, whose
publisher thread keeps the interpreter lock busy, they would read requests and rows late. Also
shown: from the alert change's ``updated_at`` (the engine's clock when it began the batch of
pumps that changed it: includes the evaluation of the batch) and the delivering process's own
histogram (outbox row's ``created_at``, the evaluating transaction's start, to delivered). Every
request's signature is verified afterwards with ``standardwebhooks``; duplicates (the same
``webhook-id``) are counted apart.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import asyncpg
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from lab import embedded
from lab.bench.alerts import histogram_quantile
from lab.bench.ingest import _drop_database, _fresh_database, _postgres
from lab.bench.replay import alerts_process, ingest_process, notify_process, stored
from lab.processes import ServiceProcess
from lab.sim.fleet import Fault, Fleet
from lab.sim.publisher import publish_all
from services.domain.webhook_urls import new_secret
from services.notify.routing import message_id
from services.settings import parse_mqtt_url

GOAL_P99_S = 2.0
_INTERVAL = timedelta(minutes=15)
_EVENTS = ["alert.opened", "alert.escalated", "alert.eased", "alert.resolved"]
_SETUP = """
WITH clinic AS (
    INSERT INTO clinics (name, timezone) VALUES ('Bench clinic', 'Europe/Berlin') RETURNING id
), patients AS (
    INSERT INTO patients (clinic_id, mrn, display_name)
    SELECT clinic.id, 'BENCH-' || s.serial, 'Bench Patient ' || s.n
    FROM clinic, unnest($1::text[]) WITH ORDINALITY AS s(serial, n)
    RETURNING id, mrn
), pumps AS (
    INSERT INTO pumps (serial, model, patient_id)
    SELECT substr(p.mrn, 7), 'SynchroMed II 8637-40', p.id FROM patients p
)
INSERT INTO webhooks (clinic_id, url, events, secret, created_by)
SELECT clinic.id, $2, $3, $4, 'bench' FROM clinic
RETURNING id
"""
_NEW_OUTBOX = "SELECT id FROM outbox WHERE id > $1 ORDER BY id"
_WATCH_INTERVAL_S = 0.01
_WEBHOOK_DELIVERIES = """
SELECT count(*) FILTER (WHERE status = 'delivered') AS delivered,
       count(*) FILTER (WHERE status = 'pending') AS pending,
       count(*) FILTER (WHERE status IN ('failed', 'cancelled')) AS failed,
       (SELECT count(*) FROM outbox WHERE dispatched_at IS NULL) AS backlog
FROM deliveries WHERE channel = 'webhook'
"""


@dataclass(frozen=True)
class WebhookBenchOptions:
    messages: int = 100_000
    pumps: int = 1000
    seed: int = 7
    stall_share: float = 0.3
    notify_process: bool = True
    """Deliver from a ``pumpwatch notify`` process (alerts with notify disabled); False: on
    the alert service's notification thread."""

    def mode(self) -> str:
        if self.notify_process:
            return "`pumpwatch notify` process"
        return "thread in `pumpwatch alerts`"


@dataclass
class _Request:
    at: float
    headers: dict[str, str]
    body: bytes


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    """The listen backlog (socketserver's default is 5): the worker opens up to
    ``PUMPWATCH_NOTIFY_CONCURRENCY`` connections at once, and a connection refused by a full
    backlog is retried by the client's TCP after 1 s (measured: the slowest webhooks)."""


class _Receiver:
    """Records every POST with the time it was read; answers 204 at once."""

    def __init__(self) -> None:
        self.requests: list[_Request] = []
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a real receiver would

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                at = time.time()
                with outer._lock:
                    outer.requests.append(
                        _Request(at, {k.lower(): v for k, v in self.headers.items()}, body)
                    )
                self.send_response(204)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet."""

        self.server = _Server(("127.0.0.1", embedded.free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/pumpwatch"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def count(self) -> int:
        with self._lock:
            return len(self.requests)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class WebhookFigures:
    messages: int = 0
    ingest_rate: float = 0.0
    alert_changes: int = 0
    received: int = 0
    unique: int = 0
    invalid_signatures: int = 0
    failed: int = 0
    latencies_s: list[float] = field(default_factory=list)
    """Commit (outbox row visible) → received, one per webhook-id."""
    from_change_s: list[float] = field(default_factory=list)
    """The alert's ``updated_at`` → received."""
    unmatched: int = 0
    """Webhooks whose outbox row the watcher did not see (none expected)."""
    service_p50_s: float | None = None
    service_p99_s: float | None = None
    wall_s: float = 0.0

    def quantile(self, q: float, values: list[float] | None = None) -> float | None:
        found = self.latencies_s if values is None else values
        if not found:
            return None
        if len(found) == 1:
            return found[0]
        return statistics.quantiles(found, n=1000, method="inclusive")[
            max(0, min(998, round(q * 1000) - 1))
        ]


class _OutboxWatch:
    """Notes when each outbox row becomes visible (its transaction committed)."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self.seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.run(self._watch())

    async def _watch(self) -> None:
        conn = await asyncpg.connect(self.database_url)
        try:
            last = 0
            while not self._stop.is_set():
                rows = await conn.fetch(_NEW_OUTBOX, last)
                at = time.time()
                for row in rows:
                    self.seen[row["id"]] = at
                    last = row["id"]
                await asyncio.sleep(_WATCH_INTERVAL_S)
        finally:
            await conn.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


class _Probe:
    """The measuring end — the webhook receiver and the outbox watch — in a process of its own
    (:func:`probe_main`), driven by JSON lines over its stdin and stdout. In the bench's process
    they would wait for the interpreter lock behind the publisher's thread: measured there, a
    POST to the receiver took 113 ms (median) to 1.07 s (p99) from the worker's side, and the
    worker's deliveries queued behind them."""

    def __init__(self) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-c", "from lab.bench.webhooks import probe_main; probe_main()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.url: str = self._ask("url")

    def _ask(self, command: str, argument: object = None) -> Any:
        stdin, stdout = self._process.stdin, self._process.stdout
        assert stdin is not None
        assert stdout is not None
        stdin.write(json.dumps([command, argument]) + "\n")
        stdin.flush()
        answer = stdout.readline()
        if not answer:
            raise RuntimeError(f"the bench's probe process ended (asked {command!r})")
        return json.loads(answer)

    def watch(self, database_url: str) -> None:
        """Start noting when outbox rows become visible."""
        self._ask("watch", database_url)

    def count(self) -> int:
        """Requests received so far."""
        return int(self._ask("count"))

    def results(self) -> tuple[list[_Request], dict[int, float]]:
        """Stop; every request received, and when each outbox row was first seen."""
        requests, seen = self._ask("results")
        return (
            [_Request(at, headers, base64.b64decode(body)) for at, headers, body in requests],
            {int(outbox_id): at for outbox_id, at in seen.items()},
        )

    def stop(self) -> None:
        if self._process.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                assert self._process.stdin is not None
                self._process.stdin.close()  # end of input: the probe exits
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(10)
        if self._process.stdout is not None:
            self._process.stdout.close()


def probe_main() -> None:
    """The probe process: answers the bench's commands (one JSON line each) until its input
    ends."""
    receiver = _Receiver()
    watch: _OutboxWatch | None = None
    try:
        for line in sys.stdin:
            command, argument = json.loads(line)
            answer: object = None
            if command == "url":
                answer = receiver.url
            elif command == "watch":
                watch = _OutboxWatch(str(argument))
            elif command == "count":
                answer = receiver.count()
            elif command == "results":
                if watch is not None:
                    watch.stop()
                receiver.stop()
                answer = [
                    [
                        [r.at, r.headers, base64.b64encode(r.body).decode()]
                        for r in receiver.requests
                    ],
                    {} if watch is None else watch.seen,
                ]
            print(json.dumps(answer), flush=True)
    finally:
        if watch is not None:
            watch.stop()


def run(options: WebhookBenchOptions, console: Console) -> WebhookFigures:
    with contextlib.ExitStack() as stack:
        scratch = Path(tempfile.mkdtemp(prefix="pumpwatch-bench-webhooks-"))
        stack.callback(shutil.rmtree, scratch, ignore_errors=True)
        broker = embedded.start_mosquitto(scratch / "mosquitto")
        stack.callback(broker.stop)
        admin_url = _postgres(scratch, stack)
        database_url = asyncio.run(_fresh_database(admin_url))
        stack.callback(lambda: asyncio.run(_drop_database(admin_url, database_url)))
        probe = _Probe()
        stack.callback(probe.stop)
        figures = _measure(options, broker.url, database_url, probe, scratch, console)
        console.print(summary(figures, options))
        return figures


def _measure(  # noqa: PLR0917 - one call site, each argument a different resource
    options: WebhookBenchOptions,
    broker_url: str,
    database_url: str,
    receiver: _Probe,
    scratch: Path,
    console: Console,
) -> WebhookFigures:
    figures = WebhookFigures(messages=options.messages)
    per_pump = -(-options.messages // options.pumps)
    fleet = Fleet(
        pumps=options.pumps,
        seed=options.seed,
        start=datetime.now(UTC) - _INTERVAL * (per_pump + 2),
        interval=_INTERVAL,
        fault_rates={Fault.MOTOR_STALL: options.stall_share},
    )
    stream = fleet.take(options.messages)
    valid = sum(m.valid for m in stream)
    secret = new_secret()
    webhook_id = asyncio.run(
        _setup(database_url, [p.serial for p in fleet.pumps], receiver.url, secret)
    )
    receiver.watch(database_url)
    console.print(
        f"{len(stream):,} messages from {options.pumps:,} pumps (15-minute readings, "
        f"{options.stall_share:.0%} with a stalling motor), published as fast as the broker "
        f"takes them; one clinic, one webhook at {receiver.url}"
    )
    console.print(
        "notification worker: "
        + (
            "a separate `pumpwatch notify` process, `pumpwatch alerts` with "
            "PUMPWATCH_NOTIFY_ENABLED=false"
            if options.notify_process
            else "a thread in `pumpwatch alerts` (--in-process)"
        )
    )
    ingest, alerts, notifier = _services(options, database_url, broker_url, scratch)
    services = [ingest, alerts] + ([notifier] if notifier is not alerts else [])
    try:
        for service in services:
            service.start()
        started = time.time()
        with _progress(console) as show:
            publisher = threading.Thread(
                target=publish_all,
                args=(parse_mqtt_url(broker_url), stream),
                kwargs={"client_id": "bench-webhooks-publisher"},
                daemon=True,
            )
            publisher.start()
            deadline = time.monotonic() + 900
            while True:
                _check(services, deadline)
                count = stored(ingest.metrics())
                show("stored", count, valid, receiver.count())
                if count >= valid:
                    break
                time.sleep(0.2)
            publisher.join()
            last_commit = ingest.metrics().get(
                "pumpwatch_ingest_last_commit_timestamp_seconds", 0.0
            )
            figures.ingest_rate = valid / max(last_commit - started, 1e-9)
            while True:
                _check(services, deadline)
                state = asyncio.run(_fetchrow(database_url, _WEBHOOK_DELIVERIES))
                pending = alerts.metrics().get("pumpwatch_alerts_pending_pumps", 1.0)
                done = int(state["delivered"])
                show("delivered", done, done + int(state["pending"]), receiver.count())
                if pending == 0 and state["pending"] == 0 and state["backlog"] == 0:
                    figures.failed = int(state["failed"])
                    break
                time.sleep(0.2)
        figures.wall_s = time.time() - started
        figures.service_p50_s, figures.service_p99_s = _service_quantiles(notifier.metrics())
        figures.alert_changes = int(
            sum(
                v
                for k, v in alerts.metrics().items()
                if k.startswith("pumpwatch_alerts_changes_total{")
            )
        )
    finally:
        for service in reversed(services):
            service.stop()
    requests, seen = receiver.results()
    commits = {
        message_id("outbox", outbox_id, "webhook", receiver.url, webhook_id): at
        for outbox_id, at in seen.items()
    }
    _judge(figures, requests, secret, commits)
    return figures


def _services(
    options: WebhookBenchOptions, database_url: str, broker_url: str, scratch: Path
) -> tuple[ServiceProcess, ServiceProcess, ServiceProcess]:
    """Ingest, alerts, and the process that delivers (a ``pumpwatch notify``, or alerts)."""
    ingest = ingest_process(database_url, broker_url, scratch / "ingest.log")
    allow = {"PUMPWATCH_WEBHOOK_ALLOW_HOSTS": "127.0.0.1"}
    if not options.notify_process:
        alerts = alerts_process(database_url, broker_url, scratch / "alerts.log", **allow)
        return ingest, alerts, alerts
    alerts = alerts_process(
        database_url, broker_url, scratch / "alerts.log", PUMPWATCH_NOTIFY_ENABLED="false"
    )
    notifier = notify_process(database_url, broker_url, scratch / "notify.log", **allow)
    return ingest, alerts, notifier


def _check(services: list[ServiceProcess], deadline: float) -> None:
    for service in services:
        service.check()
    if time.monotonic() > deadline:
        raise RuntimeError("the run did not finish within 15 minutes")


def _judge(
    figures: WebhookFigures, requests: list[_Request], secret: str, commits: dict[str, float]
) -> None:
    verifier = Webhook(secret)
    seen: set[str] = set()
    for request in requests:
        figures.received += 1
        try:
            body = verifier.verify(request.body, request.headers)
        except WebhookVerificationError:
            figures.invalid_signatures += 1
            continue
        key = request.headers["webhook-id"]
        if key in seen:
            continue
        seen.add(key)
        changed = datetime.fromisoformat(body["data"]["updated_at"]).timestamp()
        figures.from_change_s.append(request.at - changed)
        committed = commits.get(key)
        if committed is None:
            figures.unmatched += 1
        else:
            figures.latencies_s.append(request.at - committed)
    figures.unique = len(seen)
    figures.latencies_s.sort()
    figures.from_change_s.sort()


async def _setup(url: str, serials: list[str], webhook_url: str, secret: str) -> str:
    """The clinic, its patients and pumps, and its webhook; returns the webhook's id."""
    conn = await asyncpg.connect(url)
    try:
        return str(await conn.fetchval(_SETUP, serials, webhook_url, _EVENTS, secret))
    finally:
        await conn.close()


async def _fetchrow(url: str, query: str) -> asyncpg.Record:
    conn = await asyncpg.connect(url)
    try:
        row = await conn.fetchrow(query)
        assert row is not None
        return row
    finally:
        await conn.close()


def _service_quantiles(metrics: dict[str, float]) -> tuple[float | None, float | None]:
    """The alert service's own outbox → delivered histogram for webhooks."""
    prefix = 'pumpwatch_alerts_notify_latency_seconds_bucket{channel="webhook",le="'
    buckets = sorted(
        (float("inf") if (b := k[len(prefix) :].split('"')[0]) == "+Inf" else float(b), v)
        for k, v in metrics.items()
        if k.startswith(prefix)
    )
    return histogram_quantile(0.5, buckets), histogram_quantile(0.99, buckets)


@contextlib.contextmanager
def _progress(console: Console) -> Iterator[Callable[[str, int, int, int], None]]:
    columns = (
        TextColumn("{task.fields[phase]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("webhooks received {task.fields[received]:,}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("bench", total=None, phase="", received=0)

        def show(phase: str, done: int, total: int, received: int) -> None:
            progress.update(task, phase=phase, completed=done, total=total, received=received)

        yield show


def summary(figures: WebhookFigures, options: WebhookBenchOptions) -> Table:
    table = Table(
        title=f"pumpwatch bench webhooks — alert commit → webhook received, {options.pumps:,} "
        f"pumps, seed {options.seed}",
        show_header=False,
        title_justify="left",
    )
    table.add_column(style="bold")
    table.add_column(justify="right")
    p99 = figures.quantile(0.99)
    table.add_row("notification worker", options.mode())
    table.add_row("messages published", f"{figures.messages:,}")
    table.add_row("ingest stored msg/s", f"{figures.ingest_rate:,.0f}")
    table.add_row("alert changes", f"{figures.alert_changes:,}")
    table.add_row(
        "webhooks received (unique / duplicates)",
        f"{figures.unique:,} / {figures.received - figures.unique - figures.invalid_signatures:,}",
    )
    table.add_row("signatures failing verification", f"{figures.invalid_signatures:,}")
    table.add_row("deliveries failed or cancelled", f"{figures.failed:,}")
    for label, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
        table.add_row(f"commit → received {label}", _seconds(figures.quantile(q)))
    table.add_row(
        "commit → received max",
        _seconds(figures.latencies_s[-1] if figures.latencies_s else None),
    )
    table.add_row(f"over {GOAL_P99_S:g} s", f"{sum(x > GOAL_P99_S for x in figures.latencies_s):,}")
    table.add_row("webhooks without a commit time seen", f"{figures.unmatched:,}")
    change = figures.from_change_s
    table.add_row(
        "alert updated_at (batch start) → received p50 / p99",
        f"{_seconds(figures.quantile(0.5, change))} / {_seconds(figures.quantile(0.99, change))}",
    )
    table.add_row(
        "service's histogram p50 / p99 (outbox → delivered)",
        f"{_seconds(figures.service_p50_s)} / {_seconds(figures.service_p99_s)}",
    )
    table.add_row(
        f"goal p99 < {GOAL_P99_S:g} s",
        "-" if p99 is None else ("met" if p99 < GOAL_P99_S else "NOT met"),
    )
    table.add_row("wall time", f"{figures.wall_s:,.0f} s")
    return table


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"
