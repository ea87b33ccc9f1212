"""Grafana: the committed dashboards are the generator's output, refer to the provisioned data
sources, and every SQL panel runs — Grafana's macros expanded as Grafana expands them — against
the migrated schema as the read-only role, over data stored by the real ingest and judged by the
real alert service, returning rows (and the right numbers where the seed fixes them), without
scanning readings. The role reads the dashboard views and nothing else, and can log in once
compose's script has given it a password."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import asyncpg
import pytest
import yaml

from deploy.grafana import dashboards
from lab.embedded import EmbeddedBroker
from services.storage.database import prepare_connection
from tests import alert_fixtures as fx
from tests.support import IngestProcess, alerts_process, encode, fetch, refill_event, telemetry
from tests.test_ingest import publish

ROOT = Path(__file__).resolve().parents[1]
GRAFANA = ROOT / "deploy" / "grafana"
ROLE = "pumpwatch_grafana"


def committed() -> dict[str, dict[str, Any]]:
    return {
        path.stem: json.loads(path.read_text())
        for path in sorted((GRAFANA / "dashboards").glob("*.json"))
    }


def sql_targets() -> list[tuple[str, str, str, str]]:
    """(dashboard, panel title, format, rawSql) of every PostgreSQL query."""
    return [
        (name, panel["title"], target["format"], target["rawSql"])
        for name, board in committed().items()
        for panel in board["panels"]
        for target in panel.get("targets", [])
        if "rawSql" in target
    ]


def test_the_committed_dashboards_are_the_generators_output() -> None:
    assert set(committed()) == set(dashboards.DASHBOARDS)
    for name in dashboards.DASHBOARDS:
        text = (GRAFANA / "dashboards" / f"{name}.json").read_text()
        assert text == dashboards.render(name), "regenerate: python -m deploy.grafana.dashboards"


def test_dashboards_use_the_provisioned_data_sources_and_the_mounted_folder() -> None:
    provisioned = {
        source["uid"]: source
        for path in sorted((GRAFANA / "provisioning" / "datasources").glob("*.yml"))
        for source in yaml.safe_load(path.read_text())["datasources"]
    }
    postgres = provisioned["pumpwatch-postgres"]
    assert postgres["user"] == ROLE
    assert postgres["secureJsonData"]["password"] == "$GRAFANA_DB_PASSWORD"
    for board in committed().values():
        assert len({panel["id"] for panel in board["panels"]}) == len(board["panels"])
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                source = provisioned[target["datasource"]["uid"]]
                assert source["type"] == target["datasource"]["type"], panel["title"]
    # The provider reads the folder compose mounts the dashboards at.
    provider = yaml.safe_load((GRAFANA / "provisioning/dashboards/pumpwatch.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    grafana = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["grafana"]
    assert f"./deploy/grafana/dashboards:{path}:ro" in grafana["volumes"]
    assert "GRAFANA_DB_PASSWORD" in grafana["environment"]
    # The panels the issue asks for are there.
    titles = " | ".join(title.lower() for _, title, _, _ in sql_targets())
    for words in (
        "reporting",
        "silent",
        "days to the low-reservoir alarm",
        "open alerts by priority",
        "open alerts by rule",
        "device alarms by model and firmware",
        "eri / eos",
        "refill discrepancy distribution",
        "refill discrepancy trend",
        "sequence gaps",
        "quarantined",
    ):
        assert words in titles, words


# --- Grafana's macros ------------------------------------------------------------------------

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _seconds(interval: str) -> int:
    match = re.fullmatch(r"'?(\d+)([smhd])'?", interval.strip())
    assert match, interval
    return int(match[1]) * _UNITS[match[2]]


def expand(sql: str, start: datetime, end: datetime, interval: str = "1h") -> str:
    """Grafana's PostgreSQL macros as its SQL data source expands them."""
    since, until = (f"'{t.astimezone(UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}'" for t in (start, end))
    sql = sql.replace("$__interval", interval)
    sql = re.sub(r"\$__timeFilter\(([^)]+)\)", rf"\1 BETWEEN {since} AND {until}", sql)
    sql = sql.replace("$__timeFrom()", since).replace("$__timeTo()", until)

    def group(match: re.Match[str], alias: bool) -> str:
        seconds = _seconds(match[2])
        grouped = f"floor(extract(epoch from {match[1]})/{seconds})*{seconds}"
        return f'{grouped} AS "time"' if alias else grouped

    sql = re.sub(r"\$__timeGroupAlias\(([^,]+),([^)]+)\)", lambda m: group(m, True), sql)
    sql = re.sub(r"\$__timeGroup\(([^,]+),([^)]+)\)", lambda m: group(m, False), sql)
    assert "$__" not in sql, sql
    return sql


