"""How a clinic wants to be told: routing of alert notifications per priority and channel,
escalation of unacknowledged high alerts, quiet hours and the daily refill digest. Pure code.

Stored per clinic as ``clinics.notification_settings`` (JSON, validated by
:class:`NotificationSettings`; ``{}`` means every default). The HTTP API serves it at
``GET/PUT /v1/clinics/{id}/notifications``; the notification worker of ``pumpwatch alerts``
routes every outbox event by it.

Times of day are the clinic's local time (``clinics.timezone``): :func:`in_quiet_hours` and
:func:`quiet_hours_end` convert with the zone's rules, so quiet hours that span midnight or a
daylight-saving shift end at the right instant.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, time, timedelta, tzinfo
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

PriorityLabel = Literal["high", "medium", "low"]
Channel = Literal["webhook", "email", "mqtt"]
ALL_PRIORITIES: tuple[PriorityLabel, ...] = ("high", "medium", "low")

ALERT_EVENTS: frozenset[str] = frozenset(
    {
        "alert.opened",
        "alert.escalated",
        "alert.eased",
        "alert.acknowledged",
        "alert.resolved",
        "alert.unacknowledged",
        "alert.assigned",
    }
)
"""Events about one alert; the outbox row carries the alert object as payload.
``alert.unacknowledged``: a high alert nobody acknowledged in time, re-sent (escalation).
``alert.assigned``: an unresolved alert is now this clinic's and patient's, because its pump was
provisioned, claimed, assigned or moved to them."""
WEBHOOK_EVENTS: frozenset[str] = ALERT_EVENTS | {
    "refill.recorded",
    "webhook.disabled",
    "delivery.failed",
}
"""Every event a webhook may subscribe to (``webhooks.events``)."""
ADMIN_EVENTS: frozenset[str] = frozenset({"webhook.disabled", "delivery.failed"})
"""Events about the notifications themselves: emailed to the clinic's admin contacts."""

EmailAddress = Annotated[
    str,
    StringConstraints(
        strip_whitespace=True,
        max_length=254,
        # no spaces, controls (NUL included), quotes or list separators
        pattern=r"^[^@\s\x00-\x1f\x7f<>,;\"]+@[^@\s\x00-\x1f\x7f<>,;\"]+\.[^@\s\x00-\x1f\x7f<>,;\"]+$",
    ),
]


class EmailRouting(BaseModel):
    """Who is emailed about alerts, by the alert's priority."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    high: list[EmailAddress] = Field(
        default_factory=list,
        description="Addresses emailed about high-priority alerts (always at once).",
    )
    medium: list[EmailAddress] = Field(
        default_factory=list, description="Addresses emailed about medium-priority alerts."
    )
    low: list[EmailAddress] = Field(
        default_factory=list,
        description="Addresses emailed about low-priority alerts (unless folded into the "
        "daily digest, see `digest.fold_low_priority`).",
    )
    events: list[str] = Field(
        default_factory=lambda: [
            "alert.opened",
            "alert.escalated",
            "alert.unacknowledged",
            "alert.assigned",
        ],
        description="Which alert events are emailed. `alert.unacknowledged` (a high alert "
        "not acknowledged in time) goes to the high-priority addresses and the escalation "
        "contacts.",
    )
    patient_names: bool = Field(
        default=True,
        description="Name the patient in the body of alert emails (never in the subject).",
    )

    def recipients(self, priority: PriorityLabel) -> list[str]:
        return list({"high": self.high, "medium": self.medium, "low": self.low}[priority])

    @model_validator(mode="after")
    def _known_events(self) -> EmailRouting:
        unknown = set(self.events) - ALERT_EVENTS
        if unknown:
            raise ValueError(f"unknown alert events: {sorted(unknown)}")
        return self


class Escalation(BaseModel):
    """Re-sending a high-priority alert that nobody acknowledged."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(default=True, description="Re-send unacknowledged high alerts.")
    contacts: list[EmailAddress] = Field(
        default_factory=list,
        description="Escalation contacts: emailed (with the high-priority addresses) when a "
        "high alert is not acknowledged in time.",
    )
    after_minutes: float = Field(
        default=15.0,
        gt=0,
        le=7 * 24 * 60,
        description="A high alert still open (not acknowledged, not resolved) this long after "
        "it opened or became high is re-sent and escalated.",
    )
    repeat_minutes: float = Field(
        default=15.0,
        gt=0,
        le=7 * 24 * 60,
        description="Then again at this interval until it is acknowledged or resolved.",
    )


def _email_only() -> list[Channel]:
    return ["email"]


class QuietHours(BaseModel):
    """Hours of the clinic's day when low-priority notifications wait (high and medium never
    do). ``start`` after ``end`` spans midnight (22:00 to 07:00)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    start: time = Field(description="Local time quiet hours begin (inclusive), e.g. 22:00.")
    end: time = Field(description="Local time they end (exclusive), e.g. 07:00.")
    channels: list[Channel] = Field(
        default_factory=_email_only,
        description="Channels whose low-priority notifications wait until the end.",
    )

    @model_validator(mode="after")
    def _not_empty(self) -> QuietHours:
        if self.start == self.end:
            raise ValueError("quiet hours must not start and end at the same time")
        if self.start.tzinfo is not None or self.end.tzinfo is not None:
            raise ValueError("quiet hours are local times of the clinic: no UTC offset")
        return self


class Digest(BaseModel):
    """One email a day: the refills due within the horizon and the open low-priority alerts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(default=True, description="Send the daily refill digest.")
    hour: int = Field(
        default=7, ge=0, le=23, description="Local hour of the day the digest is sent."
    )
    recipients: list[EmailAddress] | None = Field(
        default=None,
        description="Who receives it; when null, the low-priority alert addresses.",
    )
    horizon_days: float = Field(
        default=7.0,
        gt=0,
        le=90,
        description="Refills listed: pumps whose reservoir reaches its low alarm within this "
        "many days.",
    )
    fold_low_priority: bool = Field(
        default=True,
        description="Low-priority alerts are not emailed one by one but listed in the digest.",
    )

    def to(self, email: EmailRouting) -> list[str]:
        return list(self.recipients if self.recipients is not None else email.low)


