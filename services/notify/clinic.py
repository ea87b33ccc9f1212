"""What the notification worker reads of a clinic's row: its routing and its time zone, each
falling back to a default (and logged) when what is stored is not usable."""

from __future__ import annotations

from datetime import UTC, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from services.domain.notifications import NotificationSettings
from services.logs import get

log = get(__name__)


def zone(name: str | None) -> tzinfo:
    if name:
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            log.error("clinic_timezone_unknown", timezone=name)
    return UTC


def clinic_settings(value: dict[str, Any] | None, clinic_id: object) -> NotificationSettings:
    """The clinic's routing; invalid stored JSON falls back to the defaults (and is logged):
    webhooks and MQTT still go out."""
    try:
        return NotificationSettings.stored(value)
    except ValueError as exc:
        log.error("notification_settings_invalid", clinic_id=str(clinic_id), error=str(exc))
        return NotificationSettings()
