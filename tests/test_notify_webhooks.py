"""Webhook deliveries against a real local HTTP receiver: Standard Webhooks signatures verified
with the ``standardwebhooks`` package, retries with every attempt recorded, the address guard,
secret rotation, and disabling a target that keeps failing."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from services.domain.webhook_urls import new_secret
from services.notify.channel import Message, WebhookKeys
from services.notify.webhooks import (
    BlockedAddress,
    GuardedBackend,
    WebhookSender,
    system_resolver,
)
from tests.notify_support import (
    Reply,
    add_pump,
    add_webhook,
    clinic_with_pump,
    days_left,
    evaluate,
    pool_for,
    receiver,
    running,
    settings,
    smtp_sink,
    stall,
    static_resolver,
)

SERIAL = "NGP500001A"


async def deliveries(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    return await pool.fetch("SELECT * FROM deliveries ORDER BY created_at, id")


async def attempts(pool: asyncpg.Pool, delivery_id: object) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT * FROM delivery_attempts WHERE delivery_id = $1 ORDER BY id", delivery_id
    )


async def test_an_alert_is_delivered_signed_and_verifies_with_the_secret(
    database_url: str,
) -> None:
    secret = new_secret()
    async with pool_for(database_url) as pool:
        with receiver() as hook:
            clinic_id, _ = await clinic_with_pump(pool, SERIAL)
            await add_webhook(pool, clinic_id, hook.url(), secret)
            async with running(pool, settings(database_url)) as worker:
                await stall(pool, SERIAL)
                await evaluate(pool, SERIAL)
                await worker.until(lambda: hook.count() >= 1)
                await worker.until(
                    lambda: pool.fetchval(
                        "SELECT count(*) = 1 FROM deliveries WHERE status = 'delivered'"
                    )
                )
            [request] = hook.received
            body = Webhook(secret).verify(request.body, request.headers)
            assert set(body) == {"id", "type", "created_at", "data"}
            assert body["type"] == "alert.opened"
            assert body["id"] == request.headers["webhook-id"]
            assert body["data"]["serial"] == SERIAL
            assert body["data"]["rule"] == "flow_stopped"
            assert body["data"]["priority"] == "high"
            assert request.headers["content-type"] == "application/json"
            assert request.headers["webhook-signature"].startswith("v1,")
            [delivery] = await deliveries(pool)
            assert delivery["idempotency_key"] == request.headers["webhook-id"]
            assert str(delivery["alert_id"]) == body["data"]["id"]
            [attempt] = await attempts(pool, delivery["id"])
            assert (attempt["outcome"], attempt["status_code"]) == ("delivered", 204)
            assert attempt["channel"] == "webhook"
            assert attempt["target"] == hook.url()
            assert await pool.fetchval("SELECT dispatched_at IS NOT NULL FROM outbox") is True


async def test_a_receiver_failing_three_times_gets_the_delivery_on_the_fourth_attempt(
    database_url: str,
) -> None:
    secret = new_secret()
    async with pool_for(database_url) as pool:
        with receiver() as hook:
            hook.replies = [Reply(500), Reply(503), Reply(429)]
            clinic_id, _ = await clinic_with_pump(pool, SERIAL)
            await add_webhook(pool, clinic_id, hook.url(), secret)
            async with running(pool, settings(database_url)) as worker:
                await stall(pool, SERIAL)
                await evaluate(pool, SERIAL)
                await worker.until(
                    lambda: pool.fetchval(
                        "SELECT count(*) = 1 FROM deliveries WHERE status = 'delivered'"
                    )
                )
                metrics = worker.metrics
            assert hook.count() == 4
            ids = {r.headers["webhook-id"] for r in hook.received}
            assert len(ids) == 1  # the same message each time: receivers dedupe on it
            for request in hook.received:
                Webhook(secret).verify(request.body, request.headers)
            [delivery] = await deliveries(pool)
            assert delivery["attempts"] == 4
            found = await attempts(pool, delivery["id"])
            assert [(a["outcome"], a["status_code"]) for a in found] == [
                ("http_status", 500),
                ("http_status", 503),
                ("http_status", 429),
                ("delivered", 204),
            ]
            assert all(a["error"] for a in found[:3])
            times = [a["at"] for a in found]
            assert times == sorted(times)
            assert (
                metrics.attempts.labels(channel="webhook", outcome="http_status")._value.get() == 3
            )
            assert (
                metrics.deliveries.labels(channel="webhook", status="delivered")._value.get() == 1
            )


def _message(url: str, secret: str, **keys: object) -> Message:
    return Message(
        delivery_id="d1",
        message_id="msg_test",
        event="alert.opened",
        target=url,
        payload={"id": "msg_test", "type": "alert.opened", "created_at": "x", "data": {}},
        attempt=1,
        keys=WebhookKeys(secret, **keys),  # type: ignore[arg-type]
    )


async def test_tampered_and_expired_signatures_fail_verification() -> None:
    secret = new_secret()
    with receiver() as hook:
        sender = WebhookSender(allow_hosts=frozenset({"127.0.0.1"}), timeout_s=5)
        try:
            result = await sender.send(_message(hook.url(), secret))
        finally:
            await sender.aclose()
        assert result.delivered
        [request] = hook.received
    verifier = Webhook(secret)
    verifier.verify(request.body, request.headers)  # as sent: valid
    tampered = request.body.replace(b'"alert.opened"', b'"alert.resolved"')
    assert tampered != request.body
    with pytest.raises(WebhookVerificationError):
        verifier.verify(tampered, request.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(request.body, request.headers)  # another secret
    other_id = dict(request.headers, **{"webhook-id": "msg_other"})
    with pytest.raises(WebhookVerificationError):
        verifier.verify(request.body, other_id)
    # A replay 10 minutes later: the signature is right but the timestamp is too old.
    old = int(request.headers["webhook-timestamp"]) - 600
    stale = dict(request.headers)
    stale["webhook-timestamp"] = str(old)
    stale["webhook-signature"] = verifier.sign(
        "msg_test", datetime.fromtimestamp(old, UTC), request.body.decode()
    )
    with pytest.raises(WebhookVerificationError, match="too old"):
        verifier.verify(request.body, stale)


async def test_during_a_rotation_both_secrets_sign_and_after_it_only_the_new_one() -> None:
    old, new = new_secret(), new_secret()
    with receiver() as hook:
        sender = WebhookSender(allow_hosts=frozenset({"127.0.0.1"}), timeout_s=5)
        try:
            later = datetime.now(UTC) + timedelta(hours=1)
            during = await sender.send(
                _message(hook.url(), new, previous_secret=old, previous_secret_expires_at=later)
            )
            earlier = datetime.now(UTC) - timedelta(seconds=1)
            after = await sender.send(
                _message(hook.url(), new, previous_secret=old, previous_secret_expires_at=earlier)
            )
        finally:
            await sender.aclose()
    assert during.delivered
    assert after.delivered
    overlap, expired = hook.received
    assert len(overlap.headers["webhook-signature"].split(" ")) == 2
    Webhook(new).verify(overlap.body, overlap.headers)
    Webhook(old).verify(overlap.body, overlap.headers)  # receivers not yet on the new secret
    assert len(expired.headers["webhook-signature"].split(" ")) == 1
    Webhook(new).verify(expired.body, expired.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(old).verify(expired.body, expired.headers)


def test_the_previous_secret_signs_until_exactly_its_expiry() -> None:
    expires = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
    keys = WebhookKeys("whsec_new", "whsec_old", expires)
    assert keys.signing(expires - timedelta(microseconds=1)) == ["whsec_new", "whsec_old"]
    assert keys.signing(expires) == ["whsec_new"]
    assert WebhookKeys("whsec_new").signing(expires) == ["whsec_new"]


@pytest.mark.parametrize(
    ("host", "address", "why"),
    [
        ("127.0.0.1", None, "loopback"),
        ("10.1.2.3", None, "private"),
        ("192.168.0.10", None, "private"),
        ("169.254.10.1", None, "link-local"),
        ("169.254.169.254", None, "metadata"),
        ("[fd00:ec2::254]", None, "metadata"),
        ("[::1]", None, "loopback"),
        ("localhost", None, "localhost"),
        ("hooks.clinic.test", "127.0.0.1", "loopback"),
        ("rebind.clinic.test", "10.0.0.7", "private"),
    ],
)
async def test_the_guard_refuses_internal_addresses_resolved_at_send_time(
    host: str, address: str | None, why: str
) -> None:
    with receiver() as hook:
        names = {host: [address]} if address else {}
        sender = WebhookSender(
            allow_hosts=frozenset(), timeout_s=2, resolver=static_resolver(names)
        )
        try:
            url = f"https://{host}:{hook.port}/hook"
            result = await sender.send(_message(url, new_secret()))
        finally:
            await sender.aclose()
        assert result.outcome == "blocked", result
        assert why in (result.error or "")
        assert hook.count() == 0


async def test_the_guard_resolves_localhost_and_refuses_its_loopback_addresses() -> None:
    """Below the URL check (which names localhost), the connection itself: the system
    resolver's answer for ``localhost`` is checked and refused."""
    backend = GuardedBackend(frozenset(), system_resolver)
    with pytest.raises(BlockedAddress, match="loopback"):
        await backend.connect_tcp("localhost", 443, timeout=2)
    allowed = GuardedBackend(frozenset({"localhost"}), system_resolver)
    with receiver() as hook:
        stream = await allowed.connect_tcp("localhost", hook.port, timeout=2)
        await stream.aclose()


