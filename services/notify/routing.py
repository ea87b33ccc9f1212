"""Which deliveries an outbox event becomes, by the clinic's routing. Pure functions.

- Webhooks: each of the clinic's active webhooks subscribed to the event; alert events only for
  the priorities in ``webhook_priorities``.
- MQTT: alert events for the priorities in ``mqtt_priorities`` to ``clinics/{id}/alerts``.
- Email: alert events listed in ``email.events`` to the addresses of the alert's priority;
  ``alert.unacknowledged`` also to the escalation contacts. Low-priority alerts are folded into
  the daily digest instead (``digest.fold_low_priority``, on by default, while the digest is
  on). Events about the notifications themselves (a webhook disabled, a delivery failed) go to
  the admin contacts.
- Quiet hours delay low-priority deliveries on their channels until they end; high and medium
  priority are never delayed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, tzinfo
from typing import Any

from services.domain.notifications import (
    ADMIN_EVENTS,
    ALERT_EVENTS,
    ALL_PRIORITIES,
    Channel,
    NotificationSettings,
    PriorityLabel,
    in_quiet_hours,
    quiet_hours_end,
)


@dataclass(frozen=True, slots=True)
class Event:
    """An outbox row."""

    outbox_id: int
    created_at: datetime
    event: str
    alert_id: str | None
    clinic_id: str | None
    payload: dict[str, Any]

    @property
    def priority(self) -> PriorityLabel | None:
        if self.event not in ALERT_EVENTS:
            return None
        value = self.payload.get("priority")
        for label in ALL_PRIORITIES:
            if value == label:
                return label
        return None


@dataclass(frozen=True, slots=True)
class WebhookTarget:
    id: str
    url: str
    events: frozenset[str]


@dataclass(frozen=True, slots=True)
class Planned:
    channel: Channel
    target: str
    due_at: datetime
    webhook_id: str | None = None


def message_id(*parts: object) -> str:
    """A stable message id (``webhook-id``) from what identifies a delivery: making the same
    delivery twice gives the same id, which the database keeps once."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()
    return f"msg_{digest[:32]}"


def plan(
    event: Event,
    settings: NotificationSettings,
    *,
    webhooks: list[WebhookTarget],
    mqtt_topic: str | None,
    tz: tzinfo,
    now: datetime,
) -> list[Planned]:
    """The deliveries of one event at ``now`` (``mqtt_topic`` None: no MQTT)."""
    priority = event.priority
    is_alert = event.event in ALERT_EVENTS
    out: list[Planned] = []
    for hook in webhooks:
        if event.event not in hook.events:
            continue
        if is_alert and priority not in settings.webhook_priorities:
            continue
        out.append(Planned("webhook", hook.url, now, hook.id))
    if is_alert and mqtt_topic is not None and priority in settings.mqtt_priorities:
        out.append(Planned("mqtt", mqtt_topic, now))
    for address in email_recipients(event, settings):
        out.append(Planned("email", address, now))
    quiet = settings.quiet_hours
    if priority == "low" and quiet is not None and in_quiet_hours(quiet, now, tz):
        end = quiet_hours_end(quiet, now, tz)
        out = [
            Planned(p.channel, p.target, end, p.webhook_id) if p.channel in quiet.channels else p
            for p in out
        ]
    return _unique(out)


def email_recipients(event: Event, settings: NotificationSettings) -> list[str]:
    if event.event in ADMIN_EVENTS:
        return list(dict.fromkeys(settings.admin_emails))
    priority = event.priority
    if event.event not in settings.email.events or priority is None:
        return []
    if priority == "low" and folded(settings):
        return []
    recipients = settings.email.recipients(priority)
    if event.event == "alert.unacknowledged":
        recipients += settings.escalation.contacts
    return list(dict.fromkeys(recipients))


def folded(settings: NotificationSettings) -> bool:
    """Low-priority alert emails go into the daily digest instead of one message each."""
    return settings.digest.enabled and settings.digest.fold_low_priority


def _unique(planned: list[Planned]) -> list[Planned]:
    seen: set[tuple[str, str, str | None]] = set()
    out = []
    for p in planned:
        key = (p.channel, p.target.lower() if p.channel == "email" else p.target, p.webhook_id)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out