def test_the_macro_helper_expands_as_grafana_does() -> None:
    start = datetime(2026, 11, 17, 8, 0, tzinfo=UTC)
    end = datetime(2026, 11, 24, 8, 0, tzinfo=UTC)
    assert expand("WHERE $__timeFilter(hour)", start, end) == (
        "WHERE hour BETWEEN '2026-11-17T08:00:00Z' AND '2026-11-24T08:00:00Z'"
    )
    assert expand("SELECT $__timeGroupAlias(at, '1d')", start, end) == (
        'SELECT floor(extract(epoch from at)/86400)*86400 AS "time"'
    )
    assert expand("$__timeGroup(at, $__interval)", start, end, "5m") == (
        "floor(extract(epoch from at)/300)*300"
    )


# --- the panels against seeded data ----------------------------------------------------------

NOW = datetime.now(UTC).replace(microsecond=0)
P1, P2, P3, P4 = "NGPGRAF001", "NGPGRAF002", "NGPGRAF003", "NGPGRAF004"


def _reading(serial: str, at: datetime, seq: int, *, firmware: str, **fields: Any) -> bytes:
    message = telemetry(
        serial=serial,
        seq=seq,
        recorded_at=at,
        source={"kind": "home_hub", "id": f"HUB-{serial[-3:]}", "firmware": firmware},
        **fields,
    )
    return encode(message)


def seed_messages() -> list[tuple[str, bytes]]:
    """P1 a stalled motor, a sequence gap and a refill naming its expected residual; P2 a
    battery at ERI and a refill without one (expected from the last reading); P3 silent for
    three days; P4 at end of service; one malformed message."""
    prometra = {"model": "Prometra II"}
    p2_refill = refill_event(serial=P2, seq=0, recorded_at=NOW - timedelta(hours=26))
    del p2_refill["refill"]["expected_residual_ml"]
    p2_refill["refill"]["residual_ml"] = 5.0
    items = [
        (P1, _reading(P1, NOW - timedelta(hours=3), 0, firmware="2.4.1", volume_ml=17.6)),
        (P1, _reading(P1, NOW - timedelta(hours=2), 1, firmware="2.4.1", volume_ml=17.5)),
        (
            P1,
            _reading(
                P1,
                NOW - timedelta(minutes=10),
                3,
                firmware="2.4.1",
                volume_ml=17.4,
                alarms=["motor_stall"],
            ),
        ),
        (
            P2,
            _reading(P2, NOW - timedelta(hours=30), 0, firmware="3.0.0", volume_ml=6.0, **prometra),
        ),
        (
            P2,
            _reading(
                P2,
                NOW - timedelta(minutes=20),
                1,
                firmware="3.0.0",
                volume_ml=3.0,
                battery={"remaining_pct": 9, "status": "eri"},
                alarms=["eri"],
                **prometra,
            ),
        ),
        (P3, _reading(P3, NOW - timedelta(days=3), 0, firmware="2.4.1", volume_ml=2.5)),
        (
            P4,
            _reading(
                P4,
                NOW - timedelta(minutes=5),
                0,
                firmware="2.2.0",
                volume_ml=20.0,
                battery={"remaining_pct": 0, "status": "eos"},
                alarms=["eos"],
            ),
        ),
    ]
    topics = [(f"pumps/{serial}/telemetry", payload) for serial, payload in items]
    topics.append(
        (
            f"pumps/{P1}/events",
            encode(refill_event(serial=P1, seq=0, recorded_at=NOW - timedelta(hours=1))),
        )
    )
    topics.append((f"pumps/{P2}/events", encode(p2_refill)))
    topics.append((f"pumps/{P1}/telemetry", b"{not json"))
    return topics


