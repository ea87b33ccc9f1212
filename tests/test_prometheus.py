"""Prometheus: the scrape configuration and alerting rules under deploy/prometheus, and the PromQL
of the Grafana dashboards, checked by promtool (Debian's prometheus package; these tests fail
without it), unit-tested on synthetic series, and run by a real Prometheus scraping the real
services."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from lab.embedded import EmbeddedBroker, free_port
from services.alerts.metrics import AlertsMetrics
from services.api.app import Metrics as ApiMetrics
from services.ingest.metrics import IngestMetrics
from services.notify.metrics import NotifyMetrics
from tests.support import IngestProcess

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RULE_FILES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
DASHBOARDS = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
# Grafana's variables, as Grafana would give them for a few hours' range.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "6h"}


def binary(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is missing: apt-get install -y prometheus (.ci/run does)"
    return path


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([binary("promtool"), *args], capture_output=True, text=True, check=False)


def rule_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = []
    for path in RULE_FILES:
        groups += yaml.safe_load(path.read_text())["groups"]
    return groups


def rule_expressions() -> list[str]:
    return [rule["expr"] for group in rule_groups() for rule in group["rules"]]


def dashboard_expressions() -> list[str]:
    found: list[str] = []
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                if "expr" in target:
                    expr = target["expr"]
                    for variable, value in GRAFANA_VARIABLES.items():
                        expr = expr.replace(variable, value)
                    assert "$" not in expr, expr
                    found.append(expr)
    return found


def known_series() -> set[str]:
    """Every series name the services export (and Prometheus's own `up`)."""
    names = {"up"}
    for metrics in (IngestMetrics(), AlertsMetrics(), NotifyMetrics(), ApiMetrics()):
        for family in metrics.registry.collect():
            if family.type == "counter":
                names.add(f"{family.name}_total")
            elif family.type == "histogram":
                names |= {f"{family.name}{suffix}" for suffix in ("_bucket", "_sum", "_count")}
            else:
                names.add(family.name)
    return names


def test_the_configuration_and_rule_files_pass_promtool() -> None:
    assert RULE_FILES
    checked = promtool("check", "config", str(CONFIG))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"{len(RULE_FILES)} rule files found" in checked.stdout
    rules = promtool("check", "rules", *map(str, RULE_FILES))
    assert rules.returncode == 0, rules.stdout + rules.stderr


def test_the_dashboards_promql_passes_promtool(tmp_path: Path) -> None:
    expressions = dashboard_expressions()
    assert len(expressions) >= 20
    recording = {
        "groups": [
            {
                "name": "dashboards",
                "rules": [
                    {"record": f"dashboard:expression_{i}", "expr": expr}
                    for i, expr in enumerate(expressions)
                ],
            }
        ]
    }
    path = tmp_path / "dashboards.yml"
    path.write_text(yaml.safe_dump(recording))
    checked = promtool("check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"{len(expressions)} rules found" in checked.stdout


def test_every_metric_in_rules_and_dashboards_is_one_the_services_export() -> None:
    known = known_series()
    used = {
        name
        for expr in rule_expressions() + dashboard_expressions()
        for name in re.findall(r"\b(?:pumpwatch_[a-z0-9_]+|up)\b", expr)
    }
    assert used - known == set()
    # Each service's headline series is watched by some rule.
    rules = " ".join(rule_expressions())
    for name in (
        "pumpwatch_ingest_last_commit_timestamp_seconds",
        "pumpwatch_ingest_lag_seconds_bucket",
        "pumpwatch_ingest_messages_quarantined_total",
        "pumpwatch_ingest_sequence_missing_open_messages",
        "pumpwatch_ingest_database_up",
        "pumpwatch_alerts_database_up",
        "pumpwatch_alerts_notify_deliveries_total",
        "pumpwatch_alerts_notify_outbox_oldest_age_seconds",
    ):
        assert name in rules, name


# --- the rules on synthetic series (promtool test rules) -----------------------------------

INGEST_1 = {"job": "pumpwatch-ingest", "instance": "ingest-1:9101"}
INGEST_2 = {"job": "pumpwatch-ingest", "instance": "ingest-2:9101"}
ALERTS = {"job": "pumpwatch-alerts", "instance": "alerts:9102"}
NOTIFY = {"job": "pumpwatch-notify", "instance": "notify:9103"}
API = {"job": "pumpwatch-api", "instance": "api:8000"}


def series(name: str, labels: dict[str, str], values: str) -> dict[str, str]:
    inner = ", ".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{inner}}}", "values": values}


