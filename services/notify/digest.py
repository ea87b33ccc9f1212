"""The daily digest: per clinic, one email a day at the clinic's local ``digest.hour`` to the
digest recipients, listing the pumps whose reservoir reaches its low alarm within the horizon
(the forecast the refill rules use, ``services.domain.rules.pump_forecast``, as the alert engine
keeps it in the read model ``pump_forecasts``; a pump it has not evaluated since it changed is
forecast here from its snapshot) and the open low-priority alerts (whose emails the digest
replaces when ``fold_low_priority``).

Made at most once per clinic, local day and recipient: the deliveries' idempotency keys say so,
whichever instance makes it and however often it looks. A digest due while the service was
down is made when it starts (the same local day).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta, tzinfo
from typing import Any

import asyncpg

from services.domain import rules, therapy
from services.domain.alerting import RuleSettings
from services.domain.notifications import Digest, NotificationSettings
from services.notify import sql
from services.notify.render import (
    DigestAlert,
    DigestRefill,
    EmailContent,
    PatientRef,
    digest_email,
)
from services.notify.routing import message_id
from services.storage import forecasts
from services.storage.database import Connection
from services.storage.snapshots import load

_LOAD_BATCH = 500


def digest_day(digest: Digest, now: datetime, tz: tzinfo) -> date | None:
    """The local day whose digest is due at ``now``, or None (off, or before the hour)."""
    if not digest.enabled:
        return None
    local = now.astimezone(tz)
    return local.date() if local.hour >= digest.hour else None


def digest_key(clinic_id: str, day: date, address: str) -> str:
    return message_id("digest", clinic_id, day.isoformat(), address.lower())


@dataclass(frozen=True, slots=True)
class DigestMessage:
    content: EmailContent
    data: dict[str, Any]


async def compose(
    conn: Connection,
    *,
    clinic_id: str,
    clinic_name: str,
    settings: NotificationSettings,
    tz: tzinfo,
    day: date,
    now: datetime,
    rule_settings: RuleSettings,
) -> DigestMessage:
    horizon = settings.digest.horizon_days
    until = now + timedelta(days=horizon)
    names = settings.email.patient_names
    refills = [
        DigestRefill(
            serial=r["serial"],
            patient=PatientRef(r["display_name"], r["mrn"]) if names else None,
            low_alarm_at=r["low_alarm_at"],
            days_to_low_alarm=therapy.days_until(r["low_alarm_at"], now),
            volume_ml=forecasts.volume_now_ml(
                r["volume_ml"], r["state_at"], r["therapy"], r["zone"], now
            )
            or 0.0,
            low_alarm_ml=r["low_alarm_ml"],
            visit_at=r["refill_appointment_at"],
        )
        for r in await conn.fetch(sql.DIGEST_FORECASTS, clinic_id, until)
    ]
    # Pumps the engine has not evaluated since they changed: forecast here.
    serials = [r["serial"] for r in await conn.fetch(sql.DIGEST_STALE, clinic_id)]
    for start in range(0, len(serials), _LOAD_BATCH):
        batch = serials[start : start + _LOAD_BATCH]
        patients = {r["serial"]: r for r in await conn.fetch(sql.PUMP_PATIENTS, batch)}
        loaded = await load(conn, batch, now=now, wall_now=now, settings=rule_settings)
        for serial, (snapshot, _) in loaded.items():
            forecast = rules.pump_forecast(snapshot)
            if forecast is None or forecast.low_alarm_at is None or forecast.low_alarm_at > until:
                continue
            who = patients.get(serial)
            refills.append(
                DigestRefill(
                    serial=serial,
                    patient=PatientRef(who["display_name"], who["mrn"]) if who and names else None,
                    low_alarm_at=forecast.low_alarm_at,
                    days_to_low_alarm=forecast.days_to_low_alarm(now) or 0.0,
                    volume_ml=rules.volume_now_ml(snapshot) or 0.0,
                    low_alarm_ml=forecast.low_alarm_ml,
                    visit_at=None if who is None else who["refill_appointment_at"],
                )
            )
    refills.sort(key=lambda r: (r.low_alarm_at, r.serial))
    alerts = [
        DigestAlert(
            serial=r["serial"],
            patient=PatientRef(r["display_name"], r["mrn"])
            if names and r["display_name"] is not None
            else None,
            title=r["title"],
            rule=r["rule"],
            opened_at=r["opened_at"],
        )
        for r in await conn.fetch(sql.OPEN_LOW_ALERTS, clinic_id)
    ]
    content = digest_email(
        clinic_name=clinic_name,
        day=day,
        tz=tz,
        horizon_days=horizon,
        refills=refills,
        alerts=alerts,
    )
    data = {
        "clinic_id": clinic_id,
        "date": day.isoformat(),
        "horizon_days": horizon,
        "refills": [
            {
                "serial": r.serial,
                "low_alarm_at": r.low_alarm_at.isoformat(),
                "days_to_low_alarm": round(r.days_to_low_alarm, 2),
                "refill_appointment_at": None if r.visit_at is None else r.visit_at.isoformat(),
            }
            for r in refills
        ],
        "low_alerts": [{"serial": a.serial, "rule": a.rule, "title": a.title} for a in alerts],
    }
    return DigestMessage(content, data)


async def made(pool: asyncpg.Pool, keys: list[str]) -> bool:
    """Whether every one of these digest deliveries exists already."""
    count = await pool.fetchval(sql.DIGEST_DELIVERIES, keys)
    return int(count) >= len(keys)