@pytest.fixture
def seeded(database_url: str, broker: EmbeddedBroker, tmp_path: Path) -> Iterator[str]:
    """Pumps registered to a clinic, messages through the real ingest, alerts from the real
    alert service."""

    async def register() -> None:
        conn = await asyncpg.connect(database_url)
        await prepare_connection(conn)
        try:
            clinic = await fx.clinic(conn)
            for serial in (P1, P2, P3, P4):
                await fx.pump(conn, serial, patient_id=await fx.patient(conn, clinic))
        finally:
            await conn.close()

    asyncio.run(register())
    ingest = IngestProcess(database_url, broker, tmp_path / "ingest.log")
    alerts = alerts_process(database_url, broker, tmp_path / "alerts.log")
    try:
        ingest.start()
        publish(broker, seed_messages())
        ingest.wait_metric("pumpwatch_ingest_messages_stored_total", 7, kind="telemetry")
        ingest.wait_metric("pumpwatch_ingest_messages_stored_total", 2, kind="events")
        ingest.wait_metric("pumpwatch_ingest_messages_quarantined_total", 1, reason="invalid_json")
        alerts.start()
        # The start-up sweep evaluates every pump; P1's stalled motor stops its flow.
        alerts.wait_metric("pumpwatch_alerts_evaluations_total", 4)
        asyncio.run(_wait_for_alert(database_url, P1, "flow_stopped"))
        yield database_url
    finally:
        alerts.stop_quietly()
        ingest.stop_quietly()


async def _wait_for_alert(url: str, serial: str, rule: str) -> None:
    for _ in range(300):
        found = await fetch(
            url, "SELECT 1 FROM alerts WHERE serial = $1 AND rule = $2", serial, rule
        )
        if found:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"no {rule} alert for {serial}")


async def run_as_grafana(url: str, sql: str) -> list[asyncpg.Record]:
    """A panel's query as the read-only role, in a read-only transaction."""
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction(readonly=True):
            await conn.execute(f"SET LOCAL ROLE {ROLE}")
            return await conn.fetch(sql)
    finally:
        await conn.close()


async def test_every_sql_panel_returns_rows_as_the_grafana_role(seeded: str) -> None:
    start, end = NOW - timedelta(days=7), datetime.now(UTC) + timedelta(minutes=1)
    results: dict[str, list[asyncpg.Record]] = {}
    for board, title, fmt, sql in sql_targets():
        rows = await run_as_grafana(seeded, expand(sql, start, end))
        assert rows, (board, title)
        if fmt == "time_series":
            assert "time" in rows[0], title
        results[title] = rows
    assert len(results) >= 15

    def one(title: str) -> dict[str, Any]:
        return dict(results[title][0])

    assert one("Pumps reporting / silent") == {"reporting": 3, "silent": 1}
    assert one("Batteries: ERI / EOS") == {"ERI": 1, "EOS": 1}
    assert one("Open sequence gaps") == {"open gaps": 1, "missing messages": 1, "pumps": 1}
    assert [r["serial"] for r in results["Silent pumps"]] == [P3]
    alarms = {
        (r["model"], r["firmware"], r["alarm"])
        for r in results["Device alarms by model and firmware"]
    }
    assert alarms == {
        ("SynchroMed II 8637-40", "2.4.1", "motor_stall"),
        ("Prometra II", "3.0.0", "eri"),
        ("SynchroMed II 8637-40", "2.2.0", "eos"),
    }
    by_rule = {r["rule"]: r for r in results["Open alerts by rule"]}
    assert by_rule["flow_stopped"]["high"] >= 1
    assert one("Open alerts by priority")["high"] >= 1
    refills = {r["serial"]: r for r in results["Largest refill discrepancies"]}
    assert refills[P1]["expected from"] == "reported"
    assert float(refills[P1]["discrepancy (mL)"]) == pytest.approx(0.2)
    # P2: 6.0 mL at its last reading, 4 h at 0.25 mL/day before the refill, 5.0 mL measured.
    assert refills[P2]["expected from"] == "last reading"
    assert float(refills[P2]["discrepancy (mL)"]) == pytest.approx(
        6.0 - 0.25 * 4 / 24 - 5.0, abs=0.01
    )
    distribution = {
        r["expected - measured (mL)"]: r["refills"]
        for r in results["Refill discrepancy distribution"]
    }
    assert sum(distribution.values()) == 2
    assert distribution["-1 to 1"] == 2
    horizon = {
        r["days to low alarm"]: r["pumps"] for r in results["Days to the low-reservoir alarm"]
    }
    assert horizon["0-7 d"] == 1  # P2: 1 mL above its alarm at 0.25 mL/day
    assert sum(horizon.values()) == 4
    assert [r["reason"] for r in results["Latest quarantined messages"]] == ["invalid_json"]
    hourly = results["Pumps reporting per hour"]
    assert sum(r["readings"] for r in hourly) == 7


