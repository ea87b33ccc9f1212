"""Settings of the notification worker (``pumpwatch notify``, or a thread of ``pumpwatch
alerts``): environment, prefix ``PUMPWATCH_``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote, urlsplit

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from services.domain.alerting import RuleSettings
from services.domain.webhook_urls import parse_allow_hosts
from services.settings import CommonSettings


class NotifySettings(CommonSettings):
    """What the notification worker reads, in ``pumpwatch notify`` and in ``pumpwatch alerts``
    (which runs the worker on a thread of its own unless ``PUMPWATCH_NOTIFY_ENABLED=false``;
    there its ``metrics_port`` is the alert service's)."""

    model_config = SettingsConfigDict(
        env_prefix="PUMPWATCH_",
        env_nested_delimiter="__",
        extra="ignore",
        use_attribute_docstrings=True,
    )

    rules: RuleSettings = RuleSettings()
    """Rule thresholds, e.g. ``PUMPWATCH_RULES__REFILL_DUE_LOW_DAYS=21`` (global defaults;
    clinics override the per-clinic ones). The daily digest forecasts refills with them."""
    metrics_port: int = Field(default=9103, ge=0, le=65535)
    """Prometheus /metrics, /healthz and /readyz; 0 disables the server."""
    metrics_host: str = "0.0.0.0"  # noqa: S104 - scraped from other containers
    notify_concurrency: int = Field(default=16, ge=1, le=1000)
    """Deliveries attempted at once by this instance."""
    notify_batch_max_events: int = Field(default=200, ge=1)
    """Outbox events turned into deliveries in one transaction."""
    notify_poll_interval_s: float = Field(default=1.0, gt=0)
    """How often due deliveries and the outbox are looked at without a wake-up (the outbox's
    trigger wakes the worker at once; retries and other instances' work are polled)."""
    notify_lease_s: float = Field(default=120.0, gt=0)
    """A claimed delivery is retried by any instance if no outcome is recorded within this
    (the claiming process died): at least once, never lost. Must exceed the send timeouts."""
    notify_retry_first_s: float = Field(default=10.0, gt=0)
    """Backoff: the wait after the first failed attempt, doubling after each further one…"""
    notify_retry_max_s: float = Field(default=3600.0, gt=0)
    """…up to this…"""
    notify_retry_jitter_fraction: float = Field(default=0.2, ge=0, lt=1)
    """…each wait spread at random by ± this fraction (receivers recovering from an outage
    are not hit by every sender at once)…"""
    notify_retry_window_s: float = Field(default=86400.0, gt=0)
    """…and a delivery is retried for this long after it was due (the HTTP contract promises
    at least 24 h), its last attempt at the end; then it is failed and the clinic's admin
    contacts are told."""
    notify_escalation_check_s: float = Field(default=30.0, gt=0)
    """How often unacknowledged high alerts are looked for (escalation)."""
    notify_digest_check_s: float = Field(default=60.0, gt=0)
    """How often clinics are checked for a daily digest due."""
    notify_gauge_interval_s: float = Field(default=5.0, gt=0)
    """How often the outbox backlog and pending deliveries are counted for /metrics."""
    webhook_allow_hosts: str = ""
    """Comma-separated hosts webhooks may reach over http and on private or loopback addresses
    (development, tests, on-premises receivers); others must be https to public addresses."""
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    """Connect, send and read timeout of one webhook request."""
    webhook_disable_after_failures: int = Field(default=5, ge=1)
    """A webhook whose deliveries failed (retries exhausted) this many times in a row is
    disabled and the clinic told; any success resets the count."""
    smtp_url: str | None = None
    """``smtp://user:pass@host:port`` (or ``smtps://`` for TLS from the start); unset: email is
    not sent (deliveries wait and fail after the retry window)."""
    smtp_starttls: Literal["require", "auto", "off"] = "require"
    """For ``smtp://``: ``require`` STARTTLS, upgrade when offered (``auto``), or never
    (``off``: a relay on the same host)."""
    smtp_from: str = "pumpwatch <pumpwatch@localhost>"
    """The From header and envelope sender of notification emails."""
    smtp_timeout_s: float = Field(default=30.0, gt=0)
    mqtt_topic_prefix: str = ""
    """As for ingest: ``site-a`` publishes ``site-a/clinics/{clinic_id}/alerts``."""
    notify_mqtt_timeout_s: float = Field(default=10.0, gt=0)
    """How long a publish may wait for the broker's PUBACK before the attempt counts as
    failed."""

    @field_validator("smtp_url")
    @classmethod
    def _check_smtp_url(cls, value: str | None) -> str | None:
        if value:
            parse_smtp_url(value)
        return value or None

    def allow_hosts(self) -> frozenset[str]:
        return parse_allow_hosts(self.webhook_allow_hosts)

    def smtp(self) -> SmtpTarget | None:
        return None if not self.smtp_url else parse_smtp_url(self.smtp_url)


@dataclass(frozen=True, slots=True)
class SmtpTarget:
    host: str
    port: int
    username: str | None
    password: str | None
    tls: bool
    """``smtps://``: TLS from the first byte (port 465)."""

    def redacted(self) -> str:
        user = f"{self.username}@" if self.username else ""
        return f"{'smtps' if self.tls else 'smtp'}://{user}{self.host}:{self.port}"


def parse_smtp_url(url: str) -> SmtpTarget:
    parts = urlsplit(url)
    if parts.scheme not in ("smtp", "smtps"):
        raise ValueError(f"SMTP URL must start with smtp:// or smtps://, not {parts.scheme!r}")
    if not parts.hostname:
        raise ValueError("SMTP URL has no host")
    tls = parts.scheme == "smtps"
    try:
        port = parts.port or (465 if tls else 587)
    except ValueError as exc:
        raise ValueError(f"SMTP URL has a bad port: {exc}") from exc
    return SmtpTarget(
        host=parts.hostname,
        port=port,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        tls=tls,
    )
