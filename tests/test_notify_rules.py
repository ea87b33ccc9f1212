"""The pure parts of notifications, without servers: the backoff schedule, routing decisions,
quiet hours across midnight and daylight-saving shifts, the threshold settings at their
boundaries, webhook URL checks, secrets, and email words."""

from __future__ import annotations

import itertools
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError
from standardwebhooks.webhooks import Webhook

from services.domain.notifications import (
    Digest,
    Escalation,
    NotificationSettings,
    QuietHours,
    in_quiet_hours,
    quiet_hours_end,
)
from services.domain.webhook_urls import (
    address_problem,
    check_registration_url,
    new_secret,
    parse_allow_hosts,
)
from services.notify.backoff import RetryPolicy, next_attempt, retry_delay_s
from services.notify.digest import digest_day
from services.notify.escalation import escalation_due
from services.notify.render import PatientRef, alert_email
from services.notify.routing import Event, WebhookTarget, message_id, plan
from services.notify.settings import NotifySettings, parse_smtp_url

BERLIN = ZoneInfo("Europe/Berlin")
NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)

# -- backoff -------------------------------------------------------------------------------------

POLICY = RetryPolicy(first_s=10, max_s=3600, jitter_fraction=0.2, window_s=86400)


def test_the_backoff_doubles_from_the_first_wait_up_to_the_cap() -> None:
    waits = [retry_delay_s(n, POLICY, 0.5) for n in range(1, 12)]
    assert waits == [10, 20, 40, 80, 160, 320, 640, 1280, 2560, 3600, 3600]
    assert retry_delay_s(10_000, POLICY, 0.5) == 3600  # no overflow however many


@given(st.integers(1, 500), st.floats(0, 1, exclude_max=True))
def test_jitter_spreads_each_wait_within_its_fraction(failures: int, rand: float) -> None:
    base = retry_delay_s(failures, POLICY, 0.5)
    wait = retry_delay_s(failures, POLICY, rand)
    assert base * 0.8 - 1e-9 <= wait <= base * 1.2 + 1e-9


def test_jitter_reaches_both_ends() -> None:
    assert retry_delay_s(1, POLICY, 0.0) == pytest.approx(8.0)
    assert retry_delay_s(1, POLICY, 1.0) == pytest.approx(12.0)


def test_retries_last_the_window_and_the_last_attempt_is_at_its_end() -> None:
    due = NOW
    at, failures, attempts = due, 0, [due]
    while True:
        failures += 1
        later = next_attempt(now=at, due_at=due, failed_attempts=failures, policy=POLICY, rand=0.5)
        if later is None:
            break
        attempts.append(later)
        at = later
    assert attempts[-1] == due + timedelta(hours=24)  # retried for (at least) 24 hours
    assert all(b > a for a, b in itertools.pairwise(attempts))
    assert 30 < len(attempts) < 40


def test_the_window_ends_at_its_boundary_not_before() -> None:
    end = NOW + timedelta(seconds=POLICY.window_s)
    before = next_attempt(
        now=end - timedelta(microseconds=1), due_at=NOW, failed_attempts=3, policy=POLICY, rand=0
    )
    assert before == end  # one more attempt, at the very end
    assert next_attempt(now=end, due_at=NOW, failed_attempts=3, policy=POLICY, rand=0) is None


# -- routing -------------------------------------------------------------------------------------


def event(kind: str = "alert.opened", priority: str = "high", **payload: Any) -> Event:
    return Event(
        outbox_id=7,
        created_at=NOW,
        event=kind,
        alert_id="a1",
        clinic_id="c1",
        payload={"priority": priority, "serial": "NGP1", "title": "t"} | payload,
    )


ROUTING = NotificationSettings.model_validate(
    {
        "email": {"high": ["h@x.example"], "medium": ["m@x.example"], "low": ["l@x.example"]},
        "webhook_priorities": ["high", "medium"],
        "mqtt_priorities": ["high"],
        "admin_emails": ["admin@x.example"],
        "escalation": {"contacts": ["boss@x.example"]},
        "digest": {"fold_low_priority": False},
    }
)
HOOKS = [
    WebhookTarget("w1", "https://a.example/h", frozenset({"alert.opened", "refill.recorded"})),
    WebhookTarget("w2", "https://b.example/h", frozenset({"alert.resolved"})),
]


