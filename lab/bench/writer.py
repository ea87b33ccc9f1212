"""``pumpwatch bench writer``: ingest's batch writer alone, CPU per message.

The stream of ``bench ingest`` (the same fleet, seed and timestamps) is judged and stored batch
by batch by ingest's own ``BatchWriter`` in this process, on one connection to a scratch
database, with no broker and no publisher sharing the cores. Printed: CPU microseconds per
message of judging (decode, contract checks, rows), of storing (COPY, the batch statements,
sequence bookkeeping, commit) and of the PostgreSQL backend serving the connection: the writer
and its SQL only, without the publisher's, the broker's and the MQTT client's share. The first
fifth of the batches warms up and is not counted. The machine's own speed still moves from one
run to the next: compare code by alternating runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import psutil
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lab.bench.ingest import _cpu, _drop_database, _fresh_database, _postgres, bench_stream
from services.ingest.backlog import Incoming
from services.ingest.metrics import IngestMetrics
from services.ingest.service import tune_collector
from services.ingest.writer import BatchWriter, WriterConfig, prepare_connection

BATCH = 500
"""Messages per batch: ingest's batch size under load (``bench ingest``'s mean is 499-500)."""
STORED = "SELECT (SELECT count(*) FROM readings) + (SELECT count(*) FROM events)"
"""Readings and events in a database at the end of a run."""


def progress(console: Console) -> Progress:
    """A bar of batches, gone when done."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    return Progress(*columns, TimeElapsedColumn(), console=console, transient=True)


def incoming(messages: int, pumps: int, seed: int) -> list[Incoming]:
    """``bench ingest``'s stream as ingest receives it."""
    now = time.time()
    stream = bench_stream(messages, pumps, seed)
    return [Incoming(i + 1, 1, m.topic, m.payload, now, 0) for i, m in enumerate(stream)]


def batches(received: list[Incoming]) -> tuple[list[list[Incoming]], int]:
    """The stream in batches of ``BATCH``, and how many of them warm up (a fifth, not counted)."""
    split = [received[i : i + BATCH] for i in range(0, len(received), BATCH)]
    return split, len(split) // 5


@dataclass(frozen=True)
class WriterBenchOptions:
    messages: int
    pumps: int
    seed: int


@dataclass
class WriterResult:
    counted: int
    """Messages in the counted batches (after the warm-up)."""
    judge_s: float
    store_s: float
    postgres_s: float
    stored: int
    """Readings and events in the database at the end (all batches)."""

    def per_message_us(self, seconds: float) -> float:
        return 1e6 * seconds / max(self.counted, 1)


def run(options: WriterBenchOptions, console: Console) -> WriterResult:
    with contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pw-bench-")))
        admin_url = _postgres(scratch, stack)
        url = asyncio.run(_fresh_database(admin_url))
        stack.callback(lambda: asyncio.run(_drop_database(admin_url, url)))
        received = incoming(options.messages, options.pumps, options.seed)
        result = asyncio.run(_measure(url, received, console))
    console.print(_table(options, result))
    return result


async def _measure(url: str, received: list[Incoming], console: Console) -> WriterResult:
    tune_collector()  # as the `pumpwatch ingest` process does
    pool = await asyncpg.create_pool(url, min_size=1, max_size=1, init=prepare_connection)
    try:
        backend = psutil.Process(await pool.fetchval("SELECT pg_backend_pid()"))
        writer = BatchWriter(pool, WriterConfig(), IngestMetrics())
        split, warm = batches(received)
        counted = 0
        judge_s = store_s = postgres_s = 0.0
        with progress(console) as bar:
            task = bar.add_task("batches judged and stored", total=len(split))
            for index, batch in enumerate(split):
                pg_before = _cpu(backend)
                started = time.process_time()
                prepared = await writer.prepare(batch)
                judged = time.process_time()
                await writer.store(prepared)
                stored = time.process_time()
                if index >= warm:
                    counted += len(batch)
                    judge_s += judged - started
                    store_s += stored - judged
                    postgres_s += _cpu(backend) - pg_before
                bar.advance(task)
        total = await pool.fetchval(STORED)
    finally:
        await pool.close()
    return WriterResult(counted, judge_s, store_s, postgres_s, int(total))


def _table(options: WriterBenchOptions, result: WriterResult) -> Table:
    table = Table(
        title=f"pumpwatch bench writer — {options.messages:,} messages, {options.pumps:,} pumps, "
        f"seed {options.seed}, batches of {BATCH}"
    )
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("messages stored (readings + events)", f"{result.stored:,}")
    table.add_row("messages counted (after the warm-up)", f"{result.counted:,}")
    judge, store = result.per_message_us(result.judge_s), result.per_message_us(result.store_s)
    table.add_row("CPU µs/msg: judging", f"{judge:.1f}")
    table.add_row("CPU µs/msg: storing", f"{store:.1f}")
    table.add_row("CPU µs/msg: writer (judging + storing)", f"{judge + store:.1f}")
    table.add_row("CPU µs/msg: PostgreSQL", f"{result.per_message_us(result.postgres_s):.1f}")
    return table


__all__ = [
    "BATCH",
    "STORED",
    "WriterBenchOptions",
    "WriterResult",
    "batches",
    "incoming",
    "progress",
    "run",
]
