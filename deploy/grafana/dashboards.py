"""The Grafana dashboards, generated with grafana-foundation-sdk.

``python -m deploy.grafana.dashboards`` writes ``deploy/grafana/dashboards/*.json``, which
Grafana loads through ``provisioning/dashboards/pumpwatch.yml``; a test fails while the committed
files differ from what this module makes, so edit here and regenerate.

*Fleet health* is for device teams and reads PostgreSQL through the read views of migration
``0007_grafana.sql`` (schema ``grafana``, role ``pumpwatch_grafana``): state and rollups only, so
a panel's cost depends on the fleet and the time window, not on stored history. *Pipeline* is for
operators and reads Prometheus (the services' own metrics).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Literal

from grafana_foundation_sdk.builders import (
    barchart,
    common,
    dashboard,
    prometheus,
    stat,
    table,
    timeseries,
)
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as common_models
from grafana_foundation_sdk.models import dashboard as dashboard_models

HERE = Path(__file__).resolve().parent
OUTPUT_DIR = HERE / "dashboards"

PROMETHEUS = dashboard_models.DataSourceRef(type_val="prometheus", uid="prometheus")
POSTGRES = dashboard_models.DataSourceRef(
    type_val="grafana-postgresql-datasource", uid="pumpwatch-postgres"
)

SqlFormat = Literal["table", "time_series"]


class SqlQuery(cogvariants.Dataquery):
    """A query of Grafana's PostgreSQL data source in code mode (the SDK has no model for it)."""

    def __init__(self, ref_id: str, raw_sql: str, fmt: SqlFormat) -> None:
        self.ref_id = ref_id
        self.raw_sql = raw_sql
        self.fmt = fmt

    def to_json(self) -> dict[str, object]:
        return {
            "datasource": POSTGRES.to_json(),
            "editorMode": "code",
            "format": self.fmt,
            "rawQuery": True,
            "rawSql": self.raw_sql,
            "refId": self.ref_id,
        }


class Sql(cogbuilder.Builder[cogvariants.Dataquery]):
    def __init__(self, raw_sql: str, fmt: SqlFormat = "table", ref_id: str = "A") -> None:
        self._query = SqlQuery(ref_id, _dedent(raw_sql), fmt)

    def build(self) -> cogvariants.Dataquery:
        return self._query


def _dedent(sql: str) -> str:
    lines = [line.rstrip() for line in sql.splitlines()]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    indent = min(len(line) - len(line.lstrip()) for line in lines if line)
    return "\n".join(line[indent:] for line in lines)


Target = cogbuilder.Builder[cogvariants.Dataquery]


def prom(expr: str, legend: str = "", ref_id: str = "A") -> Target:
    query = prometheus.Dataquery().expr(expr).range().ref_id(ref_id).datasource(PROMETHEUS)
    return query.legend_format(legend) if legend else query


def _stat(title: str, description: str, span: int = 6, height: int = 5) -> stat.Panel:
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .span(span)
        .height(height)
        .graph_mode(common_models.BigValueGraphMode.NONE)
        .color_mode(common_models.BigValueColorMode.VALUE)
        .text_mode(common_models.BigValueTextMode.VALUE_AND_NAME)
        .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    )


def _series(title: str, description: str, unit: str, span: int = 12) -> timeseries.Panel:
    return (
        timeseries.Panel()
        .title(title)
        .description(description)
        .unit(unit)
        .span(span)
        .height(8)
        .legend(
            common.VizLegendOptions()
            .display_mode(common_models.LegendDisplayMode.LIST)
            .placement(common_models.LegendPlacement.BOTTOM)
            .show_legend(True)
        )
    )


def _bars(title: str, description: str, x_field: str, span: int = 12) -> barchart.Panel:
    return (
        barchart.Panel()
        .title(title)
        .description(description)
        .span(span)
        .height(8)
        .x_field(x_field)
        .legend(
            common.VizLegendOptions()
            .display_mode(common_models.LegendDisplayMode.LIST)
            .placement(common_models.LegendPlacement.BOTTOM)
            .show_legend(True)
        )
    )