def routes(e: Event, settings: NotificationSettings = ROUTING) -> set[tuple[str, str]]:
    found = plan(e, settings, webhooks=HOOKS, mqtt_topic="clinics/c1/alerts", tz=UTC, now=NOW)
    return {(p.channel, p.target) for p in found}


def test_a_high_alert_goes_to_its_webhooks_mqtt_and_the_high_addresses() -> None:
    assert routes(event()) == {
        ("webhook", "https://a.example/h"),
        ("mqtt", "clinics/c1/alerts"),
        ("email", "h@x.example"),
    }


def test_priorities_choose_channels_and_recipients() -> None:
    assert routes(event(priority="medium")) == {
        ("webhook", "https://a.example/h"),
        ("email", "m@x.example"),
    }
    assert routes(event(priority="low")) == {("email", "l@x.example")}


def test_low_priority_email_is_folded_into_the_digest_when_asked() -> None:
    folding = ROUTING.model_copy(update={"digest": Digest(fold_low_priority=True)})
    assert routes(event(priority="low"), folding) == set()
    off = ROUTING.model_copy(update={"digest": Digest(enabled=False, fold_low_priority=True)})
    assert routes(event(priority="low"), off) == {("email", "l@x.example")}


def test_events_reach_only_webhooks_subscribed_and_email_only_listed_events() -> None:
    assert routes(event("alert.resolved")) == {
        ("webhook", "https://b.example/h"),
        ("mqtt", "clinics/c1/alerts"),
    }
    refill = Event(7, NOW, "refill.recorded", None, "c1", {"serial": "NGP1"})
    assert routes(refill) == {("webhook", "https://a.example/h")}


def test_an_unacknowledged_alert_also_goes_to_the_escalation_contacts() -> None:
    assert routes(event("alert.unacknowledged")) == {
        ("mqtt", "clinics/c1/alerts"),
        ("email", "h@x.example"),
        ("email", "boss@x.example"),
    }


def test_notices_about_notifications_go_to_the_admins() -> None:
    failed = Event(7, NOW, "delivery.failed", "a1", "c1", {"channel": "webhook"})
    assert routes(failed) == {("email", "admin@x.example")}


def test_without_a_broker_nothing_is_planned_for_mqtt() -> None:
    found = plan(event(), ROUTING, webhooks=[], mqtt_topic=None, tz=UTC, now=NOW)
    assert {p.channel for p in found} == {"email"}


def test_message_ids_are_stable_and_distinct() -> None:
    assert message_id("outbox", 1, "email", "a@x") == message_id("outbox", 1, "email", "a@x")
    assert message_id("outbox", 1, "email", "a@x") != message_id("outbox", 2, "email", "a@x")
    assert message_id("outbox", 1, "email", "a@x").startswith("msg_")


# -- quiet hours ---------------------------------------------------------------------------------

NIGHT = QuietHours(start=time(22), end=time(7))


def test_quiet_hours_span_midnight_start_inclusive_end_exclusive() -> None:
    def at(h: int, m: int = 0) -> datetime:
        return datetime(2026, 11, 24, h, m, tzinfo=BERLIN)

    assert not in_quiet_hours(NIGHT, at(21, 59), BERLIN)
    assert in_quiet_hours(NIGHT, at(22), BERLIN)
    assert in_quiet_hours(NIGHT, at(23, 59), BERLIN)
    assert in_quiet_hours(NIGHT, at(0), BERLIN)
    assert in_quiet_hours(NIGHT, at(6, 59), BERLIN)
    assert not in_quiet_hours(NIGHT, at(7), BERLIN)
    day = QuietHours(start=time(12), end=time(14))
    assert in_quiet_hours(day, at(12), BERLIN)
    assert not in_quiet_hours(day, at(14), BERLIN)
    assert not in_quiet_hours(day, at(11, 59), BERLIN)


