"""Migrations and the partitioned readings table, on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from services.storage import migrate
from tests.support import fetch, fetchval, wait_for_count


async def test_migrate_applies_everything_once_and_is_idempotent(empty_database_url: str) -> None:
    conn = await asyncpg.connect(empty_database_url)
    try:
        assert [m.version for m in await migrate.pending(conn)] == [
            m.version for m in migrate.available()
        ]
        first = await migrate.apply(conn)
        assert [m.version for m in first] == [m.version for m in migrate.available()]
        assert await migrate.apply(conn) == []
        assert await migrate.pending(conn) == []
        recorded = await conn.fetch("SELECT version, checksum FROM schema_migrations")
        assert {r["version"]: r["checksum"] for r in recorded} == {
            m.version: m.checksum for m in migrate.available()
        }
    finally:
        await conn.close()


def test_two_processes_migrating_at_once_both_succeed(empty_database_url: str) -> None:
    env = {"PUMPWATCH_DATABASE_URL": empty_database_url, "PATH": "/usr/bin:/bin"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "services", "migrate"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    said = sorted(out.decode().strip().splitlines()[0] for out, _ in outputs)
    assert said == ["applied 0001_ingest", "database is up to date"]
    count = asyncio.run(fetchval(empty_database_url, "SELECT count(*) FROM schema_migrations"))
    assert count == len(migrate.available())


async def test_databases_of_one_server_migrating_at_once_all_succeed(pg_admin_url: str) -> None:
    """The advisory lock serialises one database's migrations; several databases of one server
    migrate in parallel, and their ``ALTER ROLE pumpwatch_grafana`` (a catalog all databases
    share) collide: "tuple concurrently updated". The losers try again."""
    names = [f"pw_parallel_{uuid.uuid4().hex[:10]}" for _ in range(6)]
    admin = await asyncpg.connect(pg_admin_url)
    try:
        for name in names:
            await admin.execute(f"CREATE DATABASE {name} ENCODING 'UTF8' TEMPLATE template0")
        urls = [urlunsplit(urlsplit(pg_admin_url)._replace(path=f"/{name}")) for name in names]
        conns = [await asyncpg.connect(url) for url in urls]
        try:
            for _ in range(3):  # three rounds of every database migrating at once
                applied = await asyncio.gather(*(migrate.apply(conn) for conn in conns))
                assert [len(a) for a in applied] == [len(migrate.available())] * len(conns)
                for conn in conns:
                    await conn.execute("DROP TABLE schema_migrations")
                    await conn.execute("DROP SCHEMA grafana CASCADE")
                    await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        finally:
            for conn in conns:
                await conn.close()
    finally:
        for name in names:
            await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


async def test_a_migration_edited_after_it_was_applied_is_refused(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("UPDATE schema_migrations SET checksum = 'edited' WHERE version = 1")
        with pytest.raises(migrate.MigrationError, match="changed after it was applied"):
            await migrate.pending(conn)
    finally:
        await conn.close()


def test_migrate_without_a_database_url_says_what_to_set() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "services", "migrate"],
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert b"PUMPWATCH_DATABASE_URL is not set" in result.stderr


async def test_readings_partitions_exist_ahead_and_are_created_on_demand(
    database_url: str,
) -> None:
    now = datetime.now(UTC)
    names = {
        r["relname"]
        for r in await fetch(
            database_url,
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'readings'::regclass",
        )
    }
    months = [
        (now.year + (now.month - 1 + k) // 12, (now.month - 1 + k) % 12 + 1) for k in range(4)
    ]
    assert {f"readings_{y:04d}_{m:02d}" for y, m in months} <= names

    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT ensure_readings_partition('2021-03-15T12:00:00Z')")
        assert not await conn.fetchval("SELECT ensure_readings_partition('2021-03-02T00:00:00Z')")
        bounds = await conn.fetchval(
            "SELECT pg_get_expr(relpartbound, oid) FROM pg_class WHERE relname = 'readings_2021_03'"
        )
        assert bounds == (
            "FOR VALUES FROM ('2021-03-01 00:00:00+00') TO ('2021-04-01 00:00:00+00')"
        )
    finally:
        await conn.close()


async def test_two_writers_creating_the_same_partition_at_once_both_succeed(
    database_url: str,
) -> None:
    """Two batches committing at once both find next month's partition missing: the second,
    queued on the lock while the first creates it, must not fail (it did, with duplicate_table,
    and its batch was retried)."""
    first = await asyncpg.connect(database_url)
    second = await asyncpg.connect(database_url)
    try:
        for year in (2041, 2042, 2043):
            month = datetime(year, 1, 15, tzinfo=UTC)
            creating = first.transaction()
            await creating.start()
            assert await first.fetchval("SELECT ensure_readings_partition($1)", month)
            queued = asyncio.create_task(
                second.fetchval("SELECT ensure_readings_partition($1)", month)
            )
            # The second queued on the lock (the pid is the server's integer, not input).
            waiting = (
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                f"AND pid = {second.get_server_pid():d}"
            )
            assert await wait_for_count(database_url, waiting, 1, timeout_s=30) == 1
            await creating.commit()
            assert await queued is False
    finally:
        await first.close()
        await second.close()


async def test_a_window_query_touches_only_its_partitions(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("SELECT ensure_readings_partition('2021-03-15T12:00:00Z')")
        await conn.execute("SELECT ensure_readings_partition('2021-04-15T12:00:00Z')")
        plan = "\n".join(
            r[0]
            for r in await conn.fetch(
                "EXPLAIN SELECT * FROM readings WHERE serial = 'X' "
                "AND recorded_at >= '2021-03-05' AND recorded_at < '2021-03-09'"
            )
        )
        assert "readings_2021_03" in plan
        assert "readings_2021_04" not in plan
    finally:
        await conn.close()


async def test_retention_drops_whole_partitions_only(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        for month in ("2021-01-10", "2021-02-10", "2021-03-10"):
            await conn.execute(
                "SELECT ensure_readings_partition($1::timestamptz)",
                datetime.fromisoformat(month + "T00:00:00+00:00"),
            )
        dropped = [
            r[0]
            for r in await conn.fetch(
                "SELECT drop_readings_partitions_before('2021-03-01T00:00:00Z')"
            )
        ]
        assert dropped == ["readings_2021_01", "readings_2021_02"]
        # March straddles the cutoff's month and is kept whole.
        dropped = [
            r[0]
            for r in await conn.fetch(
                "SELECT drop_readings_partitions_before('2021-03-20T00:00:00Z')"
            )
        ]
        assert dropped == []
        assert await conn.fetchval("SELECT to_regclass('readings_2021_03') IS NOT NULL")
    finally:
        await conn.close()


async def test_the_firmware_of_each_pumps_newest_reading_is_filled_in_once(
    empty_database_url: str,
) -> None:
    """Migration 0022 gives pump_state the firmware of the source that sent each pump's newest
    reading (ingest keeps it from then on), from that reading's stored payload."""
    conn = await asyncpg.connect(empty_database_url)
    try:
        await migrate.apply(conn, through=21)
        newest = datetime(2026, 11, 30, 8, tzinfo=UTC)
        older = datetime(2026, 11, 30, 7, tzinfo=UTC)
        await conn.execute("SELECT ensure_readings_partition($1)", newest)
        readings = [
            # Its newest reading came through a hub with 2.4.9; an older one with 2.4.1.
            ("NGPMIG0001", older, '{"source": {"kind": "home_hub", "firmware": "2.4.1"}}'),
            ("NGPMIG0001", newest, '{"source": {"kind": "home_hub", "firmware": "2.4.9"}}'),
            # A source that named no firmware; no source at all.
            ("NGPMIG0002", newest, '{"source": {"kind": "home_hub", "id": "HUB-2"}}'),
            ("NGPMIG0003", newest, "{}"),
        ]
        state: dict[str, tuple[uuid.UUID, datetime]] = {}
        for serial, at, payload in readings:
            msg_id = uuid.uuid4()
            state[serial] = (msg_id, at) if at == newest else state.get(serial, (msg_id, at))
            await conn.execute(
                "INSERT INTO pumps (serial) VALUES ($1) ON CONFLICT DO NOTHING", serial
            )
            await conn.execute(
                """INSERT INTO readings (msg_id, serial, recorded_at, utc_offset_minutes,
                       received_at, volume_ml, capacity_ml, drug_name, concentration_mcg_per_ml,
                       infusion_mode, rate_ml_per_day, payload)
                   VALUES ($1, $2, $3, 0, $3, 10, 20, 'baclofen', 2000, 'continuous', 0.25,
                       $4)""",
                msg_id,
                serial,
                at,
                payload,
            )
        # NGPMIG0004: its newest reading is no longer stored (a dropped partition).
        state["NGPMIG0004"] = (uuid.uuid4(), newest)
        await conn.execute("INSERT INTO pumps (serial) VALUES ('NGPMIG0004')")
        for serial, (msg_id, at) in state.items():
            await conn.execute(
                """INSERT INTO pump_state (serial, msg_id, recorded_at, utc_offset_minutes,
                       received_at, volume_ml, capacity_ml, drug_name, concentration_mcg_per_ml,
                       infusion_mode, rate_ml_per_day)
                   VALUES ($1, $2, $3, 0, $3, 10, 20, 'baclofen', 2000, 'continuous', 0.25)""",
                serial,
                msg_id,
                at,
            )
        assert [m.version for m in await migrate.apply(conn)] == [
            m.version for m in migrate.available() if m.version > 21
        ]
        rows = await conn.fetch("SELECT serial, source_firmware FROM pump_state ORDER BY serial")
        assert [(r["serial"], r["source_firmware"]) for r in rows] == [
            ("NGPMIG0001", "2.4.9"),
            ("NGPMIG0002", None),
            ("NGPMIG0003", None),
            ("NGPMIG0004", None),
        ]
        shown = await conn.fetch("SELECT serial, firmware FROM grafana.pump_status ORDER BY 1")
        assert [r["firmware"] for r in shown] == ["2.4.9", "unknown", "unknown", "unknown"]
    finally:
        await conn.close()
