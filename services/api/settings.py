"""Settings of ``pumpwatch api`` (environment, prefix ``PUMPWATCH_``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr

from services.domain.webhook_urls import parse_allow_hosts
from services.settings import CommonSettings


class ApiSettings(CommonSettings):
    api_host: str = "127.0.0.1"
    """Interface the API listens on when ``--host`` is not given."""
    api_port: int = Field(default=8000, ge=1, le=65535)
    """API port when ``--port`` is not given."""
    admin_token: SecretStr | None = None
    """If set, a bearer token with the admin role (bootstrap; prefer ``pumpwatch keys``)."""
    api_metrics_public: bool = True
    """``/metrics`` answers anyone; false: an admin or fleet key is required."""
    api_max_body_bytes: int = Field(default=65_536, ge=1024)
    """Largest request body accepted (413 above it)."""
    api_auth_failures_per_minute: int = Field(default=20, ge=1)
    """Wrong credentials one source address may present per minute (every API process
    counts in the database) before its wrong ones get 429; a right credential always passes
    and a request without one is not counted."""
    api_pool_max_size: int = Field(default=10, ge=1)
    """Database connections of one API process."""
    api_key_touch_interval_s: float = Field(default=60.0, ge=0)
    """``last_used_at`` of a key is written at most this often."""
    api_public_url: str = ""
    """The URL people reach the dashboard at (e.g. ``https://pumps.clinic.example``); when it
    is https, session cookies are ``Secure`` even if TLS ends at a proxy in front."""
    api_trusted_proxies: str = ""
    """Comma-separated addresses or networks of the reverse proxies whose ``X-Forwarded-For``
    and ``X-Forwarded-Proto`` are believed (e.g. ``10.0.0.5`` or ``10.0.0.0/24``); empty: none,
    the address the connection comes from is the client's."""
    api_claim_max_failures: int = Field(default=5, ge=1)
    """Wrong claim codes for one pump, within ``api_claim_failure_window_s``, after which the
    pump takes no claim (429) until the window has passed: a short code cannot be guessed."""
    api_claim_failure_window_s: float = Field(default=900.0, gt=0)
    """…the window, in seconds."""
    api_snooze_max_hours: float = Field(default=24.0, gt=0, le=24)
    """The longest a person may snooze an alert (the contract allows at most 24 h)."""
    api_snooze_high_max_hours: float = Field(default=4.0, gt=0, le=4)
    """…a high priority alert (at most 4 h: IEC 60601-1-8, never silenced)."""
    web_session_hours: float = Field(default=12.0, gt=0, le=24 * 30)
    """A dashboard sign-in lasts this long (then the key is asked for again)."""
    api_token_lifetime_s: float = Field(default=12 * 3600.0, gt=0)
    """A person's sign-in (bearer token or dashboard session) ends this long after it began,
    used or not (a shift)."""
    api_idle_timeout_s: float = Field(default=900.0, gt=0)
    """…and after this long without a request of the person's (automatic logoff, HIPAA
    §164.312(a)(2)(iii)); the dashboard's own 30-second refresh does not count as use."""
    api_invitation_validity_h: float = Field(default=72.0, gt=0)
    """An invitation link (a new account's first password) works once, for this long."""
    api_reset_validity_min: float = Field(default=60.0, gt=0)
    """A password-reset link works once, for this long."""
    api_password_min_length: int = Field(default=12, ge=8, le=64)
    """The shortest password accepted (common ones are refused at any length)."""
    api_signin_slow_after_failures: int = Field(default=3, ge=1)
    """Wrong passwords for one email from one address after which each further attempt from
    there must wait (``api_signin_slow_delay_s``, doubling)…"""
    api_signin_slow_delay_s: float = Field(default=5.0, ge=0)
    """…this long after the last wrong one, doubling with each further one…"""
    api_signin_lock_after_failures: int = Field(default=6, ge=2)
    """…and after this many the email is locked at that address for ``api_signin_lockout_s``
    (the right password included). Other addresses are not affected."""
    api_signin_lockout_s: float = Field(default=900.0, gt=0)
    """How long a lock lasts, and the window in which wrong passwords are counted."""
    api_signin_account_lock_failures: int = Field(default=30, ge=2)
    """Wrong passwords for one email from all addresses within ``api_signin_lockout_s`` after
    which the account takes sign-ins only from addresses it signed in from before (a
    distributed guesser is stopped; the person at their usual places is not locked out)."""
    api_test_clock: bool = False
    """Tests only: the clock of sign-ins, tokens and lockout is the database's plus the offset
    in table ``api_test_clock`` (expiry and idle timeouts tested without waiting)."""
    smtp_url: str | None = None
    """The notifier's SMTP server (``PUMPWATCH_SMTP_URL``): invitation and reset links are
    emailed through it; unset, invitations are only answered to the administrator."""
    smtp_starttls: Literal["require", "auto", "off"] = "require"
    """As the notifier's: STARTTLS for ``smtp://``."""
    smtp_from: str = "pumpwatch <pumpwatch@localhost>"
    """As the notifier's: the From of the emails."""
    smtp_timeout_s: float = Field(default=30.0, gt=0)
    """As the notifier's: SMTP timeout."""
    webhook_allow_hosts: str = ""
    """Comma-separated hosts that webhooks may target over http or on private/loopback
    addresses (development, tests)."""

    def allowed_webhook_hosts(self) -> frozenset[str]:
        return parse_allow_hosts(self.webhook_allow_hosts)
