"""Prometheus metrics of the alert service. Labels are bounded sets (actions, rules,
priorities)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics


class AlertsMetrics:
    """The alert engine's metrics (``pumpwatch alerts`` serves the notification worker's beside
    them, on the same registry, when the worker runs on its thread)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.evaluations = Counter(
            "pumpwatch_alerts_evaluations",
            "Pump evaluations (all rules over one pump).",
            registry=r,
        )
        self.errors = Counter(
            "pumpwatch_alerts_evaluation_errors",
            "Pump evaluations that failed on a rule's error (the pump is retried later).",
            registry=r,
        )
        self.changes = Counter(
            "pumpwatch_alerts_changes",
            "Alert changes: opened, reopened, escalated, eased, resolved; by rule and priority.",
            ["action", "rule", "priority"],
            registry=r,
        )
        self.latency_seconds = Histogram(
            "pumpwatch_alerts_latency_seconds",
            "From ingest's commit of new data to the alert change it caused.",
            buckets=(0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 5, 10, 30, 60),
            registry=r,
        )
        self.batch_seconds = Histogram(
            "pumpwatch_alerts_batch_seconds",
            "Time to evaluate one batch of pumps.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.pending = Gauge(
            "pumpwatch_alerts_pending_pumps", "Pumps waiting for evaluation.", registry=r
        )
        self.sweeps = Counter(
            "pumpwatch_alerts_sweeps", "Sweeps queueing every pump (time-driven rules).", registry=r
        )
        self.notifications = Counter(
            "pumpwatch_alerts_notifications",
            "Change notifications received from ingest.",
            registry=r,
        )
        self.database_up = Gauge(
            "pumpwatch_alerts_database_up",
            "1 while the last database operation succeeded.",
            registry=r,
        )