async def test_a_name_resolving_to_loopback_is_refused_even_when_one_address_is_public() -> None:
    sender = WebhookSender(
        allow_hosts=frozenset(),
        timeout_s=2,
        resolver=static_resolver({"mixed.clinic.test": ["93.184.215.14", "127.0.0.1"]}),
    )
    try:
        result = await sender.send(_message("https://mixed.clinic.test/hook", new_secret()))
    finally:
        await sender.aclose()
    assert result.outcome == "blocked"
    assert "127.0.0.1 is a loopback address" in (result.error or "")


async def test_an_allowed_host_is_resolved_once_and_reached_at_the_checked_address() -> None:
    """``hooks.clinic.test`` exists only in the resolver hook: the request can reach the
    receiver only through the address the guard checked (no second lookup)."""
    with receiver() as hook:
        sender = WebhookSender(
            allow_hosts=frozenset({"hooks.clinic.test"}),
            timeout_s=5,
            resolver=static_resolver({"hooks.clinic.test": ["127.0.0.1"]}),
        )
        try:
            result = await sender.send(
                _message(f"http://hooks.clinic.test:{hook.port}/in", new_secret())
            )
        finally:
            await sender.aclose()
        assert result.delivered
        [request] = hook.received
        assert request.headers["host"] == f"hooks.clinic.test:{hook.port}"
        assert request.path == "/in"


