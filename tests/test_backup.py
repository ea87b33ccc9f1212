"""Backup and restore, as docs/reliability.md documents it: `pg_dump --format=custom` of a
database with data in every part of the schema, `pg_restore` into a fresh empty database, and
the copy is the same (row counts and checksums of every table), keeps its protections (the
append-only audit log), and `pumpwatch migrate` finds nothing pending."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from services.storage.database import prepare_connection
from tests import alert_fixtures as fx
from tests.api_support import running_api, world
from tests.support import fetch, fetchval

TABLES = """
SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND NOT c.relispartition
ORDER BY c.relname
"""


def _pgserver_dir() -> Path:
    """pgserver's package directory (found, not imported: importing it warns)."""
    spec = importlib.util.find_spec("pgserver")
    assert spec is not None
    assert spec.origin is not None
    return Path(spec.origin).parent


def _run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _pg_tool(name: str, server_major: int) -> str:
    """The client tool of the server's major version (pg_dump refuses a newer server)."""
    candidates = [
        shutil.which(name),
        f"/usr/lib/postgresql/{server_major}/bin/{name}",
        str(_pgserver_dir() / "pginstall" / "bin" / name),
    ]
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            done = _run(candidate, "--version")
            version = done.stdout.split()[-1] if done.returncode == 0 else ""
            if version.split(".")[0] == str(server_major):
                return candidate
    pytest.fail(f"no {name} of PostgreSQL {server_major} on this machine")


async def _seed(database_url: str) -> None:
    """Clinics, patients, pumps, readings (partitioned), events, alerts with history, keys,
    webhooks, sessions and audit rows: through the API where it writes them, else fixtures."""
    async with running_api(database_url) as api:
        w = await world(api)
        for key, path in (
            (w.a.clinician, f"/v1/patients/{w.a.patient_id}/dashboard"),
            (w.a.clinician, "/v1/alerts?status=open"),
            (w.b.clinician, f"/v1/pumps/{w.b.serial}/telemetry"),
            (w.fleet, f"/v1/pumps/{w.unassigned}"),
        ):
            assert (await api.call("GET", path, key)).status_code == 200
        acknowledged = await api.call(
            "POST", f"/v1/alerts/{w.a.alert_id}/acknowledge", w.a.clinician, json={"note": "ok"}
        )
        assert acknowledged.status_code == 200
        hook = await api.call(
            "POST",
            "/v1/webhooks",
            w.a.clinician,
            json={"url": "https://hooks.example.org/x", "events": ["alert.opened"]},
        )
        assert hook.status_code == 201, hook.text
    conn = await asyncpg.connect(database_url)
    await prepare_connection(conn)
    try:
        # A year back: readings land in several monthly partitions.
        for days in (400, 200, 30):
            await fx.reading(conn, w.a.serial, datetime.now(UTC) - timedelta(days=days))
        await conn.execute(
            "INSERT INTO quarantine (digest, topic, payload, payload_bytes, reason, detail, "
            "first_received_at, last_received_at) VALUES ($1, 'pumps/x/telemetry', $2, 3, "
            "'invalid_json', 'payload is empty', now(), now())",
            b"\x01" * 32,
            b"\x00\xff\n",
        )
    finally:
        await conn.close()


async def _fingerprint(database_url: str) -> dict[str, tuple[int, str]]:
    """Per table: the row count and an md5 of all rows (as text, in sorted order)."""
    tables = [r["relname"] for r in await fetch(database_url, TABLES)]
    found = {}
    for table in tables:
        row = (
            await fetch(
                database_url,
                f"SELECT count(*) AS n, md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), "
                f"'')) AS sum FROM {table} t",
            )
        )[0]
        found[table] = (int(row["n"]), str(row["sum"]))
    return found


async def test_a_dump_restored_into_a_fresh_database_is_the_same_and_current(
    database_url: str, empty_database_url: str, tmp_path: Path
) -> None:
    await _seed(database_url)
    before = await _fingerprint(database_url)
    for table in (
        "clinics",
        "patients",
        "pumps",
        "readings",
        "events",
        "alerts",
        "audit_log",
        "api_keys",
        "webhooks",
        "quarantine",
        "schema_migrations",
    ):
        assert before[table][0] > 0, f"{table} was not seeded"
    partitions = await fetchval(
        database_url,
        "SELECT count(*) FROM pg_inherits WHERE inhparent = 'readings'::regclass",
    )
    major = int(await fetchval(database_url, "SHOW server_version_num")) // 10000

    dump = tmp_path / "pumpwatch.dump"
    dumped = await asyncio.to_thread(
        _run, _pg_tool("pg_dump", major), "--format=custom", f"--file={dump}", database_url
    )
    assert dumped.returncode == 0, dumped.stderr
    restored = await asyncio.to_thread(
        _run,
        _pg_tool("pg_restore", major),
        "--exit-on-error",
        "--single-transaction",
        f"--dbname={empty_database_url}",
        str(dump),
    )
    assert restored.returncode == 0, restored.stderr

    after = await _fingerprint(empty_database_url)
    assert after.keys() == before.keys()
    different = {t: (before[t], after[t]) for t in before if before[t] != after[t]}
    assert not different, different
    assert (
        await fetchval(
            empty_database_url,
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'readings'::regclass",
        )
        == partitions
    )
    # The restored audit log is still append-only.
    conn = await asyncpg.connect(empty_database_url)
    try:
        with pytest.raises(asyncpg.PostgresError, match="audit_log"):
            await conn.execute("DELETE FROM audit_log")
    finally:
        await conn.close()

    migrated = await asyncio.to_thread(
        _run, sys.executable, "-m", "services", "migrate", PUMPWATCH_DATABASE_URL=empty_database_url
    )
    assert migrated.returncode == 0, migrated.stderr
    assert migrated.stdout.strip() == "database is up to date", migrated.stdout
