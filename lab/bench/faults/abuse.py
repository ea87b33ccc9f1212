"""Scenario 6: API abuse. The real `pumpwatch api` process on a scratch database, attacked from
this process on loopback, in bounded rounds:

1. 10 MB bodies (with Content-Length, and chunked without it) to JSON and form routes → 413;
2. absurd ``limit`` and cursor values → 4xx;
3. a flood from one valid key, and one from a wrong key (→ 401, then 429);
4. slow clients: connections sending their headers, or their body, a byte at a time.

Meanwhile a witness client (another clinic's key) reads patients every 50 ms: its latency is
reported per phase, and it must always be answered. Checked: no 5xx anywhere, the expected
4xx, the API's memory (RSS) bounded, the process alive throughout.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import psutil

from lab.bench.faults.common import Lab, Outcome, Size, percentile, seconds
from lab.processes import api_service

ADMIN_TOKEN = "faults-abuse-admin-token-93e5aa"  # noqa: S105 - a scratch API's bootstrap token
WITNESS_ADDRESS = "127.0.0.2"
SLOW_ADDRESS = "127.0.0.3"
"""The attacks come from 127.0.0.1; the witness and the slow clients from other loopback
addresses (the failed-authentication limit is per source address)."""
MIB = 1024 * 1024
RSS_GROWTH_LIMIT = 256 * MIB
"""The API's RSS after the attacks may exceed its RSS before by at most this."""


@dataclass(frozen=True)
class AbuseSize:
    big_bodies: int
    flood: int
    concurrency: int
    slow_clients: int
    slow_s: float


SIZES: dict[Size, AbuseSize] = {
    "reduced": AbuseSize(big_bodies=3, flood=800, concurrency=32, slow_clients=40, slow_s=3),
    "full": AbuseSize(big_bodies=20, flood=20_000, concurrency=64, slow_clients=200, slow_s=20),
}


@dataclass
class Tally:
    statuses: dict[str, Counter[int]] = field(default_factory=dict)
    failures: dict[str, Counter[str]] = field(default_factory=dict)
    """Per attack: requests that got no answer, by the client's exception."""

    def add(self, attack: str, status: int) -> None:
        self.statuses.setdefault(attack, Counter())[status] += 1

    def fail(self, attack: str, exc: BaseException) -> None:
        self.failures.setdefault(attack, Counter())[type(exc).__name__] += 1

    def of(self, attack: str) -> Counter[int]:
        return self.statuses.get(attack, Counter())


class Witness:
    """Another clinic's client, reading every 50 ms from a thread; latencies per phase."""

    def __init__(self, base: str, key: str) -> None:
        self.base = base
        self.key = key
        self.phase = "baseline"
        self.latencies: dict[str, list[float]] = {}
        self.failures: dict[str, list[str]] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="abuse-witness", daemon=True)

    def _run(self) -> None:
        # From an address of its own: the failed-authentication limit is per source address.
        with httpx.Client(
            base_url=self.base,
            headers={"Authorization": f"Bearer {self.key}"},
            timeout=30,
            transport=httpx.HTTPTransport(local_address=WITNESS_ADDRESS),
        ) as client:
            while not self.stop.wait(0.05):
                phase = self.phase
                started = time.perf_counter()
                try:
                    answer = client.get("/v1/patients?limit=20")
                    if answer.status_code != 200:
                        self.failures.setdefault(phase, []).append(str(answer.status_code))
                        continue
                except httpx.HTTPError as exc:
                    self.failures.setdefault(phase, []).append(type(exc).__name__)
                    continue
                self.latencies.setdefault(phase, []).append(time.perf_counter() - started)


