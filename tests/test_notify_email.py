"""Email notifications through a real SMTP server (aiosmtpd): content, recipients by priority,
quiet hours, escalation contacts, the daily digest."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from services.notify.channel import Message
from services.notify.email import EmailSender
from services.notify.settings import parse_smtp_url
from tests.notify_support import (
    PATIENT_NAME,
    Mail,
    add_pump,
    clinic_with_pump,
    days_left,
    evaluate,
    pool_for,
    running,
    settings,
    smtp_sink,
    stall,
)

SERIAL = "NGP600001A"
ROUTING: dict[str, Any] = {
    "email": {
        "high": ["oncall@clinic.example"],
        "medium": ["nurses@clinic.example"],
        "low": ["nurses@clinic.example", "planner@clinic.example"],
    },
    "digest": {"enabled": False},
}


async def settled(pool: asyncpg.Pool) -> bool:
    return bool(
        await pool.fetchval(
            "SELECT (SELECT count(*) FROM outbox WHERE dispatched_at IS NULL) = 0 "
            "AND (SELECT count(*) FROM deliveries WHERE status = 'pending') = 0"
        )
    )


async def test_a_high_alert_email_has_text_and_html_and_no_patient_name_in_the_subject(
    database_url: str,
) -> None:
    async with pool_for(database_url) as pool:
        with smtp_sink() as smtp:
            await clinic_with_pump(pool, SERIAL, notification_settings=ROUTING)
            async with running(pool, settings(database_url, smtp_url=smtp.url)) as worker:
                await stall(pool, SERIAL)
                await evaluate(pool, SERIAL)
                await worker.until(lambda: len(smtp.mails) >= 1)
                await worker.until(lambda: settled(pool))
            [mail] = smtp.mails
            assert mail.recipients == ["oncall@clinic.example"]
            assert PATIENT_NAME not in mail.subject
            assert mail.subject.startswith("[pumpwatch] HIGH alert: ")
            assert SERIAL in mail.subject
            text, html = mail.part("plain"), mail.part("html")
            for body in (text, html):
                assert PATIENT_NAME in body  # the body names the patient for the staff
                assert SERIAL in body
                assert "motor stall" in body.lower()
            assert "<table" in html
            assert "<table" not in text
            alert_id = await pool.fetchval("SELECT id FROM alerts")
            assert str(alert_id) in text
            key = await pool.fetchval("SELECT idempotency_key FROM deliveries")
            assert mail.message["Message-ID"] == f"<{key}@pumpwatch>"
            assert mail.message["X-Pumpwatch-Event"] == "alert.opened"


async def test_recipients_follow_the_alert_priority(database_url: str) -> None:
    medium, low = "NGP600002A", "NGP600003A"
    async with pool_for(database_url) as pool:
        with smtp_sink() as smtp:
            clinic_id, _ = await clinic_with_pump(pool, SERIAL, notification_settings=ROUTING)
            await add_pump(pool, clinic_id, medium)
            await add_pump(pool, clinic_id, low)
            async with running(pool, settings(database_url, smtp_url=smtp.url)) as worker:
                await stall(pool, SERIAL)  # high
                await days_left(pool, medium, 5)  # refill due, medium
                await days_left(pool, low, 10)  # refill due, low
                await evaluate(pool, SERIAL, medium, low)
                await worker.until(lambda: settled(pool))
            by_pump: dict[str, list[str]] = {}
            for mail in smtp.mails:
                serial = next(s for s in (SERIAL, medium, low) if s in mail.subject)
                by_pump.setdefault(serial, []).extend(mail.recipients)
            # one message per recipient, sent concurrently: their order is not defined
            assert {serial: sorted(found) for serial, found in by_pump.items()} == {
                SERIAL: ["oncall@clinic.example"],
                medium: ["nurses@clinic.example"],
                low: ["nurses@clinic.example", "planner@clinic.example"],
            }


async def test_names_stay_out_of_the_body_when_the_clinic_says_so(database_url: str) -> None:
    routing = {"email": {"high": ["oncall@clinic.example"], "patient_names": False}}
    async with pool_for(database_url) as pool:
        with smtp_sink() as smtp:
            await clinic_with_pump(pool, SERIAL, notification_settings=routing)
            async with running(pool, settings(database_url, smtp_url=smtp.url)) as worker:
                await stall(pool, SERIAL)
                await evaluate(pool, SERIAL)
                await worker.until(lambda: len(smtp.mails) >= 1)
            [mail] = smtp.mails
            assert PATIENT_NAME not in mail.part("plain")
            assert PATIENT_NAME not in mail.part("html")


async def test_quiet_hours_delay_low_priority_email_only(database_url: str) -> None:
    """Quiet all day but one minute: a low alert's email waits for the end, a high alert's
    goes at once, and the low alert's webhook-free routes are not held."""
    low = "NGP600004A"
    now = datetime.now(UTC)
    # Local time in UTC clinic: quiet from one minute ago until 12 hours from now.
    start = (now - timedelta(minutes=1)).strftime("%H:%M")
    end = (now + timedelta(hours=12)).strftime("%H:%M")
    routing = ROUTING | {"quiet_hours": {"start": start, "end": end}}
    async with pool_for(database_url) as pool:
        with smtp_sink() as smtp:
            clinic_id, _ = await clinic_with_pump(
                pool, SERIAL, notification_settings=routing, timezone="UTC"
            )
            await add_pump(pool, clinic_id, low)
            async with running(pool, settings(database_url, smtp_url=smtp.url)) as worker:
                await stall(pool, SERIAL)
                await days_left(pool, low, 10)
                await evaluate(pool, SERIAL, low)
                await worker.until(
                    lambda: pool.fetchval(
                        "SELECT count(*) = 0 FROM outbox WHERE dispatched_at IS NULL"
                    )
                )
                await worker.until(lambda: len(smtp.mails) >= 1)
                # the SMTP server has the mail a moment before the worker records the outcome
                await worker.until(
                    lambda: pool.fetchval(
                        "SELECT count(*) = 1 FROM deliveries d JOIN alerts a ON a.id = d.alert_id "
                        "WHERE a.priority = 'high' AND d.status = 'delivered'"
                    )
                )
                rows = await pool.fetch(
                    "SELECT d.target, d.status, d.due_at, d.created_at, a.priority "
                    "FROM deliveries d JOIN alerts a ON a.id = d.alert_id ORDER BY d.target"
                )
            sent = smtp.mails
            assert [m.recipients for m in sent] == [["oncall@clinic.example"]]
            waiting = [r for r in rows if r["priority"] == "low"]
            assert len(waiting) == 2
            for row in waiting:
                assert row["status"] == "pending"
                local_end = row["due_at"].astimezone(UTC).strftime("%H:%M")
                assert local_end == end
                assert row["due_at"] > row["created_at"] + timedelta(hours=11)
            [high] = [r for r in rows if r["priority"] == "high"]
            assert high["status"] == "delivered"
            assert high["due_at"] == high["created_at"]


