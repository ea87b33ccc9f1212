"""Request and response bodies of the HTTP API (the OpenAPI document is generated from these)."""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Any, Generic, Literal, TypeVar
from uuid import UUID
from zoneinfo import available_timezones

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, JsonValue

from services.domain.alerting import Rule

T = TypeVar("T")


def _storable(value: str) -> str:
    """PostgreSQL text holds neither NUL nor lone surrogates: refuse them here, as a 422."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (no lone surrogates)") from None
    return value


Text = Annotated[str, AfterValidator(_storable), Field(pattern=r"^[^\x00]*$")]
"""Free text from a client."""


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = Field(
        description="Pass as `?cursor=` for the next page; null on the last page."
    )


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- clinics and keys ----------------------------------------------------------------------------


class ClinicAlertSettings(_In):
    """The alert thresholds a clinic may set for itself (the rest are fleet-wide)."""

    refill_due_low_days: float | None = Field(default=None, gt=0, examples=[21.0])
    refill_due_medium_days: float | None = Field(default=None, gt=0, examples=[10.0])
    refill_due_high_days: float | None = Field(default=None, gt=0, examples=[3.0])
    silent_max_days: float | None = Field(default=None, gt=0, examples=[7.0])
    disabled_rules: list[Rule] | None = Field(
        default=None,
        description="Rules switched off for the clinic (high-priority findings still alert).",
        examples=[["dose_escalation"]],
    )


class ClinicIn(_In):
    name: Text = Field(min_length=1, max_length=200, examples=["Spinal Unit North"])
    timezone: str = Field(
        default="UTC",
        max_length=64,
        description="IANA time zone",
        examples=["Europe/Berlin"],
        json_schema_extra={"enum": list[JsonValue](sorted(available_timezones()))},
    )
    alert_settings: ClinicAlertSettings | None = None


class Clinic(BaseModel):
    id: UUID
    name: str
    timezone: str
    alert_settings: dict[str, Any]
    created_at: datetime


class KeyIn(_In):
    role: Literal["clinician", "integrator", "admin", "fleet"] = Field(examples=["clinician"])
    label: Text = Field(default="", max_length=200, examples=["Dr. Weber's tablet"])


class KeyCreated(BaseModel):
    id: UUID
    key: str = Field(description="The key itself: shown this once, stored only as a hash.")
    role: str
    clinic_id: UUID | None


# --- patients and pumps --------------------------------------------------------------------------


class PatientIn(_In):
    clinic_id: UUID | None = Field(
        default=None, description="Implied for clinic keys; required for admin keys."
    )
    mrn: Text = Field(min_length=1, max_length=64, examples=["MRN-0042"])
    display_name: Text = Field(min_length=1, max_length=200, examples=["A. Example"])
    birth_date: date | None = Field(default=None, examples=["1971-04-02"])
    withdrawal_risk: Literal["standard", "high"] = "standard"
    low_alarm_margin_ml: float | None = Field(default=None, ge=0, le=100, examples=[4.0])


class Patient(BaseModel):
    id: UUID
    clinic_id: UUID
    mrn: str
    display_name: str
    birth_date: date | None
    withdrawal_risk: str
    low_alarm_margin_ml: float | None
    created_at: datetime


class PumpIn(_In):
    """Custody of a pump (contract 1.1). Admin and fleet keys provision it to a clinic
    (``clinic_id``, optionally ``patient_id``; both null: nobody's). A clinician assigns or
    moves a pump their clinic holds, or claims one nobody holds with the ``claim_code`` its
    programmer shows."""

    patient_id: UUID | None = Field(
        default=None,
        description="The patient the pump is implanted in (a patient of the pump's clinic); "
        "null: none.",
    )
    clinic_id: UUID | None = Field(
        default=None,
        description="Admin and fleet: the clinic the pump is provisioned to (implied by "
        "`patient_id` when absent). Clinicians: their own clinic, or absent.",
    )
    claim_code: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9]{6,12}$",
        description="The code the pump's programmer shows while it interrogates the pump "
        "(a `claim` event): how a clinic takes custody of a pump nobody holds.",
        examples=["K7Q2M9"],
    )
    model: Text | None = Field(default=None, max_length=100, examples=["SynchroMed II 8637-40"])
    implanted_on: date | None = None


class AppointmentIn(_In):
    scheduled_for: datetime | None = Field(
        description="The booked refill visit (RFC 3339); null clears it.",
        examples=["2026-12-02T09:30:00Z"],
    )


DeadlineReason = Literal["low_alarm", "worst_case", "drug_age", "battery"]


class Forecast(BaseModel):
    volume_ml: float = Field(examples=[17.42])
    low_alarm_ml: float = Field(examples=[2.0])
    rate_ml_per_day: float = Field(examples=[0.25])
    low_alarm_at: datetime | None
    empty_at: datetime | None
    days_to_low_alarm: float | None = Field(examples=[61.7])
    basis: str | None = Field(examples=["calculated"])
    refill_deadline_at: datetime | None = Field(
        description="The effective refill deadline: the earliest of the low-alarm date, the "
        "worst-case empty date, the drug's stability limit in the pump and the battery's stop "
        "after its elective replacement indicator."
    )
    refill_deadline_reason: DeadlineReason | None = Field(examples=["low_alarm"])
    days_to_refill_deadline: float | None = Field(examples=[61.7])
    worst_case_empty_at: datetime | None = Field(
        description="When the reservoir runs empty if the pump has delivered 14.5 % more than "
        "programmed since its volume was last known (the refill, or a measured reading)."
    )


class Therapy(BaseModel):
    drug_name: str = Field(examples=["baclofen"])
    concentration_mcg_per_ml: float = Field(examples=[2000.0])
    infusion_mode: str = Field(examples=["continuous"])
    rate_ml_per_day: float = Field(examples=[0.25])
    daily_dose_mcg: float | None = Field(examples=[500.0])
    schedule: list[dict[str, Any]] | None = None


class UnrecoveredGaps(BaseModel):
    """Telemetry the pump's devices sent and pumpwatch never received: gaps in their sequence
    numbers that backfill asked for and gave up on (``unrecoverable``)."""

    missing_messages: int = Field(examples=[12])
    missing_from: datetime | None = Field(
        description="recorded_at of the last message received before the missing ones "
        "(the earliest over the pump's gaps); null if unknown."
    )
    missing_until: datetime | None = Field(
        description="recorded_at of the first message received after them (the latest); "
        "null if unknown."
    )


class PumpState(BaseModel):
    serial: str = Field(examples=["NGP204519H"])
    model: str | None
    patient_id: UUID | None = Field(description="Null for the fleet role and unassigned pumps.")
    clinic_id: UUID | None
    implanted_on: date | None
    refill_appointment_at: datetime | None
    last_seen_at: datetime | None
    volume_ml: float | None
    volume_now_ml: float | None = Field(description="Projected to now at the programmed rate.")
    capacity_ml: float | None
    low_alarm_ml: float | None
    basis: str | None
    therapy: Therapy | None
    measured_flow_ml_per_day: float | None
    battery_pct: float | None
    battery_status: str | None
    alarms: list[str]
    forecast: Forecast | None
    unrecovered_gaps: UnrecoveredGaps | None = Field(
        default=None,
        description="Messages lost for good (contract 1.1, backfill gave up); null: none.",
    )


class ReadingOut(BaseModel):
    msg_id: UUID
    recorded_at: datetime
    received_at: datetime
    volume_ml: float
    capacity_ml: float
    low_alarm_ml: float | None
    basis: str | None
    drug_name: str
    concentration_mcg_per_ml: float
    infusion_mode: str
    rate_ml_per_day: float
    daily_dose_mcg: float | None
    measured_flow_ml_per_day: float | None
    battery_pct: float | None
    battery_status: str | None
    alarms: list[str]
    seq: int | None = None
    source_kind: str | None = None
    source_id: str | None = None


class Bucket(BaseModel):
    """One UTC hour of readings, averaged."""

    hour: datetime
    readings: int
    volume_ml: float
    volume_ml_min: float
    volume_ml_max: float
    last_volume_ml: float
    measured_flow_ml_per_day: float | None
    rate_ml_per_day: float


# --- refills -------------------------------------------------------------------------------------


class RefillBody(_In):
    residual_ml: float = Field(ge=0, allow_inf_nan=False, examples=[3.1])
    added_ml: float = Field(gt=0, allow_inf_nan=False, examples=[20.0])
    drug: Text = Field(min_length=1, max_length=100, examples=["baclofen"])
    concentration_mcg_per_ml: float = Field(gt=0, allow_inf_nan=False, examples=[2000.0])
    expected_residual_ml: float | None = Field(default=None, ge=0, allow_inf_nan=False)


class RefillIn(_In):
    """The MQTT `refill` event's body, with the same optional common fields."""

    refill: RefillBody
    recorded_at: datetime | None = Field(
        default=None, description="When the refill happened (RFC 3339 with offset); default now."
    )
    msg_id: UUID | None = Field(
        default=None,
        description="Idempotency key: a refill re-sent with the same id is recorded once.",
    )
    v: Literal[1] | None = None
    serial: Text | None = Field(default=None, description="If given, must equal the path's.")
    type: Literal["refill"] | None = None


class DiscrepancyOut(BaseModel):
    expected_residual_ml: float
    actual_residual_ml: float
    delta_ml: float
    relative: float | None
    classification: Literal["none", "over_delivery", "under_delivery"]
    limit_ml: float = Field(
        description="The absolute threshold for this pump's size (1 mL for a 20 mL pump, 2 mL "
        "for a 40 mL pump by default); the relative one (14.5 % of what should have been "
        "delivered) applies too."
    )
    expected_from: str = Field(description="`pump`, `computed` or `last_reading`.")


class RefillOut(BaseModel):
    msg_id: UUID | None = None
    serial: str
    recorded_at: datetime
    residual_ml: float
    added_ml: float
    drug: str
    concentration_mcg_per_ml: float
    discrepancy: DiscrepancyOut | None = Field(
        description="Null when nothing says what was expected (a first refill, no readings)."
    )


# --- alerts --------------------------------------------------------------------------------------


class Actor(BaseModel):
    """Who did it: a person (`user`: `display_name`), a key (`key`: `label`), or one of
    pumpwatch's services (`service`: the alert engine, `pumpwatch-alerts`)."""

    type: Literal["user", "key", "service"] = Field(examples=["user"])
    id: str = Field(examples=["6f1c2b0e-8d1a-4f5e-9a51-3c0f1b7e2d44"])
    display_name: str | None = Field(default=None, examples=["Nora Nurse"])
    label: str | None = Field(default=None, examples=["EHR integration"])


class AlertOut(BaseModel):
    id: UUID
    serial: str
    patient_id: UUID | None
    clinic_id: UUID | None
    rule: str = Field(
        examples=["refill_due"],
        description="The stage of the condition that holds (it moves as the condition worsens: "
        "reservoir_low then reservoir_empty, battery_eri then battery_eos).",
    )
    condition: str = Field(
        examples=["reservoir"],
        description="What the alert is about, stable for its life: `reservoir`, `battery`, or "
        "the rule's own code. One condition, one alert.",
    )
    priority: Literal["low", "medium", "high"]
    status: Literal["open", "acknowledged", "resolved"]
    title: str = Field(examples=["Refill due in 6 days"])
    detail: str
    facts: dict[str, Any]
    opened_at: datetime
    updated_at: datetime
    acknowledged_at: datetime | None
    acknowledged_by: Actor | None
    resolved_at: datetime | None
    resolved_by: Actor | None
    resolution: str | None
    snoozed_until: datetime | None = Field(
        default=None, description="Re-notification waits until then (a person snoozed it)."
    )
    snoozed_by: Actor | None = None
    snooze_note: str | None = None


class HistoryEntry(BaseModel):
    at: datetime
    actor: Actor
    action: str
    from_status: str | None
    to_status: str
    from_priority: str | None
    to_priority: str
    reason: str


class AlertDetail(AlertOut):
    history: list[HistoryEntry]
    notifications: list[dict[str, Any]] = Field(
        description="Deliveries of this alert's changes: channel, target, status, attempts."
    )


class NoteIn(_In):
    note: Text | None = Field(default=None, max_length=2000)


class SnoozeIn(_In):
    until: datetime = Field(
        description="No re-notification (escalation) until then: at most 24 h ahead, 4 h for a "
        "high priority alert (RFC 3339).",
        examples=["2026-12-07T12:00:00Z"],
    )
    note: Text = Field(min_length=1, max_length=2000, examples=["Patient called, refill at 11"])


# --- worklist and dashboard ----------------------------------------------------------------------


class WorklistItem(BaseModel):
    serial: str
    patient: Patient | None
    model: str | None
    volume_now_ml: float | None
    low_alarm_at: datetime | None
    days_left: float | None = Field(description="Days to the low-alarm volume.")
    refill_deadline_at: datetime | None = Field(
        description="The effective refill deadline (the worklist's order)."
    )
    refill_deadline_reason: DeadlineReason | None
    days_to_refill_deadline: float | None
    drug_name: str | None
    concentration_mcg_per_ml: float | None
    rate_ml_per_day: float | None
    last_refill_at: datetime | None
    refill_appointment_at: datetime | None
    open_alerts: list[AlertOut]


class SeriesPoint(BaseModel):
    at: datetime
    volume_ml: float


class Series(BaseModel):
    actual: list[SeriesPoint] = Field(description="Hourly averages of the last 30 days.")
    projected: list[SeriesPoint] = Field(
        description="From the latest reading forward at the programmed rate, daily, 30 days."
    )


class Dashboard(BaseModel):
    patient: Patient
    pump: PumpState | None
    latest_reading: ReadingOut | None
    open_alerts: list[AlertOut]
    last_refill: RefillOut | None
    series: Series


# --- webhooks and quarantine ---------------------------------------------------------------------

WebhookEvent = Literal[
    "alert.opened",
    "alert.escalated",
    "alert.eased",
    "alert.acknowledged",
    "alert.resolved",
    "alert.unacknowledged",
    "alert.assigned",
    "refill.recorded",
    "webhook.disabled",
    "delivery.failed",
]


class WebhookIn(_In):
    url: Text = Field(max_length=2000, examples=["https://ehr.example.org/hooks/pumpwatch"])
    events: list[WebhookEvent] = Field(min_length=1, examples=[["alert.opened", "alert.escalated"]])
    clinic_id: UUID | None = Field(default=None, description="Admin keys only.")


class RotateIn(_In):
    overlap_hours: float = Field(
        default=24.0,
        ge=0,
        le=24 * 14,
        description="How long the old secret keeps signing too (receivers switch meanwhile).",
    )


class WebhookOut(BaseModel):
    id: UUID
    clinic_id: UUID
    url: str
    events: list[str]
    created_at: datetime
    disabled_at: datetime | None
    disabled_reason: str | None


class WebhookCreated(WebhookOut):
    secret: str = Field(description="Signing secret (Standard Webhooks `whsec_…`): shown once.")


class QuarantineItem(BaseModel):
    id: int
    topic: str
    reason: str
    detail: str
    payload_bytes: int
    first_received_at: datetime
    last_received_at: datetime
    occurrences: int
    excerpt: str = Field(description="The first 2 KiB of the payload, undecodable bytes replaced.")


# --- people --------------------------------------------------------------------------------------

UserRole = Literal["clinician", "clinic_admin", "admin", "fleet"]
Email = Annotated[
    str,
    Field(
        min_length=3,
        max_length=254,
        pattern=r"^[^@\s]+@[^@\s]+$",
        examples=["nora.nurse@clinic.example"],
    ),
]
Password = Annotated[str, Field(min_length=1, max_length=200, examples=["correct horse battery"])]


class UserIn(_In):
    email: Email
    display_name: Text = Field(min_length=1, max_length=200, examples=["Nora Nurse"])
    role: UserRole = Field(examples=["clinician"])
    clinic_id: UUID | None = Field(
        default=None,
        description="The clinic of `clinician` and `clinic_admin` (implied for a "
        "clinic administrator's own); none for `admin` and `fleet`.",
    )
    password: Password | None = Field(
        default=None,
        description="An initial password; without it the answer carries a one-time "
        "`invitation_url` (also emailed when SMTP is set).",
    )


class UserPatch(_In):
    display_name: Text | None = Field(default=None, min_length=1, max_length=200)
    role: UserRole | None = None
    clinic_id: UUID | None = None


class User(BaseModel):
    id: UUID
    email: str
    display_name: str
    role: UserRole
    clinic_id: UUID | None
    created_at: datetime
    created_by: str
    active: bool
    deactivated_at: datetime | None


class UserCreated(User):
    invitation_url: str | None = Field(
        default=None,
        description="Where the person chooses a password: works once, for 72 h (no `password` "
        "given). Shown this once.",
    )
    invitation_expires_at: datetime | None = None


class Invitation(BaseModel):
    invitation_url: str = Field(description="Works once, until `expires_at`. Shown this once.")
    expires_at: datetime


class TokenOut(BaseModel):
    access_token: str = Field(description="Use as `Authorization: Bearer <token>`.")
    token_type: Literal["bearer"] = "bearer"  # noqa: S105 - OAuth2's token type
    expires_in: int = Field(description="Seconds until the token ends (it also idles out).")


class PasswordChangeIn(_In):
    current_password: Password
    new_password: Password


class PasswordResetIn(_In):
    email: Email


class SetPasswordIn(_In):
    token: str = Field(min_length=10, max_length=200, description="The link's token.")
    password: Password