def run(lab: Lab, size: Size, seed: int) -> Outcome:  # noqa: PLR0915 - one timeline, in order
    spec = SIZES[size]
    outcome = Outcome("abuse", "huge bodies and limits, floods and slow clients against the API")
    started = time.monotonic()
    database_url = lab.database()
    api = lab.service(
        api_service(
            {
                "PUMPWATCH_DATABASE_URL": database_url,
                "PUMPWATCH_ADMIN_TOKEN": ADMIN_TOKEN,
                "PUMPWATCH_LOG_LEVEL": "warning",
            },
            lab.path("abuse-api.log"),
        )
    )
    api.start()
    base = api.base_url
    keys = _setup(base)
    process = psutil.Process(api.pid)
    rss_before = process.memory_info().rss
    peak = [rss_before]
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(0.1):
            with contextlib.suppress(psutil.Error):
                peak[0] = max(peak[0], process.memory_info().rss)

    sampler = threading.Thread(target=sample, name="abuse-rss", daemon=True)
    sampler.start()
    witness = Witness(base, keys["witness"])
    witness.thread.start()
    tally = Tally()
    try:
        time.sleep(1.0)
        for phase, attacking in (
            ("big bodies", _big_bodies),
            ("huge limits", _huge_limits),
            ("flood", _flood),
            ("slow clients", _slow_clients),
        ):
            witness.phase = phase
            asyncio.run(attacking(base, keys, spec, tally))
        witness.phase = "after"
        time.sleep(1.0)
    finally:
        witness.stop.set()
        witness.thread.join(30)
        sampling.set()
        sampler.join(5)
    outcome.check(api.alive, "the API process died")
    rss_after = process.memory_info().rss if api.alive else 0
    outcome.check(api.terminate() == 0, "the API did not stop cleanly on SIGTERM")

    attempted = sum(sum(c.values()) for c in tally.statuses.values())
    outcome.attempted = attempted + sum(sum(c.values()) for c in tally.failures.values())
    outcome.acknowledged = attempted
    server_errors = {
        attack: n
        for attack, counts in tally.statuses.items()
        if (n := sum(v for s, v in counts.items() if s >= 500))
    }
    for attack, n in server_errors.items():
        outcome.problems.append(f"{attack}: {n} answers 5xx")
    for attack, counts in tally.statuses.items():
        outcome.figures[f"{attack} (status x count)"] = ", ".join(
            f"{s or 'closed'} x {n}" for s, n in sorted(counts.items())
        )
    for attack, errors in tally.failures.items():
        outcome.figures[f"{attack}: no answer"] = ", ".join(
            f"{name} x {n}" for name, n in errors.most_common()
        )
    _expect(outcome, tally, "10 MB body, Content-Length", {413})
    _expect(outcome, tally, "10 MB body, chunked", {413})
    _expect(outcome, tally, "10 MB form", {413})
    _expect(outcome, tally, "huge limit/cursor", {400, 422})
    _expect(outcome, tally, "flood, wrong key", {401, 429})
    outcome.check(tally.of("flood, wrong key").get(429, 0) > 0, "the wrong-key flood never got 429")
    _expect(outcome, tally, "flood, one key", {200})
    _expect(outcome, tally, "valid key, same address as the wrong-key flood", {200})
    _expect(outcome, tally, "slow headers", {200})
    _expect(outcome, tally, "slow body", {422})
    outcome.figures["API RSS before / peak / after"] = (
        f"{rss_before / MIB:.0f} / {peak[0] / MIB:.0f} / {rss_after / MIB:.0f} MiB"
    )
    outcome.check(
        rss_after - rss_before <= RSS_GROWTH_LIMIT,
        f"the API's RSS grew by {(rss_after - rss_before) / MIB:.0f} MiB",
    )
    for phase in ("baseline", "big bodies", "huge limits", "flood", "slow clients", "after"):
        values = witness.latencies.get(phase, [])
        failures = witness.failures.get(phase, [])
        outcome.figures[f"witness {phase}: p50 / p99 (n)"] = (
            f"{seconds(percentile(values, 50))} / {seconds(percentile(values, 99))} ({len(values)})"
        )
        outcome.check(not failures, f"the witness failed during {phase}: {failures[:3]}")
        outcome.check(bool(values), f"the witness was never answered during {phase}")
    outcome.elapsed_s = time.monotonic() - started
    return outcome


def _expect(outcome: Outcome, tally: Tally, attack: str, allowed: set[int]) -> None:
    counts = tally.of(attack)
    outcome.check(sum(counts.values()) > 0, f"{attack}: nothing was sent")
    other = {s: n for s, n in counts.items() if s not in allowed}
    outcome.check(not other, f"{attack}: answered {other}, expected only {sorted(allowed)}")


def _setup(base: str) -> dict[str, str]:
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    keys: dict[str, str] = {"admin": ADMIN_TOKEN}
    with httpx.Client(base_url=base, headers=admin, timeout=30) as client:
        for name in ("attacker", "witness"):
            clinic = client.post("/v1/clinics", json={"name": name, "timezone": "UTC"})
            clinic.raise_for_status()
            clinic_id = clinic.json()["id"]
            key = client.post(f"/v1/clinics/{clinic_id}/keys", json={"role": "clinician"})
            key.raise_for_status()
            keys[name] = key.json()["key"]
            for i in range(30):
                client.post(
                    "/v1/patients",
                    json={"clinic_id": clinic_id, "mrn": f"{name}-{i}", "display_name": f"P {i}"},
                ).raise_for_status()
    return keys


@contextlib.asynccontextmanager
async def _client(base: str, key: str, connections: int = 8) -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(
        base_url=base,
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
        limits=limits,
    ) as client:
        yield client


