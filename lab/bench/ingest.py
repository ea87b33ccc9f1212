"""``pumpwatch bench ingest``: sustained stored messages/s end to end, against the raw rate.

One run, one stream of N simulated QoS 1 messages, published twice:

1. to a bare subscriber (``mosquitto_sub``, C, acks at once, writes nothing): the raw rate at
   which the broker delivers this stream on this machine;
2. to ``pumpwatch ingest`` (the real command, a child process) storing into a fresh database.

Both rates are N / (last delivery or commit - first publish). Also printed: where the CPU time
went (ingest, PostgreSQL, broker, publisher), commit latency and batch sizes from /metrics.

The publisher is the simulator's paho client (``--publisher paho``, Python) or ``mosquitto_pub``
(``--publisher mosquitto_pub``, C): one ``mosquitto_pub -l`` process per topic, each given its
topic's messages in order, a few dozen at a time. The C client costs the machine less per
message, so the figure is less limited by the publisher sharing the cores with ingest.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import shutil
import subprocess
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import psutil
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lab import embedded
from lab.processes import metrics_service
from lab.sim.fleet import Fleet, Outgoing
from lab.sim.publisher import publish_all
from services.settings import CommonSettings, parse_mqtt_url
from services.storage import migrate


@dataclass
class Phase:
    name: str
    delivered: int = 0
    first_publish: float = 0.0
    published_at: float = 0.0
    last_delivery: float = 0.0
    cpu_s: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        span = self.last_delivery - self.first_publish
        return self.delivered / span if span > 0 else 0.0

    @property
    def publish_rate(self) -> float:
        span = self.published_at - self.first_publish
        return self.delivered / span if span > 0 else 0.0


Publisher = Literal["paho", "mosquitto_pub"]


@dataclass(frozen=True)
class BenchOptions:
    messages: int
    pumps: int
    seed: int
    publisher: Publisher = "paho"
    publisher_processes: int = 32
    """``mosquitto_pub`` processes publishing at once."""


def bench_stream(messages: int, pumps: int, seed: int) -> list[Outgoing]:
    """The stream the ingest benchmarks replay: ``pumps`` reporting every 15 minutes from 400
    days ago, interleaved (each batch holds one message of most pumps)."""
    fleet = Fleet(
        pumps=pumps,
        seed=seed,
        start=datetime.now(UTC) - timedelta(days=400),
        interval=timedelta(minutes=15),
    )
    return fleet.take(messages)


def run(options: BenchOptions, console: Console) -> None:
    with contextlib.ExitStack() as stack:
        scratch = Path(tempfile.mkdtemp(prefix="pumpwatch-bench-"))
        stack.callback(shutil.rmtree, scratch, ignore_errors=True)
        broker = embedded.start_mosquitto(scratch / "mosquitto")
        stack.callback(broker.stop)
        admin_url = _postgres(scratch, stack)
        database_url = asyncio.run(_fresh_database(admin_url))
        stack.callback(lambda: asyncio.run(_drop_database(admin_url, database_url)))

        started = time.perf_counter()
        stream = bench_stream(options.messages, options.pumps, options.seed)
        generated_s = time.perf_counter() - started
        size = sum(len(m.payload) for m in stream) / len(stream)
        console.print(
            f"{len(stream):,} messages from {options.pumps:,} pumps generated in "
            f"{generated_s:.1f} s (mean payload {size:.0f} bytes); broker {broker.url}"
        )
        broker_proc = psutil.Process(broker.pid)
        publish = _publisher(options)
        raw = _raw_phase(stream, broker.url, broker_proc, publish, console)
        stored = _ingest_phase(
            stream, broker.url, broker_proc, database_url, scratch, publish, console
        )
        console.print(_summary(options, size, raw, stored))


# -- servers -------------------------------------------------------------------------------


def _postgres(scratch: Path, stack: contextlib.ExitStack) -> str:
    """An admin URL: the configured server, the local one, else an embedded one."""
    configured = CommonSettings().database_url
    if configured:
        return configured
    if embedded.port_open("127.0.0.1", 5432):
        return "postgresql://postgres@127.0.0.1:5432/postgres"
    server = embedded.start_postgres(scratch / "postgres", database="postgres")
    stack.callback(server.stop)
    return server.url


async def _fresh_database(admin_url: str) -> str:
    name = f"pumpwatch_bench_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f"CREATE DATABASE {name} ENCODING 'UTF8' TEMPLATE template0")
    finally:
        await conn.close()
    url = urlunsplit(urlsplit(admin_url)._replace(path=f"/{name}"))
    conn = await asyncpg.connect(url)
    try:
        await migrate.apply(conn)
    finally:
        await conn.close()
    return url


async def _drop_database(admin_url: str, url: str) -> None:
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {urlsplit(url).path[1:]} WITH (FORCE)")
    finally:
        await conn.close()


def _backend_cpu(database_url: str) -> float:
    """CPU seconds of the PostgreSQL server processes serving this database."""
    name = urlsplit(database_url).path[1:]
    total = 0.0
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if cmdline.startswith("postgres:") and f" {name} " in f"{cmdline} ":
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                total += times.user + times.system
    return total


def _cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


# -- phases --------------------------------------------------------------------------------


def _raw_phase(
    stream: list[Outgoing],
    broker_url: str,
    broker: psutil.Process,
    publish: PublishFn,
    console: Console,
) -> Phase:
    """The same stream to ``mosquitto_sub``: the broker's raw delivery rate here."""
    phase = Phase("bare subscriber (mosquitto_sub)")
    port = parse_mqtt_url(broker_url).port
    binary = shutil.which("mosquitto_sub")
    if binary is None:
        raise FileNotFoundError("mosquitto_sub is not installed (Debian: mosquitto-clients)")
    sub = subprocess.Popen(
        [
            binary,
            "-p",
            str(port),
            "-V",
            "5",
            "-q",
            "1",
            "-t",
            "pumps/+/+",
            "-C",
            str(len(stream)),
            "-F",
            "%U",
        ],
        stdout=subprocess.PIPE,
    )
    time.sleep(0.5)  # let it subscribe before the first message
    broker_cpu = _cpu(broker)
    publisher_cpu = _publisher_cpu()
    phase.first_publish = time.time()
    phase.published_at = publish(broker_url, stream, "bench-raw-publisher")
    publisher_used = _publisher_cpu() - publisher_cpu
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    out, _ = sub.communicate(timeout=600)
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    stamps = out.split()
    phase.delivered = len(stamps)
    phase.last_delivery = float(stamps[-1])
    phase.cpu_s = {
        "publisher": publisher_used,
        "broker": _cpu(broker) - broker_cpu,
        "subscriber": (reaped.ru_utime + reaped.ru_stime) - (children.ru_utime + children.ru_stime),
    }
    console.print(f"raw: {phase.delivered:,} delivered at {phase.rate:,.0f} msg/s")
    return phase


