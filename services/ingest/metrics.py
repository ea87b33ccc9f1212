"""Prometheus metrics of the ingest service. Labels are bounded sets; never serials."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from services.domain.contract import Reason


class IngestMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # *_created series double the output and nobody graphs them
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.received = Counter(
            "pumpwatch_ingest_messages_received",
            "Messages handed over by the broker.",
            ["kind"],
            registry=r,
        )
        self.stored = Counter(
            "pumpwatch_ingest_messages_stored",
            "Messages stored for the first time.",
            ["kind"],
            registry=r,
        )
        self.duplicates = Counter(
            "pumpwatch_ingest_messages_duplicate",
            "Messages whose msg_id was already stored.",
            registry=r,
        )
        self.quarantined = Counter(
            "pumpwatch_ingest_messages_quarantined",
            "Messages quarantined, by reason.",
            ["reason"],
            registry=r,
        )
        for reason in Reason:
            self.quarantined.labels(reason=reason.value)
        for kind in ("telemetry", "events"):
            self.received.labels(kind=kind)
            self.stored.labels(kind=kind)
        self.received.labels(kind="unknown")
        self.sequence_gaps = Counter(
            "pumpwatch_ingest_sequence_gaps",
            "Gaps opened in a (pump, source) sequence.",
            registry=r,
        )
        self.sequence_missing = Counter(
            "pumpwatch_ingest_sequence_missing_messages",
            "Messages missing from sequences when their gap was detected.",
            registry=r,
        )
        self.sequence_filled = Counter(
            "pumpwatch_ingest_sequence_late_messages",
            "Messages that arrived late and closed (part of) a gap.",
            registry=r,
        )
        self.gaps_open = Gauge(
            "pumpwatch_ingest_sequence_gaps_open",
            "Gaps not (yet) filled and still asked for (backfill), as last counted in the "
            "database (pieces of a split gap count apart).",
            registry=r,
        )
        self.missing_open = Gauge(
            "pumpwatch_ingest_sequence_missing_open_messages",
            "Messages in open gaps, as last counted in the database.",
            registry=r,
        )
        self.gaps_unrecoverable = Gauge(
            "pumpwatch_ingest_sequence_gaps_unrecoverable",
            "Gaps given up on (not filled within the give-up time), as last counted in the "
            "database.",
            registry=r,
        )
        self.missing_unrecoverable = Gauge(
            "pumpwatch_ingest_sequence_missing_unrecoverable_messages",
            "Messages in unrecoverable gaps, as last counted in the database.",
            registry=r,
        )
        # Backfill (MQTT contract 1.1): resend requests and what came of them.
        self.backfill_requests = Counter(
            "pumpwatch_ingest_backfill_requests",
            "resend commands published to devices, one per gap (piece) and attempt.",
            registry=r,
        )
        self.backfill_refused = Counter(
            "pumpwatch_ingest_backfill_requests_refused",
            "resend commands the broker refused or could not take (not connected, not "
            "authorised); the gap is asked for again at its next due time.",
            registry=r,
        )
        self.gaps_recovered = Counter(
            "pumpwatch_ingest_backfill_gaps_recovered",
            "Gaps wholly filled; requested: whether a resend had been asked for (else the "
            "messages were only late, e.g. commits in flight).",
            ["requested"],
            registry=r,
        )
        self.recovery_seconds = Histogram(
            "pumpwatch_ingest_backfill_recovery_seconds",
            "Time from a gap's detection to the commit that filled it.",
            ["requested"],
            buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 86400),
            registry=r,
        )
        for requested in ("true", "false"):
            self.gaps_recovered.labels(requested=requested)
            self.recovery_seconds.labels(requested=requested)
        self.gaps_given_up = Counter(
            "pumpwatch_ingest_backfill_gaps_unrecoverable",
            "Gaps marked unrecoverable: not filled within the give-up time.",
            registry=r,
        )
        self.missing_given_up = Counter(
            "pumpwatch_ingest_backfill_unrecoverable_messages",
            "Messages in gaps marked unrecoverable.",
            registry=r,
        )
        self.batch_size = Histogram(
            "pumpwatch_ingest_batch_size_messages",
            "Messages per committed batch.",
            buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2000),
            registry=r,
        )
        self.commit_seconds = Histogram(
            "pumpwatch_ingest_commit_seconds",
            "Time to store one batch, from BEGIN to COMMIT.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.lag_seconds = Histogram(
            "pumpwatch_ingest_lag_seconds",
            "now - recorded_at at commit, for live readings (history uploads excluded).",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
            registry=r,
        )
        self.backlog = Gauge(
            "pumpwatch_ingest_backlog_messages",
            "Messages received and not yet committed.",
            registry=r,
        )
        self.backlog_capacity = Gauge(
            "pumpwatch_ingest_backlog_capacity_messages",
            "Backlog size at which reading from the broker pauses.",
            registry=r,
        )
        self.reading_paused = Counter(
            "pumpwatch_ingest_read_pauses",
            "Times reading paused because the backlog was full.",
            registry=r,
        )
        self.mqtt_connected = Gauge(
            "pumpwatch_ingest_mqtt_connected", "1 while connected to the broker.", registry=r
        )
        self.database_up = Gauge(
            "pumpwatch_ingest_database_up",
            "1 while the last database operation succeeded.",
            registry=r,
        )
        self.store_retries = Counter(
            "pumpwatch_ingest_store_retries",
            "Batches retried after a database or connection failure.",
            registry=r,
        )
        self.last_commit = Gauge(
            "pumpwatch_ingest_last_commit_timestamp_seconds",
            "Unix time of the last committed batch.",
            registry=r,
        )
        self.partitions_created = Counter(
            "pumpwatch_ingest_partitions_created",
            "Monthly readings partitions created.",
            registry=r,
        )
