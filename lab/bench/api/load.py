"""The load of ``pumpwatch bench api``: the routes it drives, and the clients that drive them
(closed loop, or paced Poisson streams), in a process of its own (:func:`load_main`)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx
import psutil
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from lab.bench.api.fleet import World
from lab.bench.ingest import _backend_cpu
from lab.processes import ServiceProcess


@dataclass(frozen=True)
class Route:
    name: str
    key: str
    """Which key: ``clinician`` (a clinic of each client's own) or ``admin``."""
    label: str

    def paths(self, world: World, clinic: int) -> tuple[str, ...]:
        if self.key == "dashboard":
            return tuple(f"/v1/patients/{p}/dashboard" for p in world.patients[clinic])
        if self.key == "worklist":
            return ("/v1/refills/due",)
        if self.key == "telemetry":
            return tuple(f"/v1/pumps/{s}/telemetry?limit=100" for s in world.serials[clinic])
        if self.key == "hourly":
            since = (datetime.now(UTC) - timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
            return tuple(
                f"/v1/pumps/{s}/telemetry?bucket=1h&since={since}&limit=500"
                for s in world.serials[clinic]
            )
        raise ValueError(self.key)


DASHBOARD = Route("dashboard", "dashboard", "GET /v1/patients/{id}/dashboard")
ROUTES = (
    DASHBOARD,
    Route("worklist (clinic)", "worklist", "GET /v1/refills/due"),
    Route("telemetry", "telemetry", "GET /v1/pumps/{serial}/telemetry?limit=100"),
    Route(
        "telemetry 1h",
        "hourly",
        "GET /v1/pumps/{serial}/telemetry?bucket=1h&since=<30 d ago>&limit=500",
    ),
)
ADMIN_WORKLIST = Route("worklist (all, admin)", "worklist", "GET /v1/refills/due (admin key)")


@dataclass(frozen=True)
class LoadSpec:
    base_url: str
    clients: tuple[tuple[str, tuple[str, ...]], ...]
    """Per client: its key and the paths it picks from at random."""
    seconds: float
    warmup_s: float
    seed: int
    api_pid: int
    database_url: str
    route_template: str
    """The route's template in the API's /metrics (server-side latency)."""
    interval_s: float = 0.0
    """Paced: the mean time between a client's requests (exponential, so all clients together
    are a Poisson stream), latency counted from when a request was due, so a late answer
    delays the next request without hiding its wait. 0: closed loop (no think time)."""


@dataclass
class LoadResult:
    latencies_ms: list[float]
    statuses: dict[int, int]
    failures: dict[str, int]
    error_sample: str | None
    elapsed_s: float
    server_sum_s: float
    server_count: float
    cpu_s: dict[str, float]


def drive(spec: LoadSpec) -> LoadResult:
    return asyncio.run(_drive(spec))


def load_main() -> None:
    """The load process: a :class:`LoadSpec` as JSON on stdin, its :class:`LoadResult` as JSON
    on stdout."""
    raw = json.load(sys.stdin)
    raw["clients"] = tuple((key, tuple(paths)) for key, paths in raw["clients"])
    found = drive(LoadSpec(**raw))
    json.dump(dataclasses.asdict(found), sys.stdout)


def run_load_with_progress(
    spec: LoadSpec, description: str, total_s: float, console: Console, api: ServiceProcess
) -> LoadResult:
    """:func:`_run_load` with a (transient) progress bar of its ``total_s`` seconds; raises if
    the API it loaded exited meanwhile."""
    columns = (TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(description, total=total_s)
        started = time.perf_counter()
        found = _run_load(
            spec,
            lambda: progress.update(task, completed=min(total_s, time.perf_counter() - started)),
        )
    if not api.alive:
        raise RuntimeError(f"the API exited during {description}: {api.log()}")
    return found


def _run_load(spec: LoadSpec, tick: Callable[[], None]) -> LoadResult:
    """:func:`load_main` in a process of its own (the load generator must not share the
    measuring process, or the API's event loop); ``tick`` is called while it runs."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from lab.bench.api.load import load_main; load_main()"],
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=err,
        )
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(dataclasses.asdict(spec)).encode())
        proc.stdin.close()
        while proc.poll() is None:
            tick()
            time.sleep(0.2)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            detail = err.read().decode(errors="replace")[-3000:]
            raise RuntimeError(f"the load generator exited with {proc.returncode}: {detail}")
        raw = json.loads(out.read())
    raw["statuses"] = {int(k): v for k, v in raw["statuses"].items()}
    return LoadResult(**raw)


async def _drive(spec: LoadSpec) -> LoadResult:
    clients = [
        httpx.AsyncClient(
            base_url=spec.base_url,
            headers={"Authorization": f"Bearer {key}"},
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
            timeout=httpx.Timeout(60.0),
        )
        for key, _ in spec.clients
    ]
    result = LoadResult([], {}, {}, None, 0.0, 0.0, 0.0, {})
    try:
        if spec.warmup_s > 0:
            await _round(spec, clients, spec.warmup_s, None)
        async with httpx.AsyncClient(base_url=spec.base_url, timeout=30.0) as plain:
            before = _route_seconds(await plain.get("/metrics"), spec.route_template)
            cpu_before = _cpu_now(spec)
            started = time.perf_counter()
            ended = await _round(spec, clients, spec.seconds, result)
            # Paced: the schedule's window (answers due late in it may end after it).
            result.elapsed_s = max(ended - started, spec.seconds if spec.interval_s else 0.0)
            cpu_after = _cpu_now(spec)
            after = _route_seconds(await plain.get("/metrics"), spec.route_template)
        result.server_sum_s = after[0] - before[0]
        result.server_count = after[1] - before[1]
        result.cpu_s = {k: cpu_after[k] - cpu_before[k] for k in cpu_before}
        busy = result.cpu_s.pop("busy")
        ours = sum(result.cpu_s.values())
        result.cpu_s["other"] = max(0.0, busy - ours)
        result.cpu_s["machine"] = result.elapsed_s * (psutil.cpu_count() or 1)
    finally:
        for client in clients:
            await client.aclose()
    result.latencies_ms.sort()
    return result


async def _round(
    spec: LoadSpec, clients: list[httpx.AsyncClient], seconds: float, into: LoadResult | None
) -> float:
    """Every client requests until ``seconds`` have passed; returns when the last answered."""
    deadline = time.perf_counter() + seconds
    ends: list[float] = []

    async def one(index: int, client: httpx.AsyncClient, paths: tuple[str, ...]) -> None:
        rng = random.Random(spec.seed * 1000 + index)
        # A Poisson stream: exponential gaps from the start too.
        due = time.perf_counter() + (rng.expovariate(1 / spec.interval_s) if spec.interval_s else 0)
        while True:
            if spec.interval_s > 0:
                if due >= deadline:
                    break
                wait = due - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
                sent = due
                due += rng.expovariate(1 / spec.interval_s)
            else:
                if time.perf_counter() >= deadline:
                    break
                sent = time.perf_counter()
            path = rng.choice(paths)
            try:
                response = await client.get(path)
            except httpx.HTTPError as exc:
                if into is not None:
                    name = type(exc).__name__
                    into.failures[name] = into.failures.get(name, 0) + 1
                    into.error_sample = into.error_sample or f"{name}: {exc} ({path})"
                continue
            answered = time.perf_counter()
            if into is None:
                continue
            into.latencies_ms.append((answered - sent) * 1000)
            code = response.status_code
            into.statuses[code] = into.statuses.get(code, 0) + 1
            if not 200 <= code < 300 and into.error_sample is None:
                into.error_sample = f"{code} {path}: {response.text[:300]}"
        ends.append(time.perf_counter())

    await asyncio.gather(
        *(one(i, c, spec.clients[i][1]) for i, c in enumerate(clients)),
    )
    return max(ends)


_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:]+)\{(?P<labels>.*)\} (?P<value>\S+)$")


def _route_seconds(response: httpx.Response, template: str) -> tuple[float, float]:
    """(sum, count) of the API's request-latency histogram for ``template``, GET."""
    total = count = 0.0
    for line in response.text.splitlines():
        match = _SAMPLE.match(line)
        if match is None:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"]))
        if labels.get("route") != template or labels.get("method") != "GET":
            continue
        if match["name"] == "pumpwatch_api_request_seconds_sum":
            total += float(match["value"])
        elif match["name"] == "pumpwatch_api_request_seconds_count":
            count += float(match["value"])
    return total, count


def _cpu_now(spec: LoadSpec) -> dict[str, float]:
    own = resource.getrusage(resource.RUSAGE_SELF)
    api = psutil.Process(spec.api_pid).cpu_times()
    machine = psutil.cpu_times()
    idle = machine.idle + getattr(machine, "iowait", 0.0)
    guests = getattr(machine, "guest", 0.0) + getattr(machine, "guest_nice", 0.0)
    busy = sum(machine) - idle - guests
    return {
        "api": api.user + api.system,
        "postgres": _backend_cpu(spec.database_url),
        "load": own.ru_utime + own.ru_stime,
        "busy": busy,
    }
