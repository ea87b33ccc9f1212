"""Patients and the patient dashboard."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Query, Request, Response, status
from pydantic import TypeAdapter

from services.api import audit, models, sql, views
from services.api import dashboard as fast
from services.api.auth import Principal, require
from services.api.common import (
    Auth,
    Cursor,
    Db,
    Limit,
    clinic_for_write,
    cursor_uuid,
    decode_cursor,
    encode_cursor,
    scope_of,
    visible,
)
from services.api.problems import Problem, not_found
from services.api.routes.pumps import reading_out
from services.domain import rules
from services.domain.alerting import RuleSettings, Snapshot
from services.storage.database import Connection

router = APIRouter(prefix="/v1/patients", tags=["patients"])

SERIES_DAYS = 30


def _no_fleet(role: str) -> None:
    if role == "fleet":
        raise Problem(403, "the fleet role sees no patients", kind="forbidden")


@router.post("", status_code=status.HTTP_201_CREATED, summary="Register a patient")
async def create_patient(
    body: models.PatientIn, principal: Auth, db: Db, request: Request
) -> models.Patient:
    require(principal, "admin", "clinician")
    clinic_id = clinic_for_write(principal, body.clinic_id)
    if not await db.fetchval(sql.CLINIC_EXISTS, clinic_id):
        raise not_found("clinic")
    async with db.transaction():
        row = await db.fetchrow(
            sql.INSERT_PATIENT,
            clinic_id,
            body.mrn,
            body.display_name,
            body.birth_date,
            body.withdrawal_risk,
            body.low_alarm_margin_ml,
        )
        if row is None:
            raise Problem(
                409, f"the clinic already has a patient with MRN {body.mrn!r}", kind="conflict"
            )
        await audit.record(
            db,
            request,
            resource_type="patients",
            resource_id=row["id"],
            clinic_id=clinic_id,
            status=201,
        )
    return views.patient_out(row)


@router.get("", summary="The clinic's patients, by name; `q` searches name and MRN")
async def list_patients(
    principal: Auth,
    db: Db,
    q: Annotated[
        str | None, Query(max_length=200, pattern=r"^[^\x00]*$", examples=["MRN-0042"])
    ] = None,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> models.Page[models.Patient]:
    _no_fleet(principal.role)
    after = decode_cursor(cursor, 2)
    rows = await db.fetch(
        sql.LIST_PATIENTS,
        scope_of(principal),
        q,
        None if after is None else after[0],
        None if after is None else cursor_uuid(after[1]),
        limit + 1,
    )
    items = [views.patient_out(r) for r in rows[:limit]]
    more = len(rows) > limit
    return models.Page(
        items=items,
        next_cursor=encode_cursor(items[-1].display_name, items[-1].id) if more else None,
    )


async def _patient(db: Connection, principal: Principal, patient_id: UUID) -> models.Patient:
    _no_fleet(principal.role)
    row = await db.fetchrow(sql.PATIENT, patient_id)
    if row is None:
        raise not_found("patient")
    visible(principal, row["clinic_id"], "patient")
    return views.patient_out(row)


@router.get("/{patient_id}", summary="A patient")
async def get_patient(patient_id: UUID, principal: Auth, db: Db) -> models.Patient:
    return await _patient(db, principal, patient_id)


@router.get(
    "/{patient_id}/dashboard",
    tags=["dashboard"],
    summary="Everything the clinician's page shows for the patient",
    response_model=None,
    responses={200: {"model": models.Dashboard, "description": "The dashboard"}},
)
async def dashboard(patient_id: UUID, principal: Auth, db: Db) -> Response:
    loaded = await load_dashboard(patient_id, principal, db)
    return Response(dashboard_json(loaded.dashboard, loaded.actual), media_type="application/json")


_POINTS = TypeAdapter(list[models.SeriesPoint])


@dataclass(frozen=True, slots=True)
class LoadedDashboard:
    dashboard: models.Dashboard
    """With ``series.actual`` left empty."""
    actual: bytes
    """The actual series as the JSON array PostgreSQL built."""
    snapshot: Snapshot | None
    """The pump's snapshot the projection came from (None without a pump or readings): from
    a fresh read-model row, a partial one (the newest reading, the last refills and what their
    reconciliation reads), else the whole one."""

    def actual_points(self) -> list[models.SeriesPoint]:
        return _POINTS.validate_json(self.actual)


def dashboard_json(dashboard: models.Dashboard, actual: bytes) -> bytes:
    """The dashboard as JSON, its ``series.actual`` spliced in as the JSON array PostgreSQL
    built (``dashboard`` has it empty). ``series`` is the model's last field."""
    head = dashboard.model_dump_json(exclude={"series"}).encode()
    projected = _POINTS.dump_json(dashboard.series.projected)
    return b"".join(
        (head[:-1], b',"series":{"actual":', actual, b',"projected":', projected, b"}}")
    )


async def load_dashboard(
    patient_id: UUID, principal: Principal, db: Connection, *, series_days: int = SERIES_DAYS
) -> LoadedDashboard:
    """The dashboard, its actual series over the last ``series_days`` as JSON apart."""
    _no_fleet(principal.role)
    now = datetime.now(UTC)
    row = await fast.load(db, patient_id, now - timedelta(days=series_days), now)
    if row["patient_json"] is None:
        raise not_found("patient")
    patient = models.Patient.model_validate(row["patient_json"])
    visible(principal, patient.clinic_id, "patient")
    if row["serial"] is None:
        found = models.Dashboard(
            patient=patient,
            pump=None,
            latest_reading=None,
            open_alerts=[],
            last_refill=None,
            series=models.Series(actual=[], projected=[]),
        )
        return LoadedDashboard(found, b"[]", None)
    serial = row["serial"]
    snapshot = fast.partial_snapshot(row, now)
    if snapshot is not None:  # the read model's forecast, fresh
        pump = views.pump_state(
            row, snapshot, principal, found=(views.row_forecast(row, now), views.row_gaps(row))
        )
    else:  # stale or missing: the whole snapshot, as the engine builds it
        snapshot = (await views.snapshots(db, [serial], now=now)).get(serial)
        pump = views.pump_state(row, snapshot, principal)
    alerts = row["alerts_json"] or []
    last_refill = None
    if snapshot is not None and snapshot.refills:
        settings = snapshot.settings or RuleSettings()
        last_refill = views.refill_out(serial, rules.reconciliations(snapshot)[-1], settings)
    found = models.Dashboard(
        patient=patient,
        pump=pump,
        latest_reading=reading_out(row) if row["recorded_at"] is not None else None,
        open_alerts=[views.alert_out(a, principal) for a in alerts],
        last_refill=last_refill,
        series=models.Series(
            actual=[], projected=[] if snapshot is None else views.projected(snapshot)
        ),
    )
    return LoadedDashboard(found, str(row["series_json"]).encode(), snapshot)