def test_quiet_hours_end_the_next_local_morning() -> None:
    evening = datetime(2026, 11, 24, 23, 0, tzinfo=BERLIN)
    assert quiet_hours_end(NIGHT, evening, BERLIN) == datetime(2026, 11, 25, 7, 0, tzinfo=BERLIN)
    early = datetime(2026, 11, 25, 3, 0, tzinfo=BERLIN)
    assert quiet_hours_end(NIGHT, early, BERLIN) == datetime(2026, 11, 25, 7, 0, tzinfo=BERLIN)


def test_quiet_hours_across_the_spring_shift_last_an_hour_less() -> None:
    evening = datetime(2026, 3, 28, 22, 0, tzinfo=BERLIN)  # clocks go 02:00 -> 03:00
    end = quiet_hours_end(NIGHT, evening, BERLIN)
    assert end.astimezone(BERLIN).replace(tzinfo=None) == datetime(2026, 3, 29, 7, 0)
    assert end - evening == timedelta(hours=8)  # 9 hours on the wall clock
    assert end == datetime(2026, 3, 29, 5, 0, tzinfo=UTC)


def test_quiet_hours_across_the_autumn_shift_last_an_hour_more() -> None:
    evening = datetime(2026, 10, 24, 22, 0, tzinfo=BERLIN)  # clocks go 03:00 -> 02:00
    end = quiet_hours_end(NIGHT, evening, BERLIN)
    assert end - evening == timedelta(hours=10)
    assert end == datetime(2026, 10, 25, 6, 0, tzinfo=UTC)


def test_quiet_hours_ending_in_a_skipped_hour_end_when_the_clock_jumps_past_it() -> None:
    quiet = QuietHours(start=time(22), end=time(2, 30))
    evening = datetime(2026, 3, 28, 23, 0, tzinfo=BERLIN)
    assert quiet_hours_end(quiet, evening, BERLIN) == datetime(2026, 3, 29, 1, 0, tzinfo=UTC)


def test_quiet_hours_ending_in_a_repeated_hour_end_at_its_first_occurrence() -> None:
    quiet = QuietHours(start=time(22), end=time(2, 30))
    evening = datetime(2026, 10, 24, 23, 0, tzinfo=BERLIN)
    assert quiet_hours_end(quiet, evening, BERLIN) == datetime(2026, 10, 25, 0, 30, tzinfo=UTC)


def test_quiet_hours_delay_low_priority_on_their_channels_only() -> None:
    settings = ROUTING.model_copy(update={"quiet_hours": NIGHT})
    night = datetime(2026, 11, 24, 23, 0, tzinfo=BERLIN)
    morning = datetime(2026, 11, 25, 7, 0, tzinfo=BERLIN)

    def due(priority: str) -> dict[str, datetime]:
        found = plan(
            event(priority=priority),
            settings,
            webhooks=HOOKS,
            mqtt_topic="t",
            tz=BERLIN,
            now=night,
        )
        return {p.channel: p.due_at for p in found}

    assert due("high") == {"webhook": night, "mqtt": night, "email": night}
    assert due("medium") == {"webhook": night, "email": night}
    low = ROUTING.model_copy(
        update={
            "quiet_hours": NIGHT,
            "webhook_priorities": ["low"],
            "mqtt_priorities": ["low"],
        }
    )
    found = plan(event(priority="low"), low, webhooks=HOOKS, mqtt_topic="t", tz=BERLIN, now=night)
    assert {p.channel: p.due_at for p in found} == {
        "webhook": night,  # quiet hours hold email by default
        "mqtt": night,
        "email": morning,
    }


# -- threshold settings at their boundaries ------------------------------------------------------


def test_escalation_fires_at_after_minutes_and_then_every_repeat_minutes() -> None:
    rule = Escalation(after_minutes=15, repeat_minutes=10)
    first = NOW + timedelta(minutes=15)
    tick = timedelta(microseconds=1)
    assert not escalation_due(rule, since=NOW, escalations=0, last_at=None, now=first - tick)
    assert escalation_due(rule, since=NOW, escalations=0, last_at=None, now=first)
    second = first + timedelta(minutes=10)
    assert not escalation_due(rule, since=NOW, escalations=1, last_at=first, now=second - tick)
    assert escalation_due(rule, since=NOW, escalations=1, last_at=first, now=second)
    off = Escalation(enabled=False)
    assert not escalation_due(off, since=NOW, escalations=0, last_at=None, now=NOW + timedelta(1))


