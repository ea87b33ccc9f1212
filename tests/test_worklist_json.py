"""The API's worklist JSON (worklist.page_json: one query with the alerts joined, serialised from
plain values) is byte for byte what the models' path (worklist.page, model_dump_json: the answer
before it) gives, on a varied fleet: fresh and stale read-model rows, pumps without a patient,
alerts acknowledged, snoozed and resolved by people, keys and services, facts of every JSON kind,
every role, every page of several sizes and horizons."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import asyncpg

from lab.bench.api import worklist as bench
from lab.bench.api.seed import seed
from services.api import worklist, worklist_json
from services.api.auth import Principal
from services.storage.database import prepare_connection


async def _vary(conn: asyncpg.Connection) -> None:
    serials = [r["serial"] for r in await conn.fetch("SELECT serial FROM alerts ORDER BY 1")]
    assert len(serials) >= 8, "the seeded fleet has too few alerts to vary"
    user = await conn.fetchval(
        "INSERT INTO users (id, email, display_name, role, clinic_id, password_hash, created_by)"
        " SELECT gen_random_uuid(), 'n@example.org', 'Nora Nurse', 'clinician', clinic_id,"
        " 'x', 'test'"
        " FROM pumps WHERE clinic_id IS NOT NULL LIMIT 1 RETURNING id"
    )
    facts = {"ml": 12.5, "n": 3, "big": 1e21, "tiny": 1e-7, "s": "é", "l": [1, None]}
    await conn.execute(
        "UPDATE alerts SET status = 'acknowledged', acknowledged_at = now(),"
        " acknowledged_by = $2, snoozed_until = now() + interval '1 day', snoozed_by = $2,"
        " snooze_note = 'called the patient', facts = $3::jsonb WHERE serial = ANY($1)",
        serials[0:3],
        f"user:{user}",
        facts,
    )
    await conn.execute(
        "UPDATE alerts SET status = 'acknowledged', acknowledged_at = now(), acknowledged_by = $2"
        " WHERE serial = ANY($1)",
        serials[3:5],
        f"key:{uuid.uuid4()}",
    )
    await conn.execute(
        "UPDATE alerts SET status = 'resolved', resolved_at = now(), resolved_by = $2,"
        " resolution = 'refilled' WHERE serial = ANY($1)",
        serials[5:6],
        f"user:{user}",
    )
    # Rows without a program, with numbers written as integers.
    await conn.execute(
        "UPDATE pump_forecasts SET therapy = NULL WHERE serial IN (SELECT serial FROM"
        " pump_forecasts WHERE therapy IS NOT NULL ORDER BY deadline_at LIMIT 3 OFFSET 60)"
    )
    await conn.execute(
        "UPDATE pump_forecasts SET therapy = jsonb_set(jsonb_set(therapy,"
        " '{concentration_mcg_per_ml}', '500'), '{rate_ml_per_day}', '1')"
        " WHERE serial IN (SELECT serial FROM pump_forecasts WHERE therapy IS NOT NULL"
        " ORDER BY deadline_at LIMIT 3 OFFSET 70)"
    )
    # Stale rows (the API computes these pumps), one pump without its patient.
    await conn.execute(
        "UPDATE pump_forecasts SET version = version + 1"
        " WHERE serial IN (SELECT serial FROM pump_forecasts ORDER BY deadline_at LIMIT 40"
        " OFFSET 5) AND serial NOT LIKE '%3'"
    )
    await conn.execute("UPDATE pumps SET patient_id = NULL WHERE serial = ANY($1)", serials[6:8])


async def test_the_json_answer_is_the_models_answer_byte_for_byte(database_url: str) -> None:
    spec = bench.spec_for(bench.WorklistBenchOptions(pumps=600, clinic_pumps=200, days=1.0))
    await seed(database_url, spec)
    await bench.seed_read_model(database_url)
    conn = await asyncpg.connect(database_url)
    await prepare_connection(conn)
    try:
        await _vary(conn)
        clinics = [r["id"] for r in await conn.fetch("SELECT id FROM clinics ORDER BY 1")]
        principals = [Principal(key_id=None, role="clinician", clinic_id=c) for c in clinics]
        principals += [
            Principal(key_id=None, role="admin", clinic_id=None),
            Principal(key_id=None, role="fleet", clinic_id=None),
        ]
        now = datetime.now(UTC)
        compared = alerts = people = stale = 0
        for principal in principals:
            for within_days, limit in ((30, 50), (90, 7), (3650, 200)):
                cursor = None
                while True:
                    old = await worklist.page(
                        conn,
                        principal,
                        within_days=within_days,
                        limit=limit,
                        cursor=cursor,
                        now=now,
                    )
                    new = await worklist.page_json(
                        conn,
                        principal,
                        within_days=within_days,
                        limit=limit,
                        cursor=cursor,
                        now=now,
                    )
                    assert new == old.model_dump_json().encode()
                    compared += len(old.items)
                    alerts += sum(len(i.open_alerts) for i in old.items)
                    people += sum(
                        a.acknowledged_by is not None for i in old.items for a in i.open_alerts
                    )
                    cursor = old.next_cursor
                    if cursor is None:
                        break
        stale = await conn.fetchval("SELECT count(*) FROM pump_forecasts WHERE stale")
        stepped = await conn.fetchval(
            "SELECT count(*) FROM pump_forecasts WHERE NOT stale"
            " AND jsonb_array_length(therapy -> 'schedule') > 0"
        )
    finally:
        await conn.close()
    # The comparison covered what it is meant to.
    assert compared > 1000
    assert alerts > 50
    assert people > 10
    assert stale > 20
    assert stepped > 10


def test_the_typed_dicts_mirror_the_models_field_for_field() -> None:
    for typed, model in worklist_json.MIRRORS:
        assert tuple(typed.__annotations__) == tuple(model.model_fields), typed.__name__
