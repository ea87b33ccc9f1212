"""Grafana provisioning: data sources, dashboard provider, generated dashboards."""
