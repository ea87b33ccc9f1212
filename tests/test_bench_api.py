"""``pumpwatch bench api`` at toy sizes: the seed is what ingest would have stored, and the bench
drives every route without an error. No wall-clock assertions: the figures are the bench's."""

from __future__ import annotations

import asyncio
import io
import math
import re
from datetime import UTC, datetime

import asyncpg
from rich.console import Console

from lab.bench import api as bench
from lab.bench.api import sweep
from tests.api_support import running_api, world

# The rollup exactly as ingest's STORE_READINGS (and migration 0004) computes it.
_EXPECTED_HOURLY = """
SELECT serial, date_trunc('hour', recorded_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS hour,
       count(*) AS readings, sum(volume_ml) AS volume_ml_sum, min(volume_ml) AS volume_ml_min,
       max(volume_ml) AS volume_ml_max, max(recorded_at) AS last_at,
       (array_agg(volume_ml ORDER BY recorded_at DESC))[1] AS last_volume_ml,
       count(measured_flow_ml_per_day) AS flow_readings,
       coalesce(sum(measured_flow_ml_per_day), 0) AS flow_ml_per_day_sum,
       sum(rate_ml_per_day) AS rate_ml_per_day_sum
FROM readings GROUP BY 1, 2
"""
_FLOATS = (
    "volume_ml_sum",
    "volume_ml_min",
    "volume_ml_max",
    "last_volume_ml",
    "flow_ml_per_day_sum",
    "rate_ml_per_day_sum",
)


async def test_the_seed_is_what_ingest_and_the_engine_would_have_stored(database_url: str) -> None:
    spec = bench.SeedSpec(
        pumps=6,
        clinics=2,
        days=200,
        interval_minutes=20,  # three readings an hour: the rollup adds them up
        seed=3,
        now=datetime.now(UTC).replace(microsecond=0),
    )
    world, seeded = await bench.seed(database_url, spec)
    # The last step's readings fall after ``now`` for the pumps read late in it: not made.
    assert spec.pumps * (spec.steps - 1) <= seeded.readings <= spec.expected_readings
    assert sum(len(s) for s in world.serials) == 6
    conn = await asyncpg.connect(database_url)
    try:
        expected = {(r["serial"], r["hour"]): r for r in await conn.fetch(_EXPECTED_HOURLY)}
        stored = {(r["serial"], r["hour"]): r for r in await conn.fetch(
            "SELECT * FROM readings_hourly"
        )}  # fmt: skip
        assert await conn.fetchval("SELECT count(*) FROM readings") == seeded.readings
        assert set(stored) == set(expected)
        assert seeded.hourly == len(stored)
        for key, row in expected.items():
            found = stored[key]
            assert found["readings"] == row["readings"]
            assert found["flow_readings"] == row["flow_readings"]
            assert found["last_at"] == row["last_at"]
            for name in _FLOATS:
                assert math.isclose(found[name], row[name], rel_tol=1e-12, abs_tol=1e-9), name
        # pump_state is each pump's newest reading.
        stale = await conn.fetchval(
            """SELECT count(*) FROM pump_state s
               JOIN LATERAL (SELECT msg_id, volume_ml FROM readings r WHERE r.serial = s.serial
                             ORDER BY recorded_at DESC LIMIT 1) n ON true
               WHERE n.msg_id <> s.msg_id OR n.volume_ml <> s.volume_ml"""
        )
        assert stale == 0
        assert await conn.fetchval("SELECT count(*) FROM pump_state") == 6
        # 200 days: every pump was refilled (drug age), the volume rising at each refill.
        refilled = await conn.fetch(
            "SELECT serial, count(*) FROM events WHERE type = 'refill' GROUP BY serial"
        )
        assert len(refilled) == 6
        assert seeded.events == sum(r["count"] for r in refilled)
        # Between refills the reservoir only falls (calculated pumps: exactly at the rate).
        rises = await conn.fetchval(
            """SELECT count(*) FROM (
                   SELECT serial, recorded_at, volume_ml,
                          lag(volume_ml) OVER (PARTITION BY serial ORDER BY recorded_at) AS prev
                   FROM readings WHERE basis = 'calculated') r
               WHERE volume_ml > prev + 1e-9
                 AND NOT EXISTS (SELECT 1 FROM events e WHERE e.serial = r.serial
                                 AND e.type = 'refill' AND e.recorded_at <= r.recorded_at
                                 AND e.recorded_at > r.recorded_at - interval '20 minutes')"""
        )
        assert rises == 0
        assert seeded.alerts_resolved > 0
    finally:
        await conn.close()


def test_the_bench_drives_every_route_without_errors(pg_admin_url: str) -> None:
    options = bench.ApiBenchOptions(
        pumps=5,
        clinics=2,
        days=3,
        compare_days=1,
        clients=2,
        seconds=1,
        warmup_seconds=0.2,
        admin_clients=1,
        paced_rates=(4.0,),
        worklist_pumps=0,  # the next test's
    )
    out = io.StringIO()
    report = bench.run(options, Console(file=out, width=200), admin_url=pg_admin_url)
    text = out.getvalue()
    assert report.errors == 0, text
    assert [s.days for s in report.seeded] == [1, 3]
    expected = {(r.name, d) for r in (*bench.ROUTES, bench.ADMIN_WORKLIST) for d in (1, 3)}
    expected |= {(bench.DASHBOARD.name, d) for d in (1, 3)}  # 1 client and 2 clients
    assert {(p.route, p.history_days) for p in report.phases} == expected
    paced = [p for p in report.phases if p.offered_rate is not None]
    assert [(p.route, p.history_days, p.clients, p.offered_rate) for p in paced] == [
        (bench.DASHBOARD.name, 3, 2, 4.0)  # with the main history only
    ]
    for phase in report.phases:
        assert phase.requests > 0, phase.route
        assert phase.errors == 0, (phase.route, phase.statuses, phase.error_sample)
        assert set(phase.statuses) == {200}
        assert phase.rate > 0
        assert phase.percentile(50) <= phase.percentile(99) <= phase.latencies_ms[-1]
        assert phase.server_mean_ms is not None
    assert report.phase(bench.DASHBOARD.name, 3, 1) is not None
    assert report.phase(bench.DASHBOARD.name, 3, 2) is not None
    assert report.phase(bench.DASHBOARD.name, 3, 2, 4.0) is paced[0]
    assert "VERDICT: dashboard p99" in text
    assert "2 concurrent clients offering 4 dashboards/s" in text
    assert "in a closed loop" in text
    assert "1 day vs 3 days" in text


