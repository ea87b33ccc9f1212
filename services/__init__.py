"""pumpwatch: telemetry, alerts and dashboards for implanted intrathecal drug pumps."""
