"""The compose stack, checked statically (no Docker engine here), and its command lines run for
real against the test servers."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.alerts.metrics import AlertsMetrics
from services.alerts.settings import AlertsSettings
from services.api.app import Metrics as ApiMetrics
from services.api.settings import ApiSettings
from services.cli import app
from services.domain.alerting import RuleSettings
from services.embedded import EmbeddedBroker
from services.ingest.metrics import IngestMetrics
from services.ingest.settings import IngestSettings
from tests.support import IngestProcess

ROOT = Path(__file__).resolve().parents[1]


def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return document


def pumpwatch_services() -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in compose()["services"].items() if svc.get("build") == "."}


def test_every_pumpwatch_service_runs_a_real_subcommand() -> None:
    commands = {
        c.name or (c.callback.__name__ if c.callback else "") for c in app.registered_commands
    }
    services = pumpwatch_services()
    assert {"migrate", "ingest-1", "alerts"} <= set(services)
    for name, svc in services.items():
        assert svc["command"][0] in commands, (name, svc["command"])


def test_every_pumpwatch_setting_in_compose_is_a_known_setting() -> None:
    known = {
        f"PUMPWATCH_{field.upper()}"
        for settings in (IngestSettings, AlertsSettings, ApiSettings)
        for field in settings.model_fields
    }
    for name, svc in pumpwatch_services().items():
        for variable in svc["environment"]:
            assert variable in known, (name, variable)


def test_secrets_have_no_defaults_and_mounted_files_exist() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    for secret in ("POSTGRES_PASSWORD", "GRAFANA_ADMIN_PASSWORD"):
        uses = re.findall(r"\$\{" + secret + r"([^}]*)\}", text)
        assert uses, secret
        assert all(use.startswith(":?") for use in uses), (secret, uses)
    for name, svc in compose()["services"].items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), (name, source)


def test_prometheus_scrapes_the_metrics_port_each_service_listens_on() -> None:
    prometheus = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    targets = {
        t
        for job in prometheus["scrape_configs"]
        for cfg in job["static_configs"]
        for t in cfg["targets"]
    }
    services = compose()["services"]
    for target in targets:
        host, port = target.split(":")
        assert host in services, target
        environment = services[host]["environment"]
        listens = environment.get("PUMPWATCH_METRICS_PORT") or environment["PUMPWATCH_API_PORT"]
        assert listens == port, target


def test_the_compose_ingest_command_line_runs_against_real_servers(
    database_url: str, broker: EmbeddedBroker, tmp_path: Path
) -> None:
    svc = pumpwatch_services()["ingest-1"]
    assert svc["command"] == ["ingest"]
    env = {
        k: v
        for k, v in svc["environment"].items()
        if k not in ("PUMPWATCH_DATABASE_URL", "PUMPWATCH_MQTT_URL", "PUMPWATCH_METRICS_PORT")
    }
    process = IngestProcess(database_url, broker, tmp_path / "ingest.log", extra_env=env)
    try:
        process.start()  # waits for /readyz
        status, body = process.get("/healthz")
        assert status == 200, body
        assert process.terminate() == 0
    finally:
        process.stop_quietly()


@pytest.mark.parametrize("path", ["deploy/mosquitto/mosquitto.conf"])
def test_the_compose_broker_config_includes_the_shared_limits(path: str) -> None:
    text = (ROOT / path).read_text()
    assert "include_dir /mosquitto/config/conf.d" in text
    limits = (ROOT / "deploy/mosquitto/conf.d/pumpwatch.conf").read_text()
    assert re.search(r"^max_queued_messages \d{6,}$", limits, re.M)


def test_the_readme_documents_every_setting_and_metric() -> None:
    readme = (ROOT / "README.md").read_text()
    for settings in (IngestSettings, AlertsSettings, ApiSettings):
        for field in settings.model_fields:
            if field != "rules":
                assert f"`PUMPWATCH_{field.upper()}`" in readme, field
    for field in RuleSettings.model_fields:
        assert f"`{field}`" in readme, field
    for metrics in (IngestMetrics(), AlertsMetrics(), ApiMetrics()):
        for metric in metrics.registry.collect():
            short = (
                metric.name.removeprefix("pumpwatch_ingest_")
                .removeprefix("pumpwatch_alerts_")
                .removeprefix("pumpwatch_api_")
            )
            assert metric.name in readme or f"…_{short}" in readme, metric.name
