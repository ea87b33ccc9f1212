"""Prometheus metrics of the notification worker. Labels are bounded sets (channels,
statuses, outcomes).

The worker's metrics keep the ``pumpwatch_alerts_notify_`` prefix wherever it runs (a thread of
``pumpwatch alerts`` or ``pumpwatch notify``), so dashboards and alert rules do not change.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics


class NotifyMetrics:
    """The notification worker's metrics: all that ``pumpwatch notify`` serves. Labels are
    channels (webhook, email, mqtt), statuses and outcomes."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.deliveries = Counter(
            "pumpwatch_alerts_notify_deliveries",
            "Deliveries that ended: delivered, failed (retries exhausted), cancelled (target "
            "deleted or disabled); by channel.",
            ["channel", "status"],
            registry=r,
        )
        self.attempts = Counter(
            "pumpwatch_alerts_notify_attempts",
            "Delivery attempts by channel and outcome (delivered, http_status, redirect, "
            "timeout, network, blocked, rejected, error, interrupted).",
            ["channel", "outcome"],
            registry=r,
        )
        self.attempt_seconds = Histogram(
            "pumpwatch_alerts_notify_attempt_seconds",
            "Duration of one delivery attempt, by channel.",
            ["channel"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.delivery_latency_seconds = Histogram(
            "pumpwatch_alerts_notify_latency_seconds",
            "From the outbox event's commit to its delivery, by channel (first-attempt "
            "deliveries that quiet hours did not delay).",
            ["channel"],
            buckets=(0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 5, 10, 30, 60),
            registry=r,
        )
        self.outbox_backlog = Gauge(
            "pumpwatch_alerts_notify_outbox_backlog_events",
            "Outbox events not yet turned into deliveries.",
            registry=r,
        )
        self.outbox_oldest_age = Gauge(
            "pumpwatch_alerts_notify_outbox_oldest_age_seconds",
            "Age of the oldest outbox event not yet turned into deliveries (0: none).",
            registry=r,
        )
        self.pending_deliveries = Gauge(
            "pumpwatch_alerts_notify_pending_deliveries",
            "Deliveries not yet delivered, failed or cancelled (waiting, retrying, in flight).",
            registry=r,
        )
        self.events_dispatched = Counter(
            "pumpwatch_alerts_notify_events_dispatched",
            "Outbox events turned into deliveries.",
            registry=r,
        )
        self.fanout_failures = Counter(
            "pumpwatch_alerts_notify_fanout_failures",
            "Outbox events whose deliveries could not be built (a bug): left in the outbox, "
            "tried again at the next pass, never dropped.",
            registry=r,
        )
        self.escalations = Counter(
            "pumpwatch_alerts_notify_escalations",
            "Unacknowledged high alerts re-sent to the escalation contacts.",
            registry=r,
        )
        self.digests = Counter(
            "pumpwatch_alerts_notify_digests",
            "Daily refill digests made (one per clinic and day).",
            registry=r,
        )
        self.webhooks_disabled = Counter(
            "pumpwatch_alerts_notify_webhooks_disabled",
            "Webhooks disabled after failing deliveries in a row.",
            registry=r,
        )
        self.mqtt_connected = Gauge(
            "pumpwatch_alerts_notify_mqtt_connected",
            "1 while the notification MQTT client is connected.",
            registry=r,
        )