def case(
    alert: str,
    at: str,
    inputs: list[dict[str, str]],
    expected: list[dict[str, str]],
) -> dict[str, Any]:
    return {
        "interval": "1m",
        "input_series": inputs,
        "alert_rule_test": [
            {
                "eval_time": at,
                "alertname": alert,
                "exp_alerts": [{"exp_labels": labels} for labels in expected],
            }
        ],
    }


def rule_cases() -> list[dict[str, Any]]:
    up = [series("up", INGEST_1, "1x100"), series("up", INGEST_2, "1x100")]
    return [
        # Messages wait and nothing commits: stalled; commits keep coming: not.
        case(
            "PumpwatchIngestStalled",
            "5m",
            [
                series("pumpwatch_ingest_backlog_messages", INGEST_1, "5x10"),
                series("pumpwatch_ingest_last_commit_timestamp_seconds", INGEST_1, "0x10"),
                series("pumpwatch_ingest_backlog_messages", INGEST_2, "5x10"),
                series("pumpwatch_ingest_last_commit_timestamp_seconds", INGEST_2, "0+60x10"),
            ],
            [{**INGEST_1, "severity": "critical"}],
        ),
        case(
            "PumpwatchIngestDown",
            "5m",
            [series("up", INGEST_1, "0x10"), series("up", INGEST_2, "1x10")],
            [{**INGEST_1, "severity": "warning"}],
        ),
        case(
            "PumpwatchIngestAllDown",
            "5m",
            [series("up", INGEST_1, "0x10"), series("up", INGEST_2, "1 1 0x10")],
            [{"severity": "critical"}],
        ),
        case("PumpwatchIngestAllDown", "5m", up, []),
        case(
            "PumpwatchQuarantineSpike",
            "20m",
            [
                series("pumpwatch_ingest_messages_received_total", INGEST_1, "0+1000x30"),
                series(
                    "pumpwatch_ingest_messages_quarantined_total",
                    {**INGEST_1, "reason": "schema"},
                    "0+50x30",
                ),
            ],
            [{"severity": "warning"}],
        ),
        case(
            "PumpwatchQuarantineSpike",
            "20m",
            [
                series("pumpwatch_ingest_messages_received_total", INGEST_1, "0+1000x30"),
                series(
                    "pumpwatch_ingest_messages_quarantined_total",
                    {**INGEST_1, "reason": "schema"},
                    "0+5x30",
                ),
            ],
            [],
        ),
        case(
            "PumpwatchSequenceGapsGrowing",
            "80m",
            [series("pumpwatch_ingest_sequence_missing_open_messages", INGEST_1, "0+10x100")],
            [{"severity": "warning"}],
        ),
        case(
            "PumpwatchDatabaseUnreachable",
            "3m",
            [
                series("pumpwatch_ingest_database_up", INGEST_1, "1x10"),
                series("pumpwatch_alerts_database_up", ALERTS, "0x10"),
            ],
            [{**ALERTS, "severity": "critical"}],
        ),
        case(
            "PumpwatchAlertEvaluationStalled",
            "12m",
            [
                series("pumpwatch_alerts_pending_pumps", ALERTS, "5x20"),
                series("pumpwatch_alerts_evaluations_total", ALERTS, "100x20"),
            ],
            [{"severity": "critical"}],
        ),
        case(
            "PumpwatchNotificationFailed",
            "3m",
            [
                series(
                    "pumpwatch_alerts_notify_deliveries_total",
                    {**NOTIFY, "channel": "webhook", "status": "failed"},
                    "0 0 1 1 1",
                ),
                series(
                    "pumpwatch_alerts_notify_deliveries_total",
                    {**NOTIFY, "channel": "email", "status": "delivered"},
                    "0 5 10 15 20",
                ),
            ],
            [{"channel": "webhook", "severity": "critical"}],
        ),
        case(
            "PumpwatchOutboxBacklog",
            "7m",
            [
                series("pumpwatch_alerts_notify_outbox_oldest_age_seconds", ALERTS, "0x10"),
                series("pumpwatch_alerts_notify_outbox_oldest_age_seconds", NOTIFY, "600x10"),
            ],
            [{"severity": "critical"}],
        ),
        # The alert service with its worker off reports a disconnected MQTT client too: only
        # an instance that attempts MQTT deliveries counts.
        case(
            "PumpwatchNotifyBrokerDisconnected",
            "8m",
            [
                series("pumpwatch_alerts_notify_mqtt_connected", ALERTS, "0x10"),
                series("pumpwatch_alerts_notify_mqtt_connected", NOTIFY, "0x10"),
                series(
                    "pumpwatch_alerts_notify_attempts_total",
                    {**NOTIFY, "channel": "mqtt", "outcome": "network"},
                    "0+1x10",
                ),
            ],
            [{"instance": NOTIFY["instance"], "severity": "warning"}],
        ),
        case(
            "PumpwatchApiErrors",
            "12m",
            [
                series(
                    "pumpwatch_api_requests_total",
                    {**API, "route": "/v1/pumps", "method": "GET", "status": "500"},
                    "0+10x20",
                ),
                series(
                    "pumpwatch_api_requests_total",
                    {**API, "route": "/v1/pumps", "method": "GET", "status": "200"},
                    "0+10x20",
                ),
            ],
            [{"severity": "warning"}],
        ),
    ]


