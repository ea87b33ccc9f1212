"""Strangers and forwarded headers against the API (security audit, findings 3 and 4).

Two real ``pumpwatch api`` processes (A and B) on one scratch database, default settings. From
one loopback address, the stranger's (which a clinic's own client shares, as every client
behind one reverse proxy does):

1. a flood of requests without credentials: all 401, and none counted as a failed
   authentication (``auth_failures`` stays empty);
2. wrong keys, one at a time, alternately to A and B: the first ``limit`` are 401 and counted,
   every later one is 429 on both processes (the count lives in PostgreSQL, shared);
3. during that lockout, from the same address: more wrong keys (all 429, none counted), a clinic
   key that was right all along and a brand-new one created during the lockout (every one 200 on
   both processes: a right credential is never refused), requests without credentials (401).

Then forwarded headers. From another loopback address (the spoofer), wrong keys each claiming
another address in ``X-Forwarded-For``: with default settings nothing is believed, every
failure counts against the connecting address, and rotating claims does not escape the limit.
Finally a third process, C, with ``PUMPWATCH_API_TRUSTED_PROXIES=127.0.0.1``: requests from that
proxy, each forwarding another client's wrong key, are counted against the forwarded clients,
one each (more clients than the limit, and none locked out for the others).

Figures: requests per phase and their statuses per process, failures counted per source (read
from ``auth_failures`` after each phase), right-key answers during the lockout, addresses
believed. Invalid if any invariant fails, if the lockout was never reached, or if the lockout
phases took so long that the window could have expired under them.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import asyncpg
import httpx

from lab.bench.faults.common import Lab, Outcome, Size
from lab.processes import ServiceProcess, api_service
from services.api.settings import ApiSettings

ADMIN_TOKEN = "faults-strangers-admin-token-5c1d07"  # noqa: S105 - a scratch API's bootstrap token
STRANGER = "127.0.0.2"
"""The stranger's address, shared by the clinic's own client (one reverse proxy, one address)."""
SPOOFER = "127.0.0.3"
"""The address the spoofed ``X-Forwarded-For`` requests come from."""
PROXY = "127.0.0.1"
"""Process C's trusted reverse proxy."""
WRONG_KEY = "pw_faults_strangers_wrong_guess"
LIMIT = int(ApiSettings.model_fields["api_auth_failures_per_minute"].default)
"""The processes run with the default limit of failed authentications per source and minute."""
LOCKOUT_BUDGET_S = 45.0
"""A failure counts for at least 50 s (10-second buckets within one minute): the lockout phases
must end within this, or the window may have expired under them."""


def spoofed(i: int) -> str:
    """A claimed address (TEST-NET-2) the spoofer never has."""
    return f"198.51.100.{i % 254 + 1}"


def forwarded(i: int) -> str:
    """A client behind the trusted proxy (TEST-NET-3)."""
    return f"203.0.113.{i % 254 + 1}"


@dataclass(frozen=True)
class StrangersSize:
    no_credentials: int
    """Requests without credentials from the stranger's address (phase 1)."""
    wrong_after_limit: int
    """Wrong keys sent one at a time after the limit is reached (phase 2)."""
    lockout_wrong: int
    """Wrong keys flooded during the lockout (phase 3)."""
    right: int
    """Right-key requests per key and per process during the lockout (phase 3)."""
    spoofed: int
    """Wrong keys with a spoofed X-Forwarded-For, each claiming another address."""
    forwarded: int
    """Clients behind the trusted proxy, one wrong key each (at most 254)."""
    concurrency: int


SIZES: dict[Size, StrangersSize] = {
    "reduced": StrangersSize(
        no_credentials=400,
        wrong_after_limit=10,
        lockout_wrong=100,
        right=20,
        spoofed=LIMIT + 20,
        forwarded=60,
        concurrency=16,
    ),
    "full": StrangersSize(
        no_credentials=10_000,
        wrong_after_limit=40,
        lockout_wrong=2_000,
        right=250,
        spoofed=LIMIT + 200,
        forwarded=250,
        concurrency=32,
    ),
}


