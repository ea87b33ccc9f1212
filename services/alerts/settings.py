"""Settings of ``pumpwatch alerts`` (environment, prefix ``PUMPWATCH_``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.domain.alerting import RuleSettings
from services.settings import CommonSettings


class AlertsSettings(CommonSettings):
    """``pumpwatch alerts``: the alert engine (and whether the notification worker runs beside
    it, with the settings of :class:`services.notify.settings.NotifySettings`)."""

    model_config = SettingsConfigDict(
        env_prefix="PUMPWATCH_",
        env_nested_delimiter="__",
        extra="ignore",
        use_attribute_docstrings=True,
    )

    rules: RuleSettings = RuleSettings()
    """Rule thresholds, e.g. ``PUMPWATCH_RULES__REFILL_DUE_LOW_DAYS=21`` (global defaults;
    clinics override the per-clinic ones)."""
    metrics_port: int = Field(default=9102, ge=0, le=65535)
    """Prometheus /metrics, /healthz and /readyz; 0 disables the server."""
    metrics_host: str = "0.0.0.0"  # noqa: S104 - scraped from other containers
    alerts_sweep_interval_s: float = Field(default=300.0, gt=0)
    """Every pump is evaluated this often, for the rules that time alone sets off (refill due
    in N days, silent pumps, drug age); new data triggers an evaluation within a second."""
    alerts_batch_max_pumps: int = Field(default=200, ge=1)
    """Pumps evaluated in one transaction."""
    alerts_flap_window_s: float = Field(default=6 * 3600.0, ge=0)
    """A rule that fires again within this of its alert resolving reopens that alert."""
    alerts_clock: Literal["wall", "data"] = "wall"
    """``wall``: judge by the server clock. ``data``: by the newest reading's time — for
    simulations and history replays, where days pass in seconds."""
    alerts_stall_timeout_s: float = Field(default=60.0, gt=0)
    """Unhealthy when pumps wait for evaluation and none was evaluated for this long."""

    notify_enabled: bool = True
    """Deliver notifications (webhooks, email, MQTT) from the outbox on a thread of this
    process; ``false`` leaves the outbox to ``pumpwatch notify`` (or a later start)."""