def _ingest_phase(  # noqa: PLR0917 - one call site, each argument a different resource
    stream: list[Outgoing],
    broker_url: str,
    broker: psutil.Process,
    database_url: str,
    scratch: Path,
    publish: PublishFn,
    console: Console,
) -> Phase:
    phase = Phase("pumpwatch ingest")
    settings = {
        "PUMPWATCH_DATABASE_URL": database_url,
        "PUMPWATCH_MQTT_URL": broker_url,
        "PUMPWATCH_MQTT_CLIENT_ID": "bench-ingest",
    }
    ingest = metrics_service("ingest", settings, scratch / "ingest.log")
    try:
        ingest.start()
        ingest_proc = psutil.Process(ingest.pid)
        cpu_before = {
            "ingest": _cpu(ingest_proc),
            "postgres": _backend_cpu(database_url),
            "broker": _cpu(broker),
            "publisher": _publisher_cpu(),
        }
        with _progress(console, len(stream)) as advance, ThreadPoolExecutor(1) as pool:
            phase.first_publish = time.time()
            publisher = pool.submit(publish, broker_url, stream, "bench-ingest-publisher")
            while True:
                samples = ingest.metrics()
                stored = samples.get(
                    'pumpwatch_ingest_messages_stored_total{kind="telemetry"}', 0.0
                ) + samples.get('pumpwatch_ingest_messages_stored_total{kind="events"}', 0.0)
                advance(int(stored))
                if stored >= len(stream):
                    phase.last_delivery = samples.get(
                        "pumpwatch_ingest_last_commit_timestamp_seconds", 0.0
                    )
                    break
                ingest.check()
                # Each scrape costs ingest a few ms of CPU (the histograms' text): at 10 a second
                # it was 7 % of the CPU this bench charges to ingest. The end time is the last
                # commit's timestamp, so polling once a second does not change the rate.
                time.sleep(1.0)
            phase.published_at = publisher.result()
        phase.delivered = int(stored)
        phase.cpu_s = {
            "ingest": _cpu(ingest_proc) - cpu_before["ingest"],
            "postgres": _backend_cpu(database_url) - cpu_before["postgres"],
            "broker": _cpu(broker) - cpu_before["broker"],
            "publisher": _publisher_cpu() - cpu_before["publisher"],
        }
        phase.cpu_s.update(_commit_figures(ingest.metrics()))
    finally:
        ingest.stop(60)
    console.print(f"ingest: {phase.delivered:,} stored at {phase.rate:,.0f} msg/s")
    return phase


PublishFn = Callable[[str, list[Outgoing], str], float]
"""Publish a stream (broker URL, messages, client id); returns when the last one was acked."""