def _table(title: str, description: str, span: int = 12, height: int = 8) -> table.Panel:
    return table.Panel().title(title).description(description).span(span).height(height)


# --- Fleet health (PostgreSQL) ------------------------------------------------------------------


def fleet_health() -> dashboard.Dashboard:
    return (
        dashboard.Dashboard("pumpwatch: fleet health")
        .uid("pumpwatch-fleet-health")
        .description(
            "Which pumps report, how soon reservoirs run low, open alerts, device alarms by "
            "model and firmware, batteries, refill discrepancies and lost messages. De-identified: "
            "serials and models, never patients."
        )
        .tags(["pumpwatch", "fleet"])
        .readonly()
        .time("now-7d", "now")
        .refresh("1m")
        .timezone("utc")
        .with_row(dashboard.Row("Reporting"))
        .with_panel(
            _stat(
                "Pumps reporting / silent",
                "Pumps whose newest reading was recorded within 24 hours, and those without one "
                "for longer (or never). grafana.pump_status.",
            ).with_target(
                Sql(
                    """
                    SELECT count(*) FILTER (WHERE reporting = 'reporting') AS "reporting",
                           count(*) FILTER (WHERE reporting = 'silent') AS "silent"
                    FROM grafana.pump_status
                    """
                )
            )
        )
        .with_panel(
            _stat(
                "Silent by the alert rule",
                "Open pump_silent alerts: silent longer than min(7 days, half the time to the "
                "low alarm), the clinic's setting.",
            ).with_target(
                Sql(
                    """
                    SELECT count(*) AS "pump_silent alerts"
                    FROM grafana.open_alerts
                    WHERE rule = 'pump_silent'
                    """
                )
            )
        )
        .with_panel(
            _series(
                "Pumps reporting per hour",
                "Pumps with a reading recorded in each hour, and the readings (hourly rollups).",
                "short",
            ).with_target(
                Sql(
                    """
                    SELECT hour AS "time", pumps_reporting AS "pumps reporting",
                           readings AS "readings"
                    FROM grafana.hourly_activity
                    WHERE $__timeFilter(hour)
                    ORDER BY 1
                    """,
                    "time_series",
                )
            )
        )
        .with_panel(
            _table(
                "Silent pumps",
                "No reading recorded for 24 hours, longest silent first.",
                span=24,
            ).with_target(
                Sql(
                    """
                    SELECT serial, model, firmware, last_reading_at AS "last reading",
                           round(hours_since_reading::numeric, 1) AS "hours silent"
                    FROM grafana.pump_status
                    WHERE reporting = 'silent'
                    ORDER BY last_reading_at NULLS FIRST
                    LIMIT 200
                    """
                )
            )
        )
        .with_row(dashboard.Row("Reservoirs and alerts"))
        .with_panel(
            _bars(
                "Days to the low-reservoir alarm",
                "Pumps by days until their reservoir reaches its low alarm, projected from the "
                "newest reading at the programmed average rate.",
                "days to low alarm",
            ).with_target(
                Sql(
                    """
                    SELECT bucket AS "days to low alarm", count(*) AS "pumps"
                    FROM grafana.refill_horizon
                    GROUP BY bucket, bucket_order
                    ORDER BY bucket_order
                    """
                )
            )
        )
        .with_panel(
            _stat(
                "Open alerts by priority",
                "Alerts open or acknowledged, not yet resolved.",
                span=12,
                height=8,
            ).with_target(
                Sql(
                    """
                    SELECT count(*) FILTER (WHERE priority = 'high') AS "high",
                           count(*) FILTER (WHERE priority = 'medium') AS "medium",
                           count(*) FILTER (WHERE priority = 'low') AS "low"
                    FROM grafana.open_alerts
                    """
                )
            )
        )
        .with_panel(
            _bars(
                "Open alerts by rule",
                "Alerts open or acknowledged, by rule, split by priority.",
                "rule",
                span=24,
            )
            .stacking(common_models.StackingMode.NORMAL)
            .with_target(
                Sql(
                    """
                    SELECT rule,
                           count(*) FILTER (WHERE priority = 'high') AS "high",
                           count(*) FILTER (WHERE priority = 'medium') AS "medium",
                           count(*) FILTER (WHERE priority = 'low') AS "low"
                    FROM grafana.open_alerts
                    GROUP BY rule
                    ORDER BY count(*) DESC, rule
                    """
                )
            )
        )
        .with_row(dashboard.Row("Devices"))
        .with_panel(
            _table(
                "Pumps by model and firmware",
                "Firmware of the source that sent each pump's newest reading.",
            ).with_target(
                Sql(
                    """
                    SELECT model, firmware, count(*) AS "pumps",
                           count(*) FILTER (WHERE reporting = 'reporting') AS "reporting",
                           count(*) FILTER (WHERE cardinality(alarms) > 0) AS "with alarms",
                           count(*) FILTER (WHERE battery_status IN ('eri', 'eos'))
                               AS "battery ERI/EOS"
                    FROM grafana.pump_status
                    GROUP BY model, firmware
                    ORDER BY model, firmware
                    """
                )
            )
        )
        .with_panel(
            _table(
                "Device alarms by model and firmware",
                "Alarms active at each pump's newest reading.",
            ).with_target(
                Sql(
                    """
                    SELECT model, firmware, alarm, count(*) AS "pumps"
                    FROM grafana.device_alarms
                    GROUP BY model, firmware, alarm
                    ORDER BY count(*) DESC, model, firmware, alarm
                    """
                )
            )
        )
        .with_panel(
            _stat(
                "Batteries: ERI / EOS",
                "ERI: elective replacement indicator, the pump stops within 90 days. EOS: end "
                "of service, the pump has stopped. From battery status or alarm.",
                span=24,
            ).with_target(
                Sql(
                    """
                    SELECT count(*) FILTER (WHERE battery_status = 'eri' OR 'eri' = ANY(alarms))
                               AS "ERI",
                           count(*) FILTER (WHERE battery_status = 'eos' OR 'eos' = ANY(alarms))
                               AS "EOS"
                    FROM grafana.pump_status
                    """
                )
            )
        )
        .with_row(dashboard.Row("Refill discrepancies"))
        .with_panel(
            _bars(
                "Refill discrepancy distribution",
                "Refills in the time range by expected minus measured residual (mL): positive, "
                "less left than expected (over-delivery); negative, more left (under-delivery). "
                "Beyond 2 mL deserves a look.",
                "expected - measured (mL)",
            ).with_target(
                Sql(
                    """
                    SELECT b.label AS "expected - measured (mL)", count(d.n) AS "refills"
                    FROM (VALUES (1, '< -4'), (2, '-4 to -2'), (3, '-2 to -1'), (4, '-1 to 1'),
                                 (5, '1 to 2'), (6, '2 to 4'), (7, '>= 4')) AS b(n, label)
                    LEFT JOIN (
                        SELECT width_bucket(discrepancy_ml,
                                            ARRAY[-4, -2, -1, 1, 2, 4]::double precision[]) + 1
                               AS n
                        FROM grafana.refill_discrepancies
                        WHERE $__timeFilter(recorded_at) AND discrepancy_ml IS NOT NULL
                    ) d ON d.n = b.n
                    GROUP BY b.n, b.label
                    ORDER BY b.n
                    """
                )
            )
        )
        .with_panel(
            _series(
                "Refill discrepancy trend",
                "Per day: the mean discrepancy of the day's refills, and how many were beyond "
                "2 mL either way.",
                "short",
            ).with_target(
                Sql(
                    """
                    SELECT $__timeGroupAlias(recorded_at, '1d'),
                           avg(discrepancy_ml) AS "mean discrepancy (mL)",
                           count(*) FILTER (WHERE abs(discrepancy_ml) > 2)
                               AS "refills beyond 2 mL"
                    FROM grafana.refill_discrepancies
                    WHERE $__timeFilter(recorded_at) AND discrepancy_ml IS NOT NULL
                    GROUP BY 1
                    ORDER BY 1
                    """,
                    "time_series",
                )
            )
        )
        .with_panel(
            _table(
                "Largest refill discrepancies",
                "Refills in the time range, largest discrepancy first. Expected: as the "
                "programmer reported it, or the last reading advanced by the programmed rate.",
                span=24,
            ).with_target(
                Sql(
                    """
                    SELECT recorded_at AS "refill", serial, model,
                           round(expected_residual_ml::numeric, 2) AS "expected (mL)",
                           round(residual_ml::numeric, 2) AS "measured (mL)",
                           round(discrepancy_ml::numeric, 2) AS "discrepancy (mL)",
                           expected_from AS "expected from"
                    FROM grafana.refill_discrepancies
                    WHERE $__timeFilter(recorded_at) AND discrepancy_ml IS NOT NULL
                    ORDER BY abs(discrepancy_ml) DESC, recorded_at DESC
                    LIMIT 50
                    """
                )
            )
        )
        .with_row(dashboard.Row("Sequence gaps"))
        .with_panel(
            _stat(
                "Open sequence gaps",
                "Messages a device numbered and pumpwatch never received, still missing.",
                span=8,
                height=8,
            ).with_target(
                Sql(
                    """
                    SELECT count(*) AS "open gaps",
                           coalesce(sum(missing_messages), 0) AS "missing messages",
                           count(DISTINCT serial) AS "pumps"
                    FROM grafana.sequence_gaps
                    """
                )
            )
        )
        .with_panel(
            _series(
                "Sequence gaps opened",
                "Gaps still open, by the hour they were detected.",
                "short",
                span=16,
            ).with_target(
                Sql(
                    """
                    SELECT $__timeGroupAlias(detected_at, '1h'), count(*) AS "gaps",
                           sum(missing_messages) AS "missing messages"
                    FROM grafana.sequence_gaps
                    WHERE $__timeFilter(detected_at)
                    GROUP BY 1
                    ORDER BY 1
                    """,
                    "time_series",
                )
            )
        )
        .with_panel(
            _table(
                "Pumps with the most missing messages",
                "Per pump and source (home hub, programmer).",
                span=24,
            ).with_target(
                Sql(
                    """
                    SELECT serial, model, source_id AS "source", count(*) AS "gaps",
                           sum(missing_messages) AS "missing messages",
                           min(detected_at) AS "oldest gap"
                    FROM grafana.sequence_gaps
                    GROUP BY serial, model, source_id
                    ORDER BY sum(missing_messages) DESC, serial
                    LIMIT 50
                    """
                )
            )
        )
    )