async def test_http_is_refused_for_hosts_not_allowed() -> None:
    sender = WebhookSender(allow_hosts=frozenset(), timeout_s=2)
    try:
        result = await sender.send(_message("http://example.com/hook", new_secret()))
    finally:
        await sender.aclose()
    assert result.outcome == "blocked"
    assert "https" in (result.error or "")


async def test_a_redirect_is_a_failure_and_is_not_followed() -> None:
    with receiver() as inner, receiver() as outer:
        outer.default = Reply(307, {"location": inner.url("/stolen")})
        sender = WebhookSender(allow_hosts=frozenset({"127.0.0.1"}), timeout_s=5)
        try:
            result = await sender.send(_message(outer.url(), new_secret()))
        finally:
            await sender.aclose()
        assert (result.outcome, result.status_code) == ("redirect", 307)
        assert outer.count() == 1
        assert inner.count() == 0


async def test_a_receiver_that_does_not_answer_in_time_is_a_timeout() -> None:
    with receiver() as hook:
        hook.default = Reply(204, delay_s=1.0)
        sender = WebhookSender(allow_hosts=frozenset({"127.0.0.1"}), timeout_s=0.2)
        try:
            result = await sender.send(_message(hook.url(), new_secret()))
        finally:
            await sender.aclose()
    assert result.outcome == "timeout"