_EXAMPLE: dict[str, Any] = {
    "email": {
        "high": ["oncall@spinal-unit.example"],
        "medium": ["itb-nurses@spinal-unit.example"],
        "low": ["itb-nurses@spinal-unit.example"],
    },
    "webhook_priorities": ["high", "medium", "low"],
    "mqtt_priorities": ["high", "medium"],
    "admin_emails": ["it@spinal-unit.example"],
    "escalation": {
        "contacts": ["consultant@spinal-unit.example"],
        "after_minutes": 15,
        "repeat_minutes": 15,
    },
    "quiet_hours": {"start": "22:00", "end": "07:00", "channels": ["email"]},
    "digest": {"hour": 7, "fold_low_priority": True},
}


class NotificationSettings(BaseModel):
    """A clinic's notification routing (``clinics.notification_settings``; ``{}`` is every
    default: no email recipients, webhooks and MQTT for all priorities, escalation after 15
    minutes, a digest at 07:00 to the low-priority addresses)."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, json_schema_extra={"examples": [_EXAMPLE]}
    )

    email: EmailRouting = Field(
        default_factory=EmailRouting, description="Email recipients by alert priority."
    )
    webhook_priorities: list[PriorityLabel] = Field(
        default_factory=lambda: list(ALL_PRIORITIES),
        description="Alert priorities sent to the clinic's webhooks (each webhook also "
        "chooses its events).",
    )
    mqtt_priorities: list[PriorityLabel] = Field(
        default_factory=lambda: list(ALL_PRIORITIES),
        description="Alert priorities published to MQTT `clinics/{clinic_id}/alerts`.",
    )
    admin_emails: list[EmailAddress] = Field(
        default_factory=list,
        description="The clinic's admin contacts: told when a notification could not be "
        "delivered or a webhook was disabled.",
    )
    escalation: Escalation = Field(
        default_factory=Escalation, description="Unacknowledged high alerts."
    )
    quiet_hours: QuietHours | None = Field(
        default=None, description="When low-priority notifications wait; null: never."
    )
    digest: Digest = Field(default_factory=Digest, description="The daily refill digest.")

    @classmethod
    def stored(cls, value: dict[str, Any] | None) -> NotificationSettings:
        """From the JSON column (``{}`` or NULL: the defaults); raises ValueError if invalid."""
        return cls.model_validate(value or {})


# -- quiet hours -------------------------------------------------------------------------------


def in_quiet_hours(quiet: QuietHours, at: datetime, tz: tzinfo) -> bool:
    """Whether the clinic's local clock at ``at`` is within [start, end)."""
    local = _local_time(at, tz)
    if quiet.start < quiet.end:
        return quiet.start <= local < quiet.end
    return local >= quiet.start or local < quiet.end  # spans midnight


def quiet_hours_end(quiet: QuietHours, at: datetime, tz: tzinfo) -> datetime:
    """The first instant after ``at`` at which the local clock reaches ``quiet.end`` (UTC).
    A local time that a daylight-saving shift skips is reached when the clock jumps past it;
    one it repeats, the first time."""
    local_date = at.astimezone(tz).date()
    for days in range(3):
        day = local_date + timedelta(days=days)
        candidate = _first_reaching(datetime.combine(day, quiet.end), tz)
        if candidate > at:
            return candidate
    raise AssertionError("a local time of day recurs within three days")


def _local_time(at: datetime, tz: tzinfo) -> time:
    if at.tzinfo is None:
        raise ValueError("datetimes must be timezone-aware")
    return at.astimezone(tz).time().replace(tzinfo=None)


def _first_reaching(wall: datetime, tz: tzinfo) -> datetime:
    """The first UTC instant whose local wall clock in ``tz`` is at or after ``wall``
    (naive) on its day: the wall time itself, its first occurrence if repeated, or the
    shift that skips it."""
    early = wall.replace(tzinfo=tz, fold=0).astimezone(UTC)
    late = wall.replace(tzinfo=tz, fold=1).astimezone(UTC)
    low, high = min(early, late), max(early, late)
    if _wall(low, tz) >= wall:
        return low  # exists (once, or first of two)
    # Skipped: between the two readings lies the shift; find it, to the second.
    low_s, high_s = math.floor(low.timestamp()), math.ceil(high.timestamp())
    while high_s - low_s > 1:
        middle = (low_s + high_s) // 2
        if _wall(datetime.fromtimestamp(middle, UTC), tz) >= wall:
            high_s = middle
        else:
            low_s = middle
    return datetime.fromtimestamp(high_s, UTC)


def _wall(at: datetime, tz: tzinfo) -> datetime:
    return at.astimezone(tz).replace(tzinfo=None)
