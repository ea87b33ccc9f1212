"""The worklist's JSON answer as plain values (worklist.page_json): typed dicts of the shape of
``models.Page[models.WorklistItem]``, field for field and in the same order, so that pydantic
serialises them exactly as it does the models (tests/test_worklist_json.py compares the two)
without validating every row, alert and patient into a model first."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any, cast
from uuid import UUID

from pydantic import TypeAdapter
from typing_extensions import TypedDict

from services.api import models


class Actor(TypedDict):
    type: str
    id: str
    display_name: str | None
    label: str | None


class Alert(TypedDict):
    id: UUID
    serial: str
    patient_id: UUID | None
    clinic_id: UUID | None
    rule: str
    condition: str
    priority: str
    status: str
    title: str
    detail: str
    facts: dict[str, Any]
    opened_at: datetime
    updated_at: datetime
    acknowledged_at: datetime | None
    acknowledged_by: Actor | None
    resolved_at: datetime | None
    resolved_by: Actor | None
    resolution: str | None
    snoozed_until: datetime | None
    snoozed_by: Actor | None
    snooze_note: str | None


class Patient(TypedDict):
    id: UUID
    clinic_id: UUID
    mrn: str
    display_name: str
    birth_date: date | None
    withdrawal_risk: str
    low_alarm_margin_ml: float | None
    created_at: datetime


class Item(TypedDict):
    serial: str
    patient: Patient | None
    model: str | None
    volume_now_ml: float | None
    low_alarm_at: datetime | None
    days_left: float | None
    refill_deadline_at: datetime | None
    refill_deadline_reason: str | None
    days_to_refill_deadline: float | None
    drug_name: str | None
    concentration_mcg_per_ml: float | None
    rate_ml_per_day: float | None
    last_refill_at: datetime | None
    refill_appointment_at: datetime | None
    open_alerts: list[Alert]


class Page(TypedDict):
    items: list[Item]
    next_cursor: str | None


PAGE: TypeAdapter[Page] = TypeAdapter(Page)

PATIENT_FIELDS = tuple(Patient.__annotations__)
"""The order of a patient's columns as the worklist carries them (``_Due.patient_row``)."""
_ALERT_FIELDS = tuple(Alert.__annotations__)
"""The order of WORKLIST_ALERTS's columns and of the joined alert records."""
_ACTOR_FIELDS = tuple(Actor.__annotations__)

MIRRORS = (
    (Actor, models.Actor),
    (Alert, models.AlertOut),
    (Patient, models.Patient),
    (Item, models.WorklistItem),
)
"""Each typed dict and the model it mirrors (a test checks their fields)."""


def patient(row: Any) -> Patient | None:
    """A patient's columns (PATIENT_FIELDS's order), or None."""
    return None if row is None else cast(Patient, dict(zip(PATIENT_FIELDS, row, strict=True)))


def _actor(found: dict[str, Any] | None) -> Actor | None:
    return None if found is None else cast(Actor, {k: found.get(k) for k in _ACTOR_FIELDS})


def alert(row: Any, people: bool) -> Alert:
    """views.alert_out's object as plain values (``row``: WORKLIST_ALERTS's columns, by
    position): for the fleet role without people or their free text."""
    found: dict[str, Any] = dict(zip(_ALERT_FIELDS, row, strict=True))
    resolver = found["resolved_by"]
    by_engine = resolver is None or resolver.get("type") == "service"
    found["facts"] = found["facts"] or {}
    found["acknowledged_by"] = _actor(found["acknowledged_by"]) if people else None
    found["resolved_by"] = _actor(resolver) if people or by_engine else None
    if not (people or by_engine):
        found["resolution"] = None
    if people:
        found["snoozed_by"] = _actor(found["snoozed_by"])
    else:
        found["patient_id"] = None
        found["snoozed_by"] = None
        found["snooze_note"] = None
    return cast(Alert, found)
