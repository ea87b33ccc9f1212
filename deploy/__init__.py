"""Deployment files; Python here only generates them (deploy/grafana/dashboards.py)."""