# --- Pipeline (Prometheus) ----------------------------------------------------------------------

RATE = "$__rate_interval"


def _quantiles(metric: str, by: str = "") -> list[Target]:
    group = f"{by}, le" if by else "le"
    prefix = f"{{{{{by}}}}} " if by else ""
    return [
        prom(
            f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket[{RATE}])))",
            f"{prefix}p{round(q * 100)}",
            ref_id,
        )
        for q, ref_id in ((0.5, "A"), (0.95, "B"), (0.99, "C"))
    ]


def pipeline() -> dashboard.Dashboard:
    return (
        dashboard.Dashboard("pumpwatch: pipeline")
        .uid("pumpwatch-pipeline")
        .description(
            "Is the pipeline healthy: ingest rate and lag, quarantine, commits, alert "
            "evaluation, notification delivery and the API."
        )
        .tags(["pumpwatch", "operations"])
        .readonly()
        .time("now-6h", "now")
        .refresh("30s")
        .timezone("utc")
        .with_row(dashboard.Row("Services"))
        .with_panel(
            _stat(
                "Targets up",
                "Prometheus scrape targets answering, per job.",
                span=8,
            ).targets([prom('sum by (job) (up{job=~"pumpwatch-.*"})', "{{job}}")])
        )
        .with_panel(
            _stat(
                "Connected",
                "Ingest instances connected to the broker and to the database; alert services "
                "connected to the database.",
                span=16,
            ).targets(
                [
                    prom("sum(pumpwatch_ingest_mqtt_connected)", "ingest: broker", "A"),
                    prom("sum(pumpwatch_ingest_database_up)", "ingest: database", "B"),
                    prom("sum(pumpwatch_alerts_database_up)", "alerts: database", "C"),
                    prom(
                        "sum(pumpwatch_alerts_notify_mqtt_connected)",
                        "notifications: broker",
                        "D",
                    ),
                ]
            )
        )
        .with_row(dashboard.Row("Ingest"))
        .with_panel(
            _series(
                "Ingest rate",
                "Messages per second handed over by the broker, stored for the first time, and "
                "duplicates (re-sends and redeliveries).",
                "short",
            ).targets(
                [
                    prom(
                        f"sum(rate(pumpwatch_ingest_messages_received_total[{RATE}]))",
                        "received",
                        "A",
                    ),
                    prom(
                        f"sum by (kind) (rate(pumpwatch_ingest_messages_stored_total[{RATE}]))",
                        "stored {{kind}}",
                        "B",
                    ),
                    prom(
                        f"sum(rate(pumpwatch_ingest_messages_duplicate_total[{RATE}]))",
                        "duplicates",
                        "C",
                    ),
                ]
            )
        )
        .with_panel(
            _series(
                "Ingest rate per instance",
                "Messages per second each ingest instance received: the shared subscription's "
                "split.",
                "short",
            ).targets(
                [
                    prom(
                        "sum by (instance) "
                        f"(rate(pumpwatch_ingest_messages_received_total[{RATE}]))",
                        "{{instance}}",
                    )
                ]
            )
        )
        .with_panel(
            _series(
                "Ingest lag",
                "now - recorded_at when live readings (recorded within the live window) commit.",
                "s",
            ).targets(_quantiles("pumpwatch_ingest_lag_seconds"))
        )
        .with_panel(
            _series(
                "Quarantine by reason",
                "Messages quarantined per second, by reason.",
                "short",
            ).targets(
                [
                    prom(
                        "sum by (reason) "
                        f"(rate(pumpwatch_ingest_messages_quarantined_total[{RATE}])) > 0",
                        "{{reason}}",
                    )
                ]
            )
        )
        .with_panel(
            _series(
                "Batch commit latency",
                "One batch from BEGIN to COMMIT.",
                "s",
            ).targets(_quantiles("pumpwatch_ingest_commit_seconds"))
        )
        .with_panel(
            _series(
                "Backlog and batch size",
                "Messages received and not yet committed, per instance (reading pauses at the "
                "capacity), and the mean batch.",
                "short",
            ).targets(
                [
                    prom("pumpwatch_ingest_backlog_messages", "backlog {{instance}}", "A"),
                    prom(
                        "max(pumpwatch_ingest_backlog_capacity_messages)", "backlog capacity", "B"
                    ),
                    prom(
                        f"sum(rate(pumpwatch_ingest_batch_size_messages_sum[{RATE}])) / "
                        f"sum(rate(pumpwatch_ingest_batch_size_messages_count[{RATE}]))",
                        "mean batch",
                        "C",
                    ),
                ]
            )
        )
        .with_panel(
            _series(
                "Sequence gaps",
                "Gaps open (backfill asking the devices) and given up on (unrecoverable: "
                "telemetry_gap alerts), and messages missing in them, as last counted in the "
                "database.",
                "short",
            ).targets(
                [
                    prom("max(pumpwatch_ingest_sequence_gaps_open)", "open gaps", "A"),
                    prom(
                        "max(pumpwatch_ingest_sequence_missing_open_messages)",
                        "missing messages",
                        "B",
                    ),
                    prom(
                        "max(pumpwatch_ingest_sequence_gaps_unrecoverable)",
                        "unrecoverable gaps",
                        "C",
                    ),
                    prom(
                        "max(pumpwatch_ingest_sequence_missing_unrecoverable_messages)",
                        "unrecoverable messages",
                        "D",
                    ),
                ]
            )
        )
        .with_panel(
            _series(
                "Backfill",
                "Gaps opened, recovered from the devices after a resend request, and given up "
                "on (per minute); the 95th percentile of the time from a gap's detection to "
                "its recovery is in the legend's last series (seconds).",
                "short",
            ).targets(
                [
                    prom(
                        f"sum(rate(pumpwatch_ingest_sequence_gaps_total[{RATE}])) * 60",
                        "opened",
                        "A",
                    ),
                    prom(
                        "sum(rate(pumpwatch_ingest_backfill_gaps_recovered_total"
                        f'{{requested="true"}}[{RATE}])) * 60',
                        "recovered",
                        "B",
                    ),
                    prom(
                        f"sum(rate(pumpwatch_ingest_backfill_gaps_unrecoverable_total[{RATE}]))"
                        " * 60",
                        "unrecoverable",
                        "C",
                    ),
                    prom(
                        "histogram_quantile(0.95, sum by (le) (rate("
                        "pumpwatch_ingest_backfill_recovery_seconds_bucket"
                        f'{{requested="true"}}[{RATE}])))',
                        "p95 time to recover (s)",
                        "D",
                    ),
                ]
            )
        )
        .with_panel(
            _series(
                "Since the last commit",
                "Seconds since each ingest instance last committed a batch.",
                "s",
            ).targets(
                [
                    prom(
                        "time() - pumpwatch_ingest_last_commit_timestamp_seconds",
                        "{{instance}}",
                    )
                ]
            )
        )
        .with_panel(
            _table(
                "Latest quarantined messages",
                "From the quarantine table (grafana.quarantine: no payloads), newest first.",
                span=24,
            ).with_target(
                Sql(
                    """
                    SELECT last_received_at AS "last received", reason, topic, detail,
                           occurrences, payload_bytes AS "bytes"
                    FROM grafana.quarantine
                    WHERE $__timeFilter(last_received_at)
                    ORDER BY last_received_at DESC
                    LIMIT 100
                    """
                )
            )
        )
        .with_row(dashboard.Row("Alerts"))
        .with_panel(
            _series(
                "Alert evaluation latency",
                "From ingest's commit of new data to the alert change it caused.",
                "s",
            ).targets(_quantiles("pumpwatch_alerts_latency_seconds"))
        )
        .with_panel(
            _series(
                "Evaluation batches",
                "Time to evaluate one batch of pumps.",
                "s",
            ).targets(_quantiles("pumpwatch_alerts_batch_seconds"))
        )
        .with_panel(
            _series(
                "Evaluations",
                "Pump evaluations per second, those a rule's error stopped, and pumps waiting.",
                "short",
            ).targets(
                [
                    prom(
                        f"sum(rate(pumpwatch_alerts_evaluations_total[{RATE}]))",
                        "evaluations",
                        "A",
                    ),
                    prom(
                        f"sum(rate(pumpwatch_alerts_evaluation_errors_total[{RATE}]))",
                        "errors",
                        "B",
                    ),
                    prom("sum(pumpwatch_alerts_pending_pumps)", "pending pumps", "C"),
                ]
            )
        )
        .with_panel(
            _series(
                "Alert changes",
                "Alert changes per second, by action.",
                "short",
            ).targets(
                [
                    prom(
                        f"sum by (action) (rate(pumpwatch_alerts_changes_total[{RATE}]))",
                        "{{action}}",
                    )
                ]
            )
        )
        .with_row(dashboard.Row("Notifications"))
        .with_panel(
            _series(
                "Deliveries by channel",
                "Deliveries that ended, per second, by channel and status (failed: retries "
                "exhausted).",
                "short",
            ).targets(
                [
                    prom(
                        "sum by (channel, status) "
                        f"(rate(pumpwatch_alerts_notify_deliveries_total[{RATE}]))",
                        "{{channel}} {{status}}",
                    )
                ]
            )
        )
        .with_panel(
            _series(
                "Failed attempts by channel",
                "Delivery attempts that did not deliver, per second, by channel and outcome.",
                "short",
            ).targets(
                [
                    prom(
                        "sum by (channel, outcome) (rate(pumpwatch_alerts_notify_attempts_total"
                        f'{{outcome!="delivered"}}[{RATE}]))',
                        "{{channel}} {{outcome}}",
                    )
                ]
            )
        )
        .with_panel(
            _series(
                "Notification latency",
                "Outbox event to delivered, by channel.",
                "s",
            ).targets(_quantiles("pumpwatch_alerts_notify_latency_seconds", "channel"))
        )
        .with_panel(
            _series(
                "Outbox and pending deliveries",
                "Outbox events not yet fanned out, the age of the oldest, and deliveries "
                "waiting, retrying or in flight.",
                "short",
            ).targets(
                [
                    prom("max(pumpwatch_alerts_notify_outbox_backlog_events)", "outbox", "A"),
                    prom(
                        "max(pumpwatch_alerts_notify_outbox_oldest_age_seconds)",
                        "oldest outbox event (s)",
                        "B",
                    ),
                    prom(
                        "max(pumpwatch_alerts_notify_pending_deliveries)",
                        "pending deliveries",
                        "C",
                    ),
                ]
            )
        )
        .with_row(dashboard.Row("API"))
        .with_panel(
            _series(
                "API latency by route (p95)",
                "95th percentile request duration per route template.",
                "s",
            ).targets(
                [
                    prom(
                        "histogram_quantile(0.95, sum by (route, le) "
                        f"(rate(pumpwatch_api_request_seconds_bucket[{RATE}])))",
                        "{{route}}",
                    )
                ]
            )
        )
        .with_panel(
            _series(
                "API requests by status",
                "Requests per second by status, and 5xx per route.",
                "short",
            ).targets(
                [
                    prom(
                        f"sum by (status) (rate(pumpwatch_api_requests_total[{RATE}]))",
                        "{{status}}",
                        "A",
                    ),
                    prom(
                        "sum by (route) "
                        f'(rate(pumpwatch_api_requests_total{{status=~"5.."}}[{RATE}])) > 0',
                        "5xx {{route}}",
                        "B",
                    ),
                ]
            )
        )
    )


DASHBOARDS = {"fleet-health": fleet_health, "pipeline": pipeline}


def render(name: str) -> str:
    """The JSON file of one dashboard, as committed."""
    document = json.loads(json.dumps(DASHBOARDS[name]().build(), cls=JSONEncoder))
    for number, panel in enumerate(document["panels"], start=1):
        # Panel ids must be unique within a dashboard (links, "view panel"); the SDK leaves 0.
        panel["id"] = number
        # Each panel queries one data source: name it on the panel too, as Grafana's editor
        # does, so that Grafana never falls back to the default data source for it.
        sources = {json.dumps(t["datasource"], sort_keys=True) for t in panel.get("targets", [])}
        if sources:
            (source,) = sources
            panel["datasource"] = json.loads(source)
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main() -> None:
    OUTPUT_DIR.mkdir(exist_ok=True)
    for name in DASHBOARDS:
        path = OUTPUT_DIR / f"{name}.json"
        path.write_text(render(name), encoding="utf-8")
        sys.stdout.write(f"wrote {path.relative_to(HERE.parents[1])}\n")


if __name__ == "__main__":
    main()