def test_the_digest_is_due_from_its_local_hour() -> None:
    digest = Digest(hour=7)
    assert digest_day(digest, datetime(2026, 11, 24, 6, 59, 59, tzinfo=BERLIN), BERLIN) is None
    assert digest_day(digest, datetime(2026, 11, 24, 7, 0, tzinfo=BERLIN), BERLIN) == date(
        2026, 11, 24
    )
    assert digest_day(digest, datetime(2026, 11, 24, 23, 59, tzinfo=BERLIN), BERLIN) == date(
        2026, 11, 24
    )
    # 06:30 UTC is 07:30 in Berlin: due there, not in UTC.
    morning = datetime(2026, 11, 24, 6, 30, tzinfo=UTC)
    assert digest_day(digest, morning, BERLIN) == date(2026, 11, 24)
    assert digest_day(digest, morning, UTC) is None
    assert digest_day(Digest(enabled=False), morning, BERLIN) is None


def test_a_digest_hour_skipped_by_the_spring_shift_is_due_once_the_clock_passes_it() -> None:
    digest = Digest(hour=2)
    after_jump = datetime(2026, 3, 29, 1, 0, tzinfo=UTC)  # 03:00 CEST; 02:xx never happened
    assert digest_day(digest, after_jump, BERLIN) == date(2026, 3, 29)
    before = datetime(2026, 3, 29, 0, 59, tzinfo=UTC)  # 01:59 CET
    assert digest_day(digest, before, BERLIN) is None


def test_settings_refuse_values_out_of_range() -> None:
    with pytest.raises(ValidationError):
        NotifySettings(webhook_disable_after_failures=0)
    with pytest.raises(ValidationError):
        NotifySettings(notify_retry_jitter_fraction=1.0)
    with pytest.raises(ValidationError):
        NotifySettings(smtp_url="http://mail.example")
    with pytest.raises(ValidationError):
        NotificationSettings.model_validate({"escalation": {"after_minutes": 0}})
    with pytest.raises(ValidationError):
        NotificationSettings.model_validate({"digest": {"hour": 24}})
    with pytest.raises(ValidationError):
        NotificationSettings.model_validate({"quiet_hours": {"start": "07:00", "end": "07:00"}})
    with pytest.raises(ValidationError):
        NotificationSettings.model_validate({"email": {"high": ["not an address"]}})
    with pytest.raises(ValidationError):
        NotificationSettings.model_validate({"email": {"events": ["alert.exploded"]}})
    with pytest.raises(ValidationError):
        NotificationSettings.model_validate({"unknown": 1})


def test_notification_settings_defaults_example_and_schema() -> None:
    defaults = NotificationSettings.stored({})
    assert defaults.escalation.after_minutes == 15
    assert defaults.digest.hour == 7
    assert defaults.digest.fold_low_priority
    schema = NotificationSettings.model_json_schema()
    [example] = schema["examples"]
    assert NotificationSettings.model_validate(example).email.high
    assert schema["properties"]["escalation"]["description"]


def test_smtp_urls() -> None:
    plain = parse_smtp_url("smtp://user%40x:p%3Ass@mail.example:2525")
    assert (plain.host, plain.port, plain.username, plain.password, plain.tls) == (
        "mail.example",
        2525,
        "user@x",
        "p:ss",
        False,
    )
    assert parse_smtp_url("smtps://mail.example").port == 465
    assert parse_smtp_url("smtp://mail.example").port == 587
    assert "p:ss" not in plain.redacted()


