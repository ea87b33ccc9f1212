"""``pumpwatch bench writer --variant``: ingest's statements against edited copies, interleaved.

Single runs of ``bench writer`` scatter by up to a third as the machine's speed moves, which
hides a change of a few per cent. Here the same stream is stored by the current statements
(``services/ingest/sql.py``) and by each variant (a copy of that module, edited), each on a
scratch database of its own: every batch is stored by each in turn, the order rotating (each
takes every place in turn), so whatever the machine does falls on all of them alike. Printed:
the PostgreSQL backend's CPU microseconds per message of each, and its ratio to the current
statements'. A variant may come with an SQL file run on its database after the migrations (a
schema it needs). Two contenders agree within about 1.5 % (A/A runs); more, within about 5 %.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import asyncpg
import psutil
from rich.console import Console
from rich.table import Table

from lab.bench.ingest import _cpu, _drop_database, _fresh_database, _postgres
from lab.bench.writer import BATCH, STORED, batches, incoming, progress
from services.ingest import sql as current_statements
from services.ingest import writer as writer_module
from services.ingest.backlog import Incoming
from services.ingest.metrics import IngestMetrics
from services.ingest.service import tune_collector
from services.ingest.writer import BatchWriter, WriterConfig, prepare_connection

_VARIANT = re.compile(r"^(?P<label>[\w.-]+)=(?P<statements>[^,]+)(?:,(?P<setup>.+))?$")


@dataclass(frozen=True)
class Variant:
    label: str
    statements: Path
    """A copy of services/ingest/sql.py, edited."""
    setup: Path | None = None
    """SQL run on the variant's database after the migrations."""

    @classmethod
    def parse(cls, text: str) -> Variant:
        """``LABEL=STATEMENTS.py`` or ``LABEL=STATEMENTS.py,SETUP.sql``."""
        match = _VARIANT.match(text)
        if match is None:
            raise ValueError(f"{text!r}: expected LABEL=STATEMENTS.py[,SETUP.sql]")
        setup = match["setup"]
        variant = cls(match["label"], Path(match["statements"]), Path(setup) if setup else None)
        for path in (variant.statements, variant.setup):
            if path is not None and not path.is_file():
                raise ValueError(f"{text!r}: no file {path}")
        return variant


@dataclass
class _Contender:
    label: str
    statements: ModuleType
    writer: BatchWriter
    backend: psutil.Process
    postgres_s: float = 0.0
    stored: int = 0


@dataclass(frozen=True)
class CompareResult:
    counted: int
    """Messages in the counted batches (after the warm-up), stored by each contender."""
    postgres_us: dict[str, float]
    """PostgreSQL CPU µs per message, by label (``current`` first)."""
    stored: dict[str, int]


def run(
    messages: int, pumps: int, seed: int, variants: list[Variant], console: Console
) -> CompareResult:
    with contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pw-bench-")))
        admin_url = _postgres(scratch, stack)
        urls = []
        for _ in range(len(variants) + 1):
            url = asyncio.run(_fresh_database(admin_url))
            stack.callback(_drop, admin_url, url)
            urls.append(url)
        received = incoming(messages, pumps, seed)
        result = asyncio.run(_measure(urls, received, variants, console))
    console.print(_table(messages, pumps, seed, result))
    return result


def _drop(admin_url: str, url: str) -> None:
    asyncio.run(_drop_database(admin_url, url))


def _load(variant: Variant) -> ModuleType:
    name = f"bench_variant_{variant.label}"
    spec = importlib.util.spec_from_file_location(name, variant.statements)
    if spec is None or spec.loader is None:
        raise ValueError(f"{variant.statements}: not a Python module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _statements(module: ModuleType) -> Iterator[None]:
    """The batch writer runs ``module``'s statements while inside (it reads them from its
    module's ``sql`` name at each use)."""
    names = vars(writer_module)
    saved = names["sql"]
    names["sql"] = module
    try:
        yield
    finally:
        names["sql"] = saved


async def _measure(
    urls: list[str], received: list[Incoming], variants: list[Variant], console: Console
) -> CompareResult:
    tune_collector()
    modules = [current_statements, *(_load(v) for v in variants)]
    labels = ["current", *(v.label for v in variants)]
    setups = [None, *(v.setup for v in variants)]
    pools: list[asyncpg.Pool] = []
    contenders: list[_Contender] = []
    try:
        for url, label, module, setup in zip(urls, labels, modules, setups, strict=True):
            if setup is not None:
                conn = await asyncpg.connect(url)
                try:
                    await conn.execute(setup.read_text("utf-8"))
                finally:
                    await conn.close()
            with _statements(module):
                pool = await asyncpg.create_pool(
                    url, min_size=1, max_size=1, init=prepare_connection
                )
            pools.append(pool)
            backend = psutil.Process(await pool.fetchval("SELECT pg_backend_pid()"))
            writer = BatchWriter(pool, WriterConfig(), IngestMetrics())
            contenders.append(_Contender(label, module, writer, backend))
        split, warm = batches(received)
        counted = sum(len(b) for b in split[warm:])
        with progress(console) as bar:
            task = bar.add_task(f"batches stored by each of {len(contenders)}", total=len(split))
            for index, batch in enumerate(split):
                first = index % len(contenders)
                for contender in contenders[first:] + contenders[:first]:
                    with _statements(contender.statements):
                        prepared = await contender.writer.prepare(batch)
                        before = _cpu(contender.backend)
                        await contender.writer.store(prepared)
                        if index >= warm:
                            contender.postgres_s += _cpu(contender.backend) - before
                bar.advance(task)
        for contender, pool in zip(contenders, pools, strict=True):
            contender.stored = await pool.fetchval(STORED)
    finally:
        for pool in pools:
            await pool.close()
    return CompareResult(
        counted,
        {c.label: 1e6 * c.postgres_s / max(counted, 1) for c in contenders},
        {c.label: c.stored for c in contenders},
    )


def _table(messages: int, pumps: int, seed: int, result: CompareResult) -> Table:
    table = Table(
        title=f"pumpwatch bench writer — {messages:,} messages, {pumps:,} pumps, seed {seed}, "
        f"batches of {BATCH}, each stored by every contender in turn"
    )
    table.add_column("statements")
    table.add_column("stored", justify="right")
    table.add_column("CPU µs/msg: PostgreSQL", justify="right")
    table.add_column("ratio to current", justify="right")
    base = result.postgres_us["current"]
    for label, figure in result.postgres_us.items():
        ratio = figure / base if base > 0 else float("nan")
        table.add_row(label, f"{result.stored[label]:,}", f"{figure:.1f}", f"{ratio:.3f}")
    return table


__all__ = ["CompareResult", "Variant", "run"]