async def test_nothing_listening_is_a_network_failure() -> None:
    with receiver() as hook:
        url = hook.url()
    sender = WebhookSender(allow_hosts=frozenset({"127.0.0.1"}), timeout_s=2)
    try:
        result = await sender.send(_message(url, new_secret()))
    finally:
        await sender.aclose()
    assert result.outcome == "network"


@pytest.mark.parametrize("failures", [1, 2])
async def test_a_webhook_is_disabled_after_n_failed_deliveries_in_a_row_not_before(
    database_url: str, failures: int
) -> None:
    """Limit 2: one failed delivery leaves it enabled; the second disables it, tells the
    clinic's admins (email, and the outbox event ``webhook.disabled``) and cancels what
    waited for it."""
    limit = 2
    async with pool_for(database_url) as pool:
        with receiver() as hook, smtp_sink() as smtp:
            hook.default = Reply(500)
            clinic_id, _ = await clinic_with_pump(
                pool, SERIAL, notification_settings={"admin_emails": ["it@clinic.example"]}
            )
            # A receiver's token in the query: notices must not repeat it.
            webhook_id = await add_webhook(
                pool, clinic_id, hook.url("/hook?token=s3cret"), new_secret()
            )
            config = settings(
                database_url,
                notify_retry_window_s=0.3,
                webhook_disable_after_failures=limit,
                smtp_url=smtp.url,
            )
            serials = [f"NGP50001{i}A" for i in range(failures)]
            for serial in serials[1:]:
                await add_pump(pool, clinic_id, serial)
            async with running(pool, config) as worker:
                for serial in [SERIAL, *serials[1:]]:
                    await stall(pool, serial)
                await evaluate(pool, SERIAL, *serials[1:])
                await worker.until(
                    lambda: pool.fetchval(
                        "SELECT count(*) = $1 FROM deliveries "
                        "WHERE channel = 'webhook' AND status = 'failed'",
                        failures,
                    )
                )
                # Each failed delivery is told to the admins by email.
                await worker.until(lambda: len(smtp.to("it@clinic.example")) >= failures)
                if failures >= limit:
                    await worker.until(lambda: len(smtp.to("it@clinic.example")) >= failures + 1)
            hook_row = await pool.fetchrow("SELECT * FROM webhooks WHERE id = $1", webhook_id)
            assert hook_row is not None
            events = [r["event"] for r in await pool.fetch("SELECT event FROM outbox ORDER BY id")]
            subjects = [m.subject for m in smtp.to("it@clinic.example")]
            assert events.count("delivery.failed") == failures
            assert subjects.count("[pumpwatch] A notification could not be delivered") == failures
            if failures < limit:
                assert hook_row["disabled_at"] is None
                assert hook_row["consecutive_failures"] == failures
                assert "webhook.disabled" not in events
            else:
                assert hook_row["disabled_at"] is not None
                assert "2 deliveries in a row failed" in hook_row["disabled_reason"]
                assert events.count("webhook.disabled") == 1
                assert "[pumpwatch] A webhook was disabled" in subjects
                payload = await pool.fetchval(
                    "SELECT payload FROM outbox WHERE event = 'webhook.disabled'"
                )
                assert payload["webhook_id"] == webhook_id
                notice = next(m for m in smtp.to("it@clinic.example") if "disabled" in m.subject)
                assert hook.url() in notice.part("plain")
                assert payload["url"] == hook.url()
            notices = await pool.fetch(
                "SELECT payload::text AS text FROM outbox "
                "WHERE event IN ('delivery.failed', 'webhook.disabled')"
            )
            assert notices
            assert all("s3cret" not in n["text"] for n in notices)
            assert all("s3cret" not in m.part("plain") for m in smtp.to("it@clinic.example"))