async def _big_bodies(base: str, keys: dict[str, str], spec: AbuseSize, tally: Tally) -> None:
    body = b'{"mrn": "' + b"x" * (10 * MIB) + b'", "display_name": "big"}'

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 64 * 1024):
            yield body[i : i + 64 * 1024]

    async with _client(base, keys["attacker"]) as client:
        json_type = {"content-type": "application/json"}
        for _ in range(spec.big_bodies):
            for attack in ("10 MB body, Content-Length", "10 MB body, chunked", "10 MB form"):
                try:
                    if attack == "10 MB form":
                        answer = await client.post("/login", data={"key": "k" * (10 * MIB)})
                    elif attack == "10 MB body, chunked":
                        answer = await client.post(
                            "/v1/patients", content=chunks(), headers=json_type
                        )
                    else:
                        answer = await client.post("/v1/patients", content=body, headers=json_type)
                    tally.add(attack, answer.status_code)
                except httpx.HTTPError as exc:
                    # The server may close the connection once it has answered 413.
                    tally.fail(attack, exc)


async def _huge_limits(base: str, keys: dict[str, str], spec: AbuseSize, tally: Tally) -> None:
    paths = [
        "/v1/patients?limit=1000000000",
        "/v1/patients?limit=99999999999999999999999999999999",
        "/v1/patients?limit=-1",
        "/v1/patients?limit=1e9",
        "/v1/alerts?limit=501",
        "/v1/patients?cursor=" + "A" * 4000,
        "/v1/patients?cursor=%00%ff",
        "/v1/refills/due?within_days=100000000000",
        "/v1/pumps/NGP204519H/telemetry?limit=100000&since=0001-01-01T00:00:00Z",
    ]
    async with _client(base, keys["attacker"]) as client:
        for path in paths * 3:
            try:
                tally.add("huge limit/cursor", (await client.get(path)).status_code)
            except httpx.HTTPError as exc:
                tally.fail("huge limit/cursor", exc)


async def _flood(base: str, keys: dict[str, str], spec: AbuseSize, tally: Tally) -> None:
    for attack, key in (("flood, one key", keys["attacker"]), ("flood, wrong key", "wrong-key")):
        async with _client(base, key, spec.concurrency) as client:
            budget = [spec.flood if key != "wrong-key" else spec.flood // 5]

            async def worker(
                client: httpx.AsyncClient = client, attack: str = attack, budget: list[int] = budget
            ) -> None:
                while budget[0] > 0:
                    budget[0] -= 1
                    try:
                        answer = await client.get("/v1/patients?limit=50")
                        tally.add(attack, answer.status_code)
                    except httpx.HTTPError as exc:
                        tally.fail(attack, exc)

            await asyncio.gather(*(worker() for _ in range(spec.concurrency)))
    # While the wrong key's address is locked out, a valid key that has authenticated (the
    # attacker key, just before) still passes from that address.
    async with _client(base, keys["attacker"]) as client:
        tally.add(
            "valid key, same address as the wrong-key flood",
            (await client.get("/v1/patients?limit=1")).status_code,
        )


async def _slow_clients(base: str, keys: dict[str, str], spec: AbuseSize, tally: Tally) -> None:
    """Half the connections trickle their headers, half a declared 1000-byte body, one byte
    every 0.2 s, for ``slow_s``, then send the rest and read the status the server answers."""
    port = int(base.rsplit(":", 1)[1])
    auth = f"Authorization: Bearer {keys['attacker']}\r\n".encode()
    head = b"GET /v1/patients HTTP/1.1\r\nHost: api\r\n" + auth + b"X-Slow: " + b"a" * 500
    body_head = (
        b"POST /v1/patients HTTP/1.1\r\nHost: api\r\n"
        + auth
        + b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    )

    async def slow(kind: str) -> None:
        attack = f"slow {kind}"
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=(SLOW_ADDRESS, 0)
            )
        except OSError as exc:
            tally.fail(attack, exc)
            return
        deadline = time.monotonic() + spec.slow_s
        try:
            if kind == "body":
                writer.write(body_head)
            data = head + b"\r\n\r\n" if kind == "headers" else b"{" + b" " * 998 + b"}"
            sent = 0
            while sent < len(data) and time.monotonic() < deadline:
                writer.write(data[sent : sent + 1])
                await writer.drain()
                sent += 1
                await asyncio.sleep(0.2)
            writer.write(data[sent:])  # then the rest at once: the request completes
            await writer.drain()
            status_line = await asyncio.wait_for(reader.readline(), 10)
            parts = status_line.split()
            tally.add(attack, int(parts[1]) if len(parts) > 1 else 0)
        except (OSError, TimeoutError, ValueError) as exc:
            tally.fail(attack, exc)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    half = spec.slow_clients // 2
    await asyncio.gather(
        *(slow("headers") for _ in range(half)),
        *(slow("body") for _ in range(spec.slow_clients - half)),
    )