# -- webhook URLs and secrets --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("https://hooks.clinic.example/in", None),
        ("https://93.184.215.14/in", None),
        ("http://hooks.clinic.example/in", "must use https"),
        ("ftp://hooks.clinic.example/in", "must start with https://"),
        ("https://user:pw@hooks.clinic.example/in", "user name or password"),
        ("https://127.0.0.1/in", "loopback"),
        ("https://10.0.0.1/in", "private"),
        ("https://172.16.5.4/in", "private"),
        ("https://192.168.1.1/in", "private"),
        ("https://169.254.1.1/in", "link-local"),
        ("https://169.254.169.254/latest/meta-data", "metadata"),
        ("https://[fd00:ec2::254]/", "metadata"),
        ("https://[::1]/", "loopback"),
        ("https://[::ffff:127.0.0.1]/", "loopback"),
        ("https://[2002:a00:1::1]/", "10.0.0.1 through a tunnel"),  # 6to4 of a private address
        ("https://[2002:7f00:1::1]/", "127.0.0.1 through a tunnel"),
        ("https://[2002:a9fe:a9fe::1]/", "169.254.169.254 through a tunnel"),  # metadata
        ("https://[2002:808:808::1]/", None),  # 6to4 of a public address
        ("https://[64:ff9b::a00:1]/", "reserved"),  # NAT64 of a private address
        ("https://0.0.0.0/", "unspecified"),
        ("https://224.0.0.1/", "multicast"),
        ("https://100.64.0.1/", "not a public address"),
        ("https://localhost/in", "localhost"),
        ("https:///in", "no host"),
        ("https://hooks.clinic.example:99999/", "not a valid URL"),
    ],
)
def test_registration_urls(url: str, problem: str | None) -> None:
    found = check_registration_url(url, frozenset())
    if problem is None:
        assert found is None
    else:
        assert found is not None
        assert problem in found


def test_allowed_hosts_may_use_http_and_private_addresses_but_never_credentials() -> None:
    allow = parse_allow_hosts(" localhost, 127.0.0.1 ,Receiver.Local")
    assert allow == frozenset({"localhost", "127.0.0.1", "receiver.local"})
    assert check_registration_url("http://localhost:8080/in", allow) is None
    assert check_registration_url("http://127.0.0.1:8080/in", allow) is None
    assert check_registration_url("http://receiver.local/in", allow) is None
    assert check_registration_url("http://u:p@localhost/in", allow) is not None
    assert check_registration_url("http://10.0.0.1/in", allow) is not None


def test_address_problems() -> None:
    assert address_problem("8.8.8.8") is None
    assert address_problem("2606:4700::1111") is None
    assert "loopback" in (address_problem("127.0.0.2") or "")
    assert "not an IP address" in (address_problem("example.com") or "")


def test_new_secrets_are_accepted_by_standardwebhooks_and_differ() -> None:
    secrets = {new_secret() for _ in range(20)}
    assert len(secrets) == 20
    for secret in secrets:
        assert secret.startswith("whsec_")
        hook = Webhook(secret)
        signature = hook.sign("msg_1", NOW, "{}")
        assert signature.startswith("v1,")


# -- words ---------------------------------------------------------------------------------------


def test_alert_email_subjects_carry_no_patient_and_no_line_breaks() -> None:
    alert = {
        "id": "a1",
        "serial": "NGP1",
        "priority": "high",
        "rule": "flow_stopped",
        "status": "open",
        "title": "Drug delivery stopped:\nmotor stall",
        "detail": "What to do.",
        "opened_at": NOW.isoformat(),
        "updated_at": NOW.isoformat(),
    }
    content = alert_email(
        "alert.opened",
        alert,
        clinic_name="Spinal <unit>",
        tz=BERLIN,
        patient=PatientRef("Jane Roe", "MRN-1"),
    )
    assert "\n" not in content.subject
    assert "Jane Roe" not in content.subject
    assert "Jane Roe" in content.text
    assert "Spinal &lt;unit&gt;" in content.html
    assert "2026-11-24 13:00 CET" in content.text


def test_notices_show_a_webhook_url_without_its_query_or_credentials() -> None:
    from services.domain.webhook_urls import redacted

    url = "https://user:pw@hooks.clinic.example:8443/in/pumpwatch?token=s3cret#frag"
    assert redacted(url) == "https://hooks.clinic.example:8443/in/pumpwatch"
    assert redacted("https://hooks.clinic.example/in?key=abc") == "https://hooks.clinic.example/in"
    assert redacted("https://[::1:99999/") == "(not a valid URL)"