async def test_no_panel_query_needs_a_scan_of_readings(seeded: str) -> None:
    """With sequential scans priced out, a plan that still scans readings (or the hourly
    rollups, or events) would have no index to use: the panel's cost would grow with history."""
    start, end = NOW - timedelta(days=7), NOW + timedelta(minutes=1)
    conn = await asyncpg.connect(seeded)
    try:
        await conn.execute("SET enable_seqscan = off")
        for _, title, _, sql in sql_targets():
            plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + expand(sql, start, end)))
            assert not re.search(r"Seq Scan on (readings|events)", plan), (title, plan)
    finally:
        await conn.close()


async def test_the_grafana_role_reads_the_dashboard_views_and_nothing_else(
    database_url: str,
) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        views = [
            r["table_name"]
            for r in await conn.fetch(
                "SELECT table_name FROM information_schema.views WHERE table_schema = 'grafana' "
                "ORDER BY 1"
            )
        ]
        granted = {
            (r["table_schema"], r["privilege_type"])
            for r in await conn.fetch(
                "SELECT table_schema, table_name, privilege_type "
                "FROM information_schema.role_table_grants WHERE grantee = $1",
                ROLE,
            )
        }
        assert granted == {("grafana", "SELECT")}
        used = " ".join(sql for *_, sql in sql_targets())
        assert all(f"grafana.{view}" in used for view in views), views
        async with conn.transaction():
            await conn.execute(f"SET LOCAL ROLE {ROLE}")
            for view in views:
                await conn.fetch(f"SELECT * FROM grafana.{view} LIMIT 1")
        for statement in (
            "SELECT * FROM readings LIMIT 1",
            "SELECT * FROM pump_state LIMIT 1",
            "SELECT * FROM patients LIMIT 1",
            "SELECT * FROM api_keys LIMIT 1",
            "DELETE FROM grafana.quarantine",
            "CREATE TABLE grafana.mine (x int)",
            "CREATE TABLE public.mine (x int)",
        ):
            async with conn.transaction():
                await conn.execute("SAVEPOINT refused")
                await conn.execute(f"SET LOCAL ROLE {ROLE}")
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.execute(statement)
                await conn.execute("ROLLBACK TO SAVEPOINT refused")
    finally:
        await conn.close()


def _pg_env(url: str) -> dict[str, str]:
    parts = urlsplit(url)
    host = parts.hostname or parse_qs(parts.query).get("host", [""])[0]
    env = {
        "PGHOST": host,
        "PGPORT": str(parts.port or 5432),
        "PGUSER": unquote(parts.username or "postgres"),
        "PGDATABASE": parts.path.lstrip("/"),
    }
    if parts.password:
        env["PGPASSWORD"] = unquote(parts.password)
    return env


async def test_compose_gives_the_role_a_login_that_is_read_only(database_url: str) -> None:
    password = uuid.uuid4().hex
    done = await asyncio.to_thread(
        subprocess.run,
        ["sh", str(GRAFANA / "set-db-password.sh")],
        env={"PATH": os.environ["PATH"], **_pg_env(database_url), "GRAFANA_DB_PASSWORD": password},
        capture_output=True,
        text=True,
        check=False,
    )
    pg = _pg_env(database_url)
    try:
        assert done.returncode == 0, done.stderr
        conn = await asyncpg.connect(
            host=pg["PGHOST"],
            port=int(pg["PGPORT"]),
            database=pg["PGDATABASE"],
            user=ROLE,
            password=password,
        )
        try:
            assert await conn.fetchval("SHOW default_transaction_read_only") == "on"
            assert await conn.fetchval("SHOW statement_timeout") == "10s"
            assert await conn.fetchval("SELECT count(*) FROM grafana.pump_status") == 0
            with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
                await conn.execute("CREATE TEMP TABLE scratch (x int)")
        finally:
            await conn.close()
    finally:
        # The role is the server's, not this test database's: leave it as the migration made it.
        admin = await asyncpg.connect(database_url)
        try:
            await admin.execute(f"ALTER ROLE {ROLE} NOLOGIN PASSWORD NULL")
        finally:
            await admin.close()
