"""Settings of ``pumpwatch ingest`` (environment, prefix ``PUMPWATCH_``)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import Field

from services.settings import CommonSettings, default_client_id


class IngestSettings(CommonSettings):
    mqtt_client_id: str = Field(default_factory=lambda: default_client_id("ingest"))
    """Stable per instance: the broker keeps this client's persistent session."""
    mqtt_share_group: str = ""
    """Shared-subscription group for several instances (e.g. ``pumpwatch-ingest``); empty (the
    default) for a plain subscription. Mosquitto 2.0 restores a persistent session's plain
    subscriptions after a restart but not its ``$share`` ones, so only the plain one loses
    nothing across a broker restart (docs/reliability.md)."""
    mqtt_topic_prefix: str = ""
    """Prefix before ``pumps/…``, e.g. ``site-a`` for ``site-a/pumps/+/telemetry``."""
    mqtt_protocol: Literal["5", "3.1.1"] = "5"
    mqtt_session_expiry_s: int = Field(default=7 * 24 * 3600, ge=0)
    """How long the broker keeps our session (and queues messages) while we are away."""
    mqtt_receive_maximum: int = Field(default=1000, ge=1, le=65535)
    """Unacknowledged messages the broker may send us at once (MQTT 5 Receive Maximum)."""
    mqtt_keepalive_s: int = Field(default=30, ge=5)
    mqtt_reconnect_max_delay_s: float = Field(default=0.5, gt=0, le=60)
    """Longest wait between reconnection attempts (from 0.05 s, growing by half each time).
    Short, so ingest re-subscribes before devices reconnect after a broker restart."""

    metrics_port: int = Field(default=9101, ge=0, le=65535)
    """Prometheus /metrics, /healthz and /readyz; 0 disables the server."""
    metrics_host: str = "0.0.0.0"  # noqa: S104 - scraped from other containers

    ingest_batch_max_messages: int = Field(default=500, ge=1)
    ingest_batch_max_wait_ms: int = Field(default=50, ge=0)
    ingest_commits_in_flight: int = Field(default=2, ge=1, le=8)
    """Batches committing at once (one database connection each). 1 keeps commits in order."""
    ingest_backlog_max_messages: int = Field(default=2000, ge=1)
    """Bound of the in-memory backlog; reading pauses when it is full."""
    ingest_clock_skew_max_s: float = Field(default=300.0, ge=0)
    """recorded_at further ahead of the server clock than this is quarantined (clock_skew)."""
    ingest_oldest_recorded_at: datetime = datetime(2000, 1, 1, tzinfo=UTC)
    """recorded_at before this is quarantined (too_old): an unset pump clock, not history."""
    ingest_live_window_s: float = Field(default=600.0, gt=0)
    """Readings recorded within this of now count as live for the lag metric."""
    ingest_stall_timeout_s: float = Field(default=60.0, gt=0)
    """Unhealthy when messages wait and nothing was committed for this long."""
    ingest_drain_timeout_s: float = Field(default=30.0, gt=0)
    """On SIGTERM, how long to try committing what is in flight before exiting anyway."""
    partitions_ahead_months: int = Field(default=3, ge=1)
    readings_retention_days: int | None = Field(default=None, ge=31)
    """Drop readings partitions wholly older than this; unset keeps everything."""
    ingest_maintenance_interval_s: float = Field(default=3600.0, gt=0)
    """Partitions ahead and retention run this often."""
    ingest_retire_idle_s: float = Field(default=5.0, gt=0)
    """``--retire`` ends the session once nothing has arrived for this long."""
    ingest_gauge_interval_s: float = Field(default=30.0, gt=0)
    """The open-gap gauges are recounted in the database this often."""

    backfill_give_up_after_s: float = Field(default=3600.0, gt=0)
    """A sequence gap not filled this long after its detection is marked ``unrecoverable``:
    never asked for again, and the telemetry_gap alert is raised for it. An hour, as long as
    the alert used to wait for any open gap: backfill never makes that alert later."""
    backfill_settle_s: float = Field(default=5.0, ge=0)
    """A new gap is first asked for once it has stood this long: a gap opened for a moment by
    commits in flight or by several instances closes by itself meanwhile."""
    backfill_retry_initial_s: float = Field(default=30.0, gt=0)
    """The first repeat of an unanswered resend comes after this; each further one after
    twice the previous wait…"""
    backfill_retry_max_s: float = Field(default=900.0, gt=0)
    """…at most this."""
    backfill_poll_interval_s: float = Field(default=1.0, gt=0)
    """The backfill worker looks for due requests and expired gaps this often (and at once
    when a commit opened a gap)."""
    backfill_batch_max_gaps: int = Field(default=200, ge=1)
    """Gaps claimed (and resend commands published) per round."""

    def topics(self) -> list[str]:
        prefix = f"{self.mqtt_topic_prefix.strip('/')}/" if self.mqtt_topic_prefix else ""
        share = f"$share/{self.mqtt_share_group}/" if self.mqtt_share_group else ""
        return [f"{share}{prefix}pumps/+/telemetry", f"{share}{prefix}pumps/+/events"]

    def command_topic(self, serial: str) -> str:
        """Where a pump's devices read their commands (backfill's ``resend``)."""
        prefix = f"{self.mqtt_topic_prefix.strip('/')}/" if self.mqtt_topic_prefix else ""
        return f"{prefix}pumps/{serial}/commands"