def test_the_alerting_rules_fire_when_they_should(tmp_path: Path) -> None:
    """Each rule's expression, `for` and labels on synthetic series. (Annotations are left out
    of the copy under test: promtool compares them whole; `check rules` has validated their
    templates.)"""
    groups = rule_groups()
    for group in groups:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump({"groups": groups}))
    cases = rule_cases()
    tested = {c["alert_rule_test"][0]["alertname"] for c in cases}
    assert tested <= {rule["alert"] for group in groups for rule in group["rules"]}
    spec = tmp_path / "tests.yml"
    spec.write_text(
        yaml.safe_dump({"rule_files": [str(rules)], "evaluation_interval": "1m", "tests": cases})
    )
    result = promtool("test", "rules", str(spec))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


# --- a real Prometheus scraping the real services ------------------------------------------


class ApiProcess(IngestProcess):
    """``pumpwatch api``: its /metrics, /healthz and /readyz are on the API port."""

    def environment(self) -> dict[str, str]:
        return {**super().environment(), "PUMPWATCH_API_PORT": str(self.port)}


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - the test's own server
        return json.loads(response.read())


@pytest.fixture
def services(
    database_url: str, broker: EmbeddedBroker, tmp_path: Path
) -> Iterator[dict[str, IngestProcess]]:
    """One process per target of prometheus.yml, by its compose host name."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    config = yaml.safe_load(CONFIG.read_text())
    hosts = [
        target.split(":")[0]
        for job in config["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    ]
    started: dict[str, IngestProcess] = {}
    try:
        for host in hosts:
            command = compose[host]["command"][0]
            kind = ApiProcess if command == "api" else IngestProcess
            process = kind(database_url, broker, tmp_path / f"{host}.log", command=command)
            started[host] = process.start()
        yield started
    finally:
        for process in started.values():
            process.stop_quietly()


def test_a_real_prometheus_scrapes_every_service_and_evaluates_every_rule(
    services: dict[str, IngestProcess], tmp_path: Path
) -> None:
    config = yaml.safe_load(CONFIG.read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(path) for path in RULE_FILES]
    for job in config["scrape_configs"]:
        for static in job["static_configs"]:
            static["targets"] = [
                f"127.0.0.1:{services[target.split(':')[0]].metrics_port}"
                for target in static["targets"]
            ]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    log = (tmp_path / "prometheus.log").open("ab")
    prometheus = subprocess.Popen(
        [
            binary("prometheus"),
            f"--config.file={path}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=log,
    )
    log.close()
    base = f"http://127.0.0.1:{port}"
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    try:
        targets: list[dict[str, Any]] = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert prometheus.poll() is None, (tmp_path / "prometheus.log").read_text()
            try:
                targets = get_json(f"{base}/api/v1/targets")["data"]["activeTargets"]
            except OSError:
                targets = []
            if len(targets) == len(services) and all(t["health"] == "up" for t in targets):
                break
            time.sleep(0.2)
        assert [(t["labels"]["job"], t["health"], t["lastError"]) for t in targets] == [
            (t["labels"]["job"], "up", "") for t in targets
        ]
        assert {t["labels"]["job"] for t in targets} == jobs
        assert len(targets) == len(services)

        # Every rule has been evaluated against the live series without an error…
        rules: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            groups = get_json(f"{base}/api/v1/rules")["data"]["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            if rules and all(r["lastEvaluation"] > "2000" for r in rules):
                break
            time.sleep(0.2)
        assert len(rules) == len(rule_expressions())
        assert [(r["name"], r["health"], r.get("lastError", "")) for r in rules] == [
            (r["name"], "ok", "") for r in rules
        ]
        # …and none fires for this healthy pipeline (pending at most: `for` has not passed).
        assert [r["name"] for r in rules if r.get("state") == "firing"] == []
        # Every dashboard expression runs on the live series.
        for expr in dashboard_expressions():
            answer = get_json(f"{base}/api/v1/query?{urllib.parse.urlencode({'query': expr})}")
            assert answer["status"] == "success", (expr, answer)
        up = get_json(f"{base}/api/v1/query?query=up")["data"]["result"]
        assert sorted(r["value"][1] for r in up) == ["1"] * len(services)
    finally:
        prometheus.terminate()
        prometheus.wait(30)