async def test_low_priority_alerts_are_folded_into_the_digest_by_default(
    database_url: str,
) -> None:
    routing = {"email": {"low": ["nurses@clinic.example"]}}
    async with pool_for(database_url) as pool:
        with smtp_sink() as smtp:
            await clinic_with_pump(pool, SERIAL, notification_settings=routing)
            async with running(pool, settings(database_url, smtp_url=smtp.url)) as worker:
                await days_left(pool, SERIAL, 10)
                await evaluate(pool, SERIAL)
                await worker.until(lambda: settled(pool))
            assert await pool.fetchval("SELECT count(*) FROM alerts WHERE priority = 'low'") == 1
            assert smtp.mails == []
            emails = await pool.fetchval("SELECT count(*) FROM deliveries WHERE channel = 'email'")
            assert emails == 0
            # The same alert with folding switched off is emailed.
            await pool.execute(
                "UPDATE clinics SET notification_settings = $1",
                routing | {"digest": {"fold_low_priority": False}},
            )
            async with running(pool, settings(database_url, smtp_url=smtp.url)) as worker:
                await pool.execute(
                    "UPDATE alerts SET status = 'resolved', resolved_at = now(), "
                    "resolution = 'test'"
                )
                await days_left(pool, SERIAL, 9)
                await evaluate(pool, SERIAL)  # reopened: alert.opened again
                await worker.until(lambda: len(smtp.mails) >= 1)
            [mail] = smtp.mails
            assert mail.recipients == ["nurses@clinic.example"]
            assert mail.subject.startswith("[pumpwatch] LOW alert: ")