def test_the_worklist_phases_read_the_seeded_read_model_and_then_compute(
    pg_admin_url: str,
) -> None:
    options = bench.ApiBenchOptions(
        clients=2,
        seconds=1,
        warmup_seconds=0.2,
        worklist_pumps=12,
        worklist_clinic_pumps=4,
        worklist_only=True,
    )
    out = io.StringIO()
    report = bench.run(options, Console(file=out, width=200), admin_url=pg_admin_url)
    text = out.getvalue()
    assert report.errors == 0, text
    assert report.phases == []
    assert "read model: 12 rows written" in text
    assert [(p.route, p.history, p.clients, p.offered_rate) for p in report.worklists] == [
        ("patient", "-", 2, None),
        ("worklist (clinic)", "read model", 2, None),
        ("worklist (clinic)", "read model", 2, 100.0),
        ("worklist (all, admin)", "read model", 2, None),
        ("worklist (all, admin)", "read model", 2, 100.0),
        ("worklist (clinic)", "computed per request", 5, None),
        ("worklist (all, admin)", "computed per request", 1, None),
    ]
    for phase in report.worklists:
        assert phase.requests > 0, phase.route
        assert set(phase.statuses) == {200}, (phase.route, phase.error_sample)
    assert "capacity" in text


def test_the_fleet_size_sweep_measures_every_route_on_every_fleet(pg_admin_url: str) -> None:
    options = bench.ApiBenchOptions(
        clients=2,
        seconds=1,
        warmup_seconds=0.2,
        fleet_sizes=(20, 40),
        sweep_days=1,
        worklist_clinic_pumps=8,
    )
    out = io.StringIO()
    report = bench.run(options, Console(file=out, width=250), admin_url=pg_admin_url)
    text = out.getvalue()
    assert report.errors == 0, text
    assert report.phases == []  # only the sweep runs
    assert report.worklists == []
    # A year of resolved alerts before the short history, at both sizes (20 pumps: 40 or more).
    added = [int(n.replace(",", "")) for n in re.findall(r"alert history: ([\d,]+) resolved", text)]
    assert len(added) == 2, text
    assert all(n >= 2 * 20 for n in added), added
    routes = [r.name for r in sweep.SWEEP_ROUTES]
    assert {
        "patient",
        "dashboard",
        "worklist (clinic)",
        "alerts (clinic)",
        "pumps (clinic)",
    } <= set(routes)
    assert [(p.route, p.fleet_pumps) for p in report.sweep] == [
        (route, size) for size in (20, 40) for route in routes
    ]
    for phase in report.sweep:
        assert set(phase.statuses) == {200}, (phase.route, phase.error_sample)
        assert phase.requests > 0
        assert phase.rate > 0
        assert 0 < phase.percentile(50) <= phase.percentile(99)
        assert phase.cpu_s["api"] > 0, phase.route
        assert phase.cpu_s["postgres"] > 0, phase.route
    # The final table: a row per route, each with both sizes' figures and their ratio.
    table = text[text.index("route by fleet size") :]
    for route in routes:
        row = next(line for line in table.splitlines() if line.startswith(f"│ {route} "))
        cells = [c.strip() for c in row.strip("│").split("│")]
        assert cells[0] == route
        figures = [float(c.replace(",", "")) for c in (cells[1], cells[4], cells[-4], cells[-2])]
        assert all(f > 0 for f in figures), row  # req/s at both sizes, the ratios
        assert cells[-1] in {"flat"} or cells[-1].startswith("grows"), row


def test_the_sweep_s_clinic_is_the_same_pumps_at_every_fleet_size() -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    options = bench.ApiBenchOptions(sweep_days=1, worklist_clinic_pumps=400)
    for size, clinics in ((1000, 3), (10_000, 25), (400, 1), (100, 1)):
        spec = sweep.spec_for(options, size)
        assert spec.clinics == clinics
        held = [spec.clinic_of(i) for i in range(size)]
        assert held.count(0) == min(400, size)
        assert held[: min(400, size)] == [0] * min(400, size)
        assert all(held.count(c) <= 400 for c in range(spec.clinics))
    # The default: every clinic in turn, as before.
    plain = bench.SeedSpec(10, 3, 1, 60, 7, now)
    assert [plain.clinic_of(i) for i in range(6)] == [0, 1, 2, 0, 1, 2]


async def test_the_api_serves_more_concurrent_requests_than_its_pool_has_connections(
    database_url: str,
) -> None:
    """What the bench found: each request held its connection while the audit write at the
    response's start waited for another, so pool-size requests in flight deadlocked the API."""
    async with running_api(database_url, api_pool_max_size=2) as api:
        w = await world(api)
        path = f"/v1/pumps/{w.a.serial}/telemetry?limit=5"
        answers = await asyncio.wait_for(
            asyncio.gather(*(api.call("GET", path, w.a.clinician) for _ in range(8))), 30
        )
    assert [a.status_code for a in answers] == [200] * 8
