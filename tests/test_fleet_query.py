"""The fleet page's query (``services/api/sql.py`` FLEET) on a real PostgreSQL: pumps counted by
model and the firmware of their newest reading's source, with the alarms they report."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg

from services.api.sql import FLEET

NOW = datetime.now(UTC)

# serial, the pump's model, the state's model (None: no state row), firmware, hours since the
# newest reading, alarms
PUMPS: list[tuple[str, str | None, str | None, str | None, float, list[str | None]]] = [
    ("NGPFLEET01", "SynchroMed II 8637-40", "SynchroMed II 8637-40", "2.4.1", 1, []),
    ("NGPFLEET02", "SynchroMed II 8637-40", "SynchroMed II 8637-40", "2.4.1", 2, ["motor_stall"]),
    # The same model, another firmware: a group of its own, with its own alarms.
    ("NGPFLEET03", "SynchroMed II 8637-40", "SynchroMed II 8637-40", "2.5.0", 3, ["eri", "eri"]),
    ("NGPFLEET04", "SynchroMed II 8637-40", "SynchroMed II 8637-40", "2.5.0", 30, ["eri"]),
    # The state's model wins over the registered one; no firmware named; silent for 3 days.
    ("NGPFLEET05", "SynchroMed II 8637-20", "Prometra II", None, 72, []),
    # The registered model, when the state names none; a NULL entry in alarms is not an alarm.
    ("NGPFLEET06", "Prometra II", None, "3.0.0", 1, [None, "low_reservoir"]),
    # Registered, never heard from: no state row at all.
    ("NGPFLEET07", "Prometra II", "", None, 0, []),
]


async def test_the_fleet_is_counted_by_model_and_firmware_with_its_alarms(
    database_url: str,
) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        for serial, model, state_model, firmware, hours, alarms in PUMPS:
            await conn.execute("INSERT INTO pumps (serial, model) VALUES ($1, $2)", serial, model)
            if state_model == "":
                continue
            await conn.execute(
                """INSERT INTO pump_state (serial, msg_id, recorded_at, utc_offset_minutes,
                       received_at, model, volume_ml, capacity_ml, drug_name,
                       concentration_mcg_per_ml, infusion_mode, rate_ml_per_day, alarms,
                       source_firmware)
                   VALUES ($1, gen_random_uuid(), $2, 0, $2, $3, 10, 20, 'baclofen', 2000,
                       'continuous', 0.25, $4, $5)""",
                serial,
                NOW - timedelta(hours=hours),
                state_model,
                alarms,
                firmware,
            )
        rows = [tuple(r) for r in await conn.fetch(FLEET)]
    finally:
        await conn.close()
    # model, firmware, pumps, reporting, silent, with alarms, alarms
    assert rows == [
        ("Prometra II", "3.0.0", 1, 1, 0, 1, ["low_reservoir"]),
        ("Prometra II", "unknown", 2, 0, 2, 0, []),
        ("SynchroMed II 8637-40", "2.4.1", 2, 2, 0, 1, ["motor_stall"]),
        ("SynchroMed II 8637-40", "2.5.0", 2, 1, 1, 2, ["eri"]),
    ]