async def test_the_daily_digest_lists_refills_within_seven_days_and_open_low_alerts(
    database_url: str,
) -> None:
    soon, later, low_alert = "NGP600011A", "NGP600012A", "NGP600013A"
    routing = {
        "email": {"low": ["nurses@clinic.example"]},
        "digest": {"hour": 0, "recipients": ["digest@clinic.example"]},
    }
    async with pool_for(database_url) as pool:
        with smtp_sink() as smtp:
            clinic_id, _ = await clinic_with_pump(
                pool, soon, notification_settings=routing, timezone="Europe/Berlin"
            )
            await add_pump(pool, clinic_id, later)
            await add_pump(pool, clinic_id, low_alert)
            await days_left(pool, soon, 3)  # within 7 days (a medium refill-due alert)
            await days_left(pool, later, 8)  # beyond 7 days (a low refill-due alert)
            await days_left(pool, low_alert, 12)  # a low alert, refill not within 7 days
            await evaluate(pool, soon, later, low_alert)
            async with running(pool, settings(database_url, smtp_url=smtp.url)) as worker:
                assert await worker.notifications.make_digests() == 1
                assert await worker.notifications.make_digests() == 0  # once a day
                await worker.until(lambda: len(smtp.to("digest@clinic.example")) >= 1)
                await worker.until(lambda: settled(pool))
            [digest] = smtp.to("digest@clinic.example")
            assert digest.recipients == ["digest@clinic.example"]
            assert digest.subject.startswith("[pumpwatch] Daily digest ")
            assert "1 refill due within 7 days, 2 low-priority alerts open" in digest.subject
            assert PATIENT_NAME not in digest.subject
            text = digest.part("plain")
            refills, alerts = text.split("Open low-priority alerts:")
            assert soon in refills
            assert later not in refills
            assert low_alert not in refills
            assert later in alerts
            assert low_alert in alerts
            assert soon not in alerts  # medium: not in the low-priority list
            assert PATIENT_NAME in text
            assert soon in digest.part("html")
            # Nothing else was emailed: the low alerts were folded into the digest.
            assert smtp.to("nurses@clinic.example") == []
            # A second worker (another instance, or after a restart) does not send it again.
            async with running(pool, settings(database_url, smtp_url=smtp.url)) as again:
                assert await again.notifications.make_digests() == 0


async def test_smtp_refusing_a_recipient_for_good_fails_the_delivery_at_once(
    database_url: str,
) -> None:
    with smtp_sink() as smtp:
        smtp.handler.refuse.add("gone@clinic.example")
        sender = EmailSender(
            parse_smtp_url(smtp.url), sender="pw@x.example", starttls="off", timeout_s=5
        )
        message = Message(
            delivery_id="d",
            message_id="msg_1",
            event="alert.opened",
            target="gone@clinic.example",
            payload={"email": {"subject": "s", "text": "t", "html": "<p>h</p>"}},
            attempt=1,
        )
        result = await sender.send(message)
        assert (result.outcome, result.status_code, result.permanent) == ("rejected", 550, True)
        ok = await sender.send(
            Message("d", "msg_2", "alert.opened", "here@clinic.example", message.payload, 1)
        )
        assert ok.delivered
        [mail] = smtp.mails
        assert isinstance(mail, Mail)
        assert mail.recipients == ["here@clinic.example"]


async def test_smtp_down_is_a_network_failure_retried_with_backoff(database_url: str) -> None:
    async with pool_for(database_url) as pool:
        with smtp_sink() as smtp:
            url = smtp.url
        await clinic_with_pump(pool, SERIAL, notification_settings=ROUTING)
        async with running(pool, settings(database_url, smtp_url=url)) as worker:
            await stall(pool, SERIAL)
            await evaluate(pool, SERIAL)
            await worker.until(
                lambda: pool.fetchval(
                    "SELECT count(*) >= 2 FROM delivery_attempts WHERE outcome = 'network'"
                )
            )
            assert await pool.fetchval("SELECT status FROM deliveries") == "pending"
