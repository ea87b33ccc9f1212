"""The one small interface every channel implements, and what passes through it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar, Literal, Protocol

from services.domain.notifications import Channel

Outcome = Literal[
    "delivered",
    "http_status",
    "redirect",
    "timeout",
    "network",
    "blocked",
    "rejected",
    "error",
    "interrupted",
]
"""How an attempt ended: delivered, or why not (metrics label, ``delivery_attempts.outcome``)."""


@dataclass(frozen=True, slots=True)
class WebhookKeys:
    """The signing secrets of a webhook at the time of sending."""

    secret: str
    previous_secret: str | None = None
    previous_secret_expires_at: datetime | None = None

    def signing(self, now: datetime) -> list[str]:
        """The current secret, and during a rotation's overlap the previous one too."""
        keys = [self.secret]
        if (
            self.previous_secret
            and self.previous_secret_expires_at is not None
            and now < self.previous_secret_expires_at
        ):
            keys.append(self.previous_secret)
        return keys


@dataclass(frozen=True, slots=True)
class Message:
    """One delivery's message, as the worker hands it to a channel."""

    delivery_id: str
    message_id: str
    """The idempotency key: ``webhook-id``, the email's Message-ID, the MQTT payload's id."""
    event: str
    target: str
    """A URL, an email address or an MQTT topic."""
    payload: dict[str, Any]
    """``{"id", "type", "created_at", "data"}``; email adds ``"email": {subject, text, html}``."""
    attempt: int
    keys: WebhookKeys | None = None


@dataclass(frozen=True, slots=True)
class Result:
    outcome: Outcome
    status_code: int | None = None
    error: str | None = None
    permanent: bool = False
    """Retrying cannot help (an SMTP 5xx refusal): fail now instead of after the window."""

    @property
    def delivered(self) -> bool:
        return self.outcome == "delivered"


class Sender(Protocol):
    """A channel: sends one message to its target and says how it went. Never raises for a
    failure of the target (that is a :class:`Result`); closes its resources in ``aclose``."""

    channel: ClassVar[Channel]

    async def send(self, message: Message) -> Result: ...

    async def aclose(self) -> None: ...
