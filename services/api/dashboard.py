"""The patient dashboard from the alert engine's read model (``pump_forecasts``, migration
0015; services/storage/forecasts.py) in one query (services/api/sql_dashboard.py).

The forecast (volume, rate, low-alarm, empty and worst-case dates, the effective refill deadline
and its reason) is the engine's row when it is fresh: written as of the pump's current version
(no refill, custody, margin or clinic settings change since: the migration's triggers) and from
the pump's newest reading. What moves with the clock (days left, the volume now, the projected
series) and the last refill's reconciliation are computed at the request's time, by the same
domain functions, from a partial snapshot of the pump: its newest reading, its last refills, the
reading before each and the boluses since, the clinic's settings and zone, as the snapshot
loader reads them. A stale or missing row (the engine has not been there since) leaves
:func:`fresh` with None: the caller builds the whole snapshot, as before the read model.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import asyncpg

from services.api import sql_dashboard
from services.domain.alerting import Bolus, RuleSettings, Snapshot
from services.storage import snapshots
from services.storage.database import Connection

REFILLS_KEPT = 3
"""As the API's snapshots keep (services/api/views.py)."""
_BOLUS_FLOOR = timedelta(days=30)
"""Boluses are read back at least this far; a delivery window longer than this (it is hours)
would need older ones: the whole snapshot is then built instead."""


async def load(db: Connection, patient_id: Any, since: datetime, now: datetime) -> asyncpg.Record:
    """The dashboard query's row: the patient (``patient_json``, None: no such patient), the
    unresolved alerts (``alerts_json``) and the patient's pump (``serial`` None: none)."""
    found = await db.fetchrow(
        sql_dashboard.DASHBOARD, patient_id, since, now, REFILLS_KEPT, now - _BOLUS_FLOOR
    )
    assert found is not None  # one row, whatever the patient
    return found


def partial_snapshot(row: asyncpg.Record, now: datetime) -> Snapshot | None:
    """What the dashboard computes at the request's time looks at, as the loader would read it;
    None unless the forecast row is fresh."""
    if not row["forecast_fresh"]:
        return None
    latest = snapshots.reading_of(row)  # the pump's state: its newest reading (the query's note)
    refills = sorted(
        (
            snapshots.refill_of(datetime.fromisoformat(r["recorded_at"]), r["body"])
            for r in row["refills_json"] or ()
        ),
        key=lambda r: r.recorded_at,
    )
    defaults = RuleSettings()
    hours = max(defaults.under_infusion_min_hours, defaults.over_infusion_min_hours) + 24
    window_start = now - timedelta(hours=hours)
    since = (
        min(refills[0].recorded_at, window_start) if refills else now - snapshots.NO_REFILL_LOOKBACK
    )
    if since < row["bolus_floor"]:
        return None
    boluses = sorted(
        (
            Bolus(at, float(b["dose_mcg"]))
            for b in row["boluses_json"] or ()
            if (at := datetime.fromisoformat(b["recorded_at"])) > since
        ),
        key=lambda b: b.recorded_at,
    )
    before = {
        r.recorded_at: r
        for r in (snapshots.reading_of(_timed(j)) for j in row["before_json"] or ())
    }
    before[latest.recorded_at] = latest
    return Snapshot(
        serial=row["serial"],
        now=now,
        settings=snapshots.clinic_settings(defaults, row["alert_settings"], row["clinic_id"]),
        timezone=snapshots.zone_of(row["clinic_timezone"], latest),
        latest=latest,
        recent=tuple(before[at] for at in sorted(before)),
        refills=tuple(refills),
        boluses=tuple(boluses),
    )


def _timed(found: dict[str, Any]) -> dict[str, Any]:
    """A reading's JSON (to_jsonb) with its time as the loader's row has it."""
    return found | {"recorded_at": datetime.fromisoformat(found["recorded_at"])}