async def test_a_success_resets_the_count_of_failures_in_a_row(database_url: str) -> None:
    async with pool_for(database_url) as pool:
        with receiver() as hook:
            hook.replies = [Reply(500)] * 3  # three failed attempts, then delivered
            clinic_id, _ = await clinic_with_pump(pool, SERIAL)
            webhook_id = await add_webhook(pool, clinic_id, hook.url(), new_secret())
            await pool.execute(
                "UPDATE webhooks SET consecutive_failures = 4 WHERE id = $1", webhook_id
            )
            async with running(
                pool, settings(database_url, webhook_disable_after_failures=5)
            ) as worker:
                await stall(pool, SERIAL)
                await evaluate(pool, SERIAL)
                await worker.until(
                    lambda: pool.fetchval(
                        "SELECT count(*) = 1 FROM deliveries WHERE status = 'delivered'"
                    )
                )
            row = await pool.fetchrow("SELECT * FROM webhooks WHERE id = $1", webhook_id)
            assert row is not None
            assert (row["consecutive_failures"], row["disabled_at"]) == (0, None)


async def test_a_deleted_webhook_gets_no_more_attempts(database_url: str) -> None:
    async with pool_for(database_url) as pool:
        with receiver() as hook:
            hook.default = Reply(503)
            clinic_id, _ = await clinic_with_pump(pool, SERIAL)
            webhook_id = await add_webhook(pool, clinic_id, hook.url(), new_secret())
            async with running(pool, settings(database_url)) as worker:
                await stall(pool, SERIAL)
                await evaluate(pool, SERIAL)
                await worker.until(lambda: hook.count() >= 1)
                await pool.execute(
                    "UPDATE webhooks SET deleted_at = now() WHERE id = $1", webhook_id
                )
                await worker.until(
                    lambda: pool.fetchval(
                        "SELECT count(*) = 1 FROM deliveries WHERE status = 'cancelled'"
                    )
                )
                seen = hook.count()
            assert hook.count() == seen
            [delivery] = await deliveries(pool)
            assert delivery["last_error"] == "the webhook was deleted"


async def test_webhooks_get_only_the_events_and_priorities_they_are_routed(
    database_url: str,
) -> None:
    async with pool_for(database_url) as pool:
        with receiver() as resolved_only, receiver() as everything:
            clinic_id, _ = await clinic_with_pump(
                pool, SERIAL, notification_settings={"webhook_priorities": ["medium", "low"]}
            )
            await add_webhook(
                pool, clinic_id, resolved_only.url(), new_secret(), events=("alert.resolved",)
            )
            await add_webhook(pool, clinic_id, everything.url(), new_secret())
            async with running(pool, settings(database_url)) as worker:
                await stall(pool, SERIAL)  # a high alert: not routed to webhooks
                await evaluate(pool, SERIAL)
                await worker.until(
                    lambda: pool.fetchval(
                        "SELECT count(*) = 0 FROM outbox WHERE dispatched_at IS NULL"
                    )
                )
                serial = "NGP500099A"
                await add_pump(pool, clinic_id, serial)
                await days_left(pool, serial, 10)  # refill due, low
                await evaluate(pool, serial)
                await worker.until(lambda: everything.count() >= 1)
            assert resolved_only.count() == 0
            [request] = everything.received
            body = json.loads(request.body)
            assert (body["type"], body["data"]["priority"]) == ("alert.opened", "low")