@dataclass
class Tally:
    """Statuses per (phase, process), and requests that got no answer."""

    statuses: dict[tuple[str, str], Counter[int]] = field(default_factory=dict)
    failures: Counter[str] = field(default_factory=Counter)

    def add(self, phase: str, process: str, status: int) -> None:
        self.statuses.setdefault((phase, process), Counter())[status] += 1

    def of(self, phase: str, process: str | None = None) -> Counter[int]:
        found: Counter[int] = Counter()
        for (p, name), counts in self.statuses.items():
            if p == phase and process in (None, name):
                found.update(counts)
        return found


@dataclass(frozen=True)
class Request:
    process: str
    key: str | None
    forwarded_for: str | None = None


async def _send(
    phase: str,
    requests: list[Request],
    bases: dict[str, str],
    local: str,
    tally: Tally,
    *,
    concurrency: int,
) -> None:
    """Send ``requests`` from ``local`` with at most ``concurrency`` in flight (one at a time, in
    order, with 1)."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    clients = {
        name: httpx.AsyncClient(
            base_url=base,
            timeout=60,
            limits=limits,
            transport=httpx.AsyncHTTPTransport(local_address=local, limits=limits),
        )
        for name, base in bases.items()
    }
    queue = list(reversed(requests))

    async def worker() -> None:
        while queue:
            request = queue.pop()
            headers = {}
            if request.key is not None:
                headers["Authorization"] = f"Bearer {request.key}"
            if request.forwarded_for is not None:
                headers["X-Forwarded-For"] = request.forwarded_for
            try:
                answer = await clients[request.process].get("/v1/patients?limit=1", headers=headers)
                tally.add(phase, request.process, answer.status_code)
            except httpx.HTTPError as exc:
                tally.failures[f"{phase}: {type(exc).__name__}"] += 1

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        for client in clients.values():
            await client.aclose()


def _counted(database_url: str) -> Counter[str]:
    """Failed authentications counted per source (the table keeps the last two minutes)."""

    async def read() -> Counter[str]:
        conn = await asyncpg.connect(database_url)
        try:
            rows = await conn.fetch(
                "SELECT source, sum(failures)::int AS n FROM auth_failures GROUP BY source"
            )
        finally:
            await conn.close()
        return Counter({r["source"]: r["n"] for r in rows})

    return asyncio.run(read())


def _new_key(base: str, clinic_id: str) -> str:
    with httpx.Client(
        base_url=base, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30
    ) as client:
        answer = client.post(f"/v1/clinics/{clinic_id}/keys", json={"role": "clinician"})
        answer.raise_for_status()
        key: str = answer.json()["key"]
        return key


def _setup(base: str) -> tuple[str, str]:
    """A clinic with a patient; (clinic id, a clinician key)."""
    with httpx.Client(
        base_url=base, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30
    ) as client:
        clinic = client.post("/v1/clinics", json={"name": "locked-out", "timezone": "UTC"})
        clinic.raise_for_status()
        clinic_id: str = clinic.json()["id"]
        client.post(
            "/v1/patients", json={"clinic_id": clinic_id, "mrn": "S-1", "display_name": "P 1"}
        ).raise_for_status()
    return clinic_id, _new_key(base, clinic_id)


def _api(lab: Lab, database_url: str, name: str, **settings: str) -> ServiceProcess:
    env = {
        "PUMPWATCH_DATABASE_URL": database_url,
        "PUMPWATCH_ADMIN_TOKEN": ADMIN_TOKEN,
        "PUMPWATCH_LOG_LEVEL": "warning",
    }
    return lab.service(api_service(env | settings, lab.path(f"strangers-api-{name}.log")))


def _statuses(counts: Counter[int]) -> str:
    return ", ".join(f"{s} x {n:,}" for s, n in sorted(counts.items())) or "none"


def run(lab: Lab, size: Size, seed: int) -> Outcome:  # noqa: PLR0915 - one timeline, in order
    spec = SIZES[size]
    outcome = Outcome("strangers", "no lockout by strangers, forwarded headers not believed")
    started = time.monotonic()
    database_url = lab.database()
    apis = {name: _api(lab, database_url, name) for name in ("A", "B")}
    proxied = _api(lab, database_url, "C", PUMPWATCH_API_TRUSTED_PROXIES=PROXY)
    for api in (*apis.values(), proxied):
        api.start()
    bases = {name: api.base_url for name, api in apis.items()}
    clinic_id, right_key = _setup(bases["A"])
    tally = Tally()
    counted: dict[str, Counter[str]] = {}
    outcome.figures["limit (failed authentications per source and minute)"] = str(LIMIT)

    def phase(name: str, requests: list[Request], local: str, concurrency: int) -> None:
        asyncio.run(_send(name, requests, bases, local, tally, concurrency=concurrency))
        counted[name] = _counted(database_url)

    alternate = ("A", "B")
    # 1. No credentials: never a failed authentication.
    phase(
        "no credentials",
        [Request(alternate[i % 2], None) for i in range(spec.no_credentials)],
        STRANGER,
        spec.concurrency,
    )
    # 2. Wrong keys, one at a time, alternately: the limit is one count for both processes.
    lockout_started = time.monotonic()
    wrong = LIMIT + spec.wrong_after_limit
    phase("wrong keys", [Request(alternate[i % 2], WRONG_KEY) for i in range(wrong)], STRANGER, 1)
    # 3. During the lockout: more wrong keys, right keys (one brand-new), no credentials.
    new_key = _new_key(bases["A"], clinic_id)
    during = [Request(alternate[i % 2], WRONG_KEY) for i in range(spec.lockout_wrong)]
    for _ in range(spec.right):
        for name in alternate:
            during += [Request(name, right_key), Request(name, new_key), Request(name, None)]
    random.Random(seed).shuffle(during)  # the right keys amid the flood of wrong ones
    phase("during lockout", during, STRANGER, spec.concurrency)
    phase("still locked out", [Request(name, WRONG_KEY) for name in alternate], STRANGER, 1)
    lockout_s = time.monotonic() - lockout_started
    # 4. Spoofed X-Forwarded-For, default settings: counted against the connecting address.
    phase(
        "spoofed X-Forwarded-For",
        [Request(alternate[i % 2], WRONG_KEY, spoofed(i)) for i in range(spec.spoofed)],
        SPOOFER,
        1,
    )
    # 5. Process C trusts 127.0.0.1: the forwarded clients are counted, one each.
    bases["C"] = proxied.base_url
    phase(
        "behind the trusted proxy",
        [Request("C", WRONG_KEY, forwarded(i)) for i in range(spec.forwarded)],
        PROXY,
        spec.concurrency,
    )
    for name, api in (*apis.items(), ("C", proxied)):
        outcome.check(api.alive, f"API process {name} died")
        outcome.check(api.terminate() == 0, f"API process {name} did not stop cleanly")

    answered = sum(sum(c.values()) for c in tally.statuses.values())
    outcome.attempted = answered + sum(tally.failures.values())
    outcome.acknowledged = answered
    outcome.check(not tally.failures, f"requests not answered: {dict(tally.failures)}")
    for (phase_name, process), counts in tally.statuses.items():
        outcome.figures[f"{phase_name}, {process} (status x count)"] = _statuses(counts)

    # 1. Nothing counted for requests without credentials.
    none = tally.of("no credentials")
    outcome.check(set(none) == {401}, f"no credentials answered {dict(none)}, expected 401")
    outcome.check(
        not counted["no credentials"],
        f"requests without credentials were counted: {dict(counted['no credentials'])}",
    )
    # 2. The limit, shared: exactly LIMIT wrong keys answered 401, then 429 on both.
    wrong_counts = tally.of("wrong keys")
    outcome.check(
        wrong_counts == Counter({401: LIMIT, 429: spec.wrong_after_limit}),
        f"wrong keys answered {dict(wrong_counts)}, expected 401 x {LIMIT} then 429",
    )
    for name in alternate:
        outcome.check(
            tally.of("wrong keys", name)[429] > 0, f"process {name} never answered 429 (no lockout)"
        )
        outcome.check(
            tally.of("wrong keys", name)[401] < LIMIT,
            f"process {name} alone answered {LIMIT} wrong keys 401: the count is not shared",
        )
    outcome.check(
        counted["wrong keys"][STRANGER] == LIMIT,
        f"failures counted for the stranger: {counted['wrong keys'][STRANGER]}, expected {LIMIT}",
    )
    # 3. During the lockout: wrong ones 429, right ones 200, none counted.
    for name in alternate:
        lockout = tally.of("during lockout", name)
        expected = Counter({429: spec.lockout_wrong // 2, 200: 2 * spec.right, 401: spec.right})
        if name == "A":
            expected[429] += spec.lockout_wrong % 2
        outcome.check(
            lockout == expected,
            f"process {name} during the lockout answered {dict(lockout)}, expected "
            f"{dict(expected)} (wrong 429, right 200, none 401)",
        )
        outcome.check(
            tally.of("still locked out", name) == Counter({429: 1}),
            f"process {name} no longer locked the stranger out after the right keys",
        )
    outcome.check(
        counted["still locked out"][STRANGER] == LIMIT,
        f"failures counted for the stranger after the lockout phase: "
        f"{counted['still locked out'][STRANGER]}, expected {LIMIT}",
    )
    right_200 = sum(tally.of("during lockout", name)[200] for name in alternate)
    outcome.figures["right-key answers during the lockout (old and brand-new key)"] = (
        f"200 x {right_200:,} of {4 * spec.right:,} "
        f"(A {tally.of('during lockout', 'A')[200]:,}, B {tally.of('during lockout', 'B')[200]:,})"
    )
    outcome.figures["lockout phases (wrong keys to still locked out)"] = f"{lockout_s:.1f} s"
    outcome.check(
        lockout_s < LOCKOUT_BUDGET_S,
        f"the lockout phases took {lockout_s:.0f} s: the window may have expired under them",
    )
    # 4. Spoofed: counted against the spoofer, never against a claimed address.
    spoof = counted["spoofed X-Forwarded-For"]
    claimed = {spoofed(i) for i in range(spec.spoofed)}
    believed = sum(n for source, n in spoof.items() if source in claimed)
    spoof_answers = tally.of("spoofed X-Forwarded-For")
    outcome.figures["spoofed addresses believed (default settings)"] = (
        f"{believed:,} of {spec.spoofed:,} requests ({len(claimed)} claimed addresses)"
    )
    outcome.check(believed == 0, f"{believed} failures counted against spoofed addresses")
    outcome.check(
        spoof[SPOOFER] == LIMIT,
        f"failures counted for the spoofer: {spoof[SPOOFER]}, expected {LIMIT}",
    )
    outcome.check(
        spoof_answers == Counter({401: LIMIT, 429: spec.spoofed - LIMIT}),
        f"spoofed requests answered {dict(spoof_answers)}: rotating claims must not escape "
        f"the limit",
    )
    # 5. Behind the trusted proxy: each forwarded client counted once, the proxy never.
    behind = counted["behind the trusted proxy"]
    clients = {forwarded(i) for i in range(spec.forwarded)}
    outcome.check(len(clients) > LIMIT, "fewer clients behind the proxy than the limit")
    believed_forwarded = sum(n for source, n in behind.items() if source in clients)
    outcome.figures["forwarded addresses believed (trusted proxy)"] = (
        f"{believed_forwarded:,} of {spec.forwarded:,} requests ({len(clients)} clients)"
    )
    outcome.check(
        believed_forwarded == spec.forwarded and all(behind[c] == 1 for c in clients),
        f"behind the trusted proxy, counted {believed_forwarded} over the forwarded clients",
    )
    outcome.check(behind[PROXY] == 0, f"the proxy itself was counted {behind[PROXY]} times")
    behind_answers = tally.of("behind the trusted proxy")
    outcome.check(
        behind_answers == Counter({401: spec.forwarded}),
        f"clients behind the trusted proxy answered {dict(behind_answers)}, expected only 401",
    )
    # Each source as counted right after its phase (the table forgets after two minutes).
    outcome.figures["failures counted by source (auth_failures, after its phase)"] = ", ".join(
        [
            f"{STRANGER} (stranger) {counted['still locked out'][STRANGER]}",
            f"{SPOOFER} (spoofer) {spoof[SPOOFER]}",
            f"198.51.100.0/24 (spoofed) {believed}",
            f"{PROXY} (trusted proxy) {behind[PROXY]}",
            f"203.0.113.0/24 (forwarded, {len(clients)} clients) {believed_forwarded}",
        ]
    )
    seen = {source for snapshot in counted.values() for source in snapshot}
    others = seen - {STRANGER, SPOOFER, PROXY} - claimed - clients
    outcome.check(not others, f"failures counted for unexpected sources: {sorted(others)}")
    outcome.elapsed_s = time.monotonic() - started
    return outcome
