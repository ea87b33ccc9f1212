"""Settings shared by every pumpwatch process, and the parsing of connection URLs.

Each service has its own settings class (see ``services.<service>.settings``) that extends
:class:`CommonSettings`; all read environment variables with the ``PUMPWATCH_`` prefix.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote, urlsplit

from pydantic import field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ConfigError(Exception):
    """A setting is missing or malformed; the process cannot start."""


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PUMPWATCH_", extra="ignore", use_attribute_docstrings=True
    )

    database_url: str | None = None
    """``postgresql://user:pass@host:port/db``."""

    mqtt_url: str | None = None
    """``mqtt://user:pass@host:port`` or ``mqtts://…`` for TLS."""

    mqtt_ca_file: str | None = None
    """CA bundle for ``mqtts://``; the system store when unset."""

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "console", "json"] = "auto"

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("postgresql", "postgres"):
            raise ValueError("must start with postgresql://")
        return value

    @field_validator("mqtt_url")
    @classmethod
    def _check_mqtt_url(cls, value: str | None) -> str | None:
        if value is not None:
            parse_mqtt_url(value)
        return value

    def require_database_url(self) -> str:
        if not self.database_url:
            raise ConfigError("PUMPWATCH_DATABASE_URL is not set (postgresql://user:pass@host/db)")
        return self.database_url

    def require_mqtt(self) -> MqttTarget:
        if not self.mqtt_url:
            raise ConfigError("PUMPWATCH_MQTT_URL is not set (mqtt://user:pass@host:port)")
        return parse_mqtt_url(self.mqtt_url, ca_file=self.mqtt_ca_file)


@dataclass(frozen=True, slots=True)
class MqttTarget:
    host: str
    port: int
    username: str | None
    password: str | None
    tls: bool
    ca_file: str | None = None

    def redacted(self) -> str:
        """The URL without its password, for logs."""
        scheme = "mqtts" if self.tls else "mqtt"
        user = f"{self.username}@" if self.username else ""
        return f"{scheme}://{user}{self.host}:{self.port}"


def parse_mqtt_url(url: str, *, ca_file: str | None = None) -> MqttTarget:
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ValueError(f"MQTT URL must start with mqtt:// or mqtts://, not {parts.scheme!r}")
    if not parts.hostname:
        raise ValueError("MQTT URL has no host")
    tls = parts.scheme == "mqtts"
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError as exc:
        raise ValueError(f"MQTT URL has a bad port: {exc}") from exc
    return MqttTarget(
        host=parts.hostname,
        port=port,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        tls=tls,
        ca_file=ca_file,
    )


def default_client_id(service: str) -> str:
    """A client id that is stable across restarts of the same host's instance."""
    return f"pumpwatch-{service}-{socket.gethostname()}"[:64]