def _publisher(options: BenchOptions) -> PublishFn:
    if options.publisher == "paho":
        return _publish_paho
    binary = shutil.which("mosquitto_pub")
    if binary is None:
        raise FileNotFoundError("mosquitto_pub is not installed (Debian: mosquitto-clients)")

    def publish(broker_url: str, stream: list[Outgoing], client_id: str) -> float:
        return _publish_mosquitto_pub(
            binary, broker_url, stream, client_id, options.publisher_processes
        )

    return publish


def _publisher_cpu() -> float:
    """CPU seconds of this process and of its children reaped so far (``mosquitto_pub``)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return _cpu(psutil.Process()) + children.ru_utime + children.ru_stime


def _publish_paho(broker_url: str, stream: list[Outgoing], client_id: str) -> float:
    """Publish the stream with the simulator's paho client; returns when the last PUBACK came."""
    publish_all(parse_mqtt_url(broker_url), stream, client_id=client_id)
    return time.time()


def _publish_mosquitto_pub(
    binary: str, broker_url: str, stream: list[Outgoing], client_id: str, processes: int
) -> float:
    """Publish the stream with ``mosquitto_pub -l`` (C), one process per topic, ``processes`` at
    a time; each topic's messages keep their order. Returns when the last process exited (it
    exits once its messages were acknowledged)."""
    target = parse_mqtt_url(broker_url)
    by_topic: dict[str, list[bytes]] = defaultdict(list)
    for message in stream:
        if b"\n" in message.payload:
            raise ValueError(f"a payload on {message.topic} spans lines; -l cannot send it")
        by_topic[message.topic].append(message.payload)

    def one(index: int, topic: str, payloads: list[bytes]) -> None:
        command = [binary, "-h", target.host, "-p", str(target.port), "-V", "5", "-q", "1"]
        command += ["-i", f"{client_id}-{index}", "-t", topic, "-l"]
        done = subprocess.run(
            command, input=b"\n".join(payloads) + b"\n", capture_output=True, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"mosquitto_pub on {topic} exited {done.returncode}: "
                f"{done.stderr.decode(errors='replace').strip()}"
            )

    with ThreadPoolExecutor(processes) as pool:
        futures = [
            pool.submit(one, i, topic, payloads)
            for i, (topic, payloads) in enumerate(by_topic.items())
        ]
        for future in futures:
            future.result()
    return time.time()


def _commit_figures(samples: dict[str, float]) -> dict[str, float]:
    count = samples.get("pumpwatch_ingest_commit_seconds_count", 0.0) or 1.0
    return {
        "commit_mean_ms": 1000 * samples.get("pumpwatch_ingest_commit_seconds_sum", 0.0) / count,
        "batch_mean": samples.get("pumpwatch_ingest_batch_size_messages_sum", 0.0) / count,
        "read_pauses": samples.get("pumpwatch_ingest_read_pauses_total", 0.0),
    }


@contextlib.contextmanager
def _progress(console: Console, total: int) -> Iterator[Callable[[int], None]]:
    columns = (TextColumn("stored"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("stored", total=total)

        def advance(done: int) -> None:
            progress.update(task, completed=done)

        yield advance


def _summary(options: BenchOptions, size: float, raw: Phase, stored: Phase) -> Table:
    table = Table(
        title=f"pumpwatch bench ingest — {options.messages:,} QoS 1 messages, "
        f"{options.pumps:,} pumps, seed {options.seed}, publisher {options.publisher}"
    )
    table.add_column("")
    table.add_column(raw.name, justify="right")
    table.add_column(stored.name, justify="right")
    table.add_row("delivered / stored", f"{raw.delivered:,}", f"{stored.delivered:,}")
    table.add_row("msg/s end to end", f"{raw.rate:,.0f}", f"{stored.rate:,.0f}")
    table.add_row("ratio", "1.00", f"{stored.rate / raw.rate:.2f}" if raw.rate else "-")
    table.add_row(
        "publisher msg/s (PUBACKed)", f"{raw.publish_rate:,.0f}", f"{stored.publish_rate:,.0f}"
    )
    for name in ("publisher", "broker", "subscriber", "ingest", "postgres"):
        left = raw.cpu_s.get(name)
        right = stored.cpu_s.get(name)
        if left is None and right is None:
            continue
        table.add_row(
            f"CPU µs/msg: {name}",
            "-" if left is None else f"{1e6 * left / max(raw.delivered, 1):.0f}",
            "-" if right is None else f"{1e6 * right / max(stored.delivered, 1):.0f}",
        )
    table.add_row(
        "commit mean (ms) / batch mean",
        "-",
        f"{stored.cpu_s['commit_mean_ms']:.1f} / {stored.cpu_s['batch_mean']:.0f}",
    )
    table.add_row("mean payload (bytes)", f"{size:.0f}", f"{size:.0f}")
    return table
