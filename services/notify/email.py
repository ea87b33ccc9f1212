"""Email over SMTP (``aiosmtplib``): one message per recipient, plain text with an HTML
alternative, rendered when the delivery was made (``services.notify.render``).

``PUMPWATCH_SMTP_URL`` is ``smtp://user:pass@host:port`` (STARTTLS as
``PUMPWATCH_SMTP_STARTTLS`` says) or ``smtps://`` (TLS from the start). The Message-ID is the
delivery's idempotency key, so a message sent twice (at least once) is recognisably the same.
A 5xx refusal is permanent (the delivery fails at once); anything else is retried.
"""

from __future__ import annotations

from email.message import EmailMessage
from email.utils import formatdate
from typing import ClassVar, Literal

import aiosmtplib

from services.domain.notifications import Channel
from services.notify.channel import Message, Result
from services.notify.settings import SmtpTarget


def build(message: Message, sender: str) -> EmailMessage:
    content = message.payload["email"]
    mail = EmailMessage()
    mail["From"] = sender
    mail["To"] = message.target
    mail["Subject"] = content["subject"]
    mail["Date"] = formatdate(localtime=False, usegmt=True)
    mail["Message-ID"] = f"<{message.message_id}@pumpwatch>"
    mail["X-Pumpwatch-Event"] = message.event
    mail["Auto-Submitted"] = "auto-generated"
    mail.set_content(content["text"])
    mail.add_alternative(content["html"], subtype="html")
    return mail


class EmailSender:
    channel: ClassVar[Channel] = "email"

    def __init__(
        self,
        smtp: SmtpTarget | None,
        *,
        sender: str,
        starttls: Literal["require", "auto", "off"],
        timeout_s: float,
    ) -> None:
        self.smtp = smtp
        self.sender = sender
        self.starttls = starttls
        self.timeout_s = timeout_s

    async def send(self, message: Message) -> Result:  # noqa: PLR0911 - one per outcome
        smtp = self.smtp
        if smtp is None:
            return Result("error", error="PUMPWATCH_SMTP_URL is not set")
        start_tls: bool | None = (
            False if smtp.tls else {"require": True, "auto": None, "off": False}[self.starttls]
        )
        try:
            await aiosmtplib.send(
                build(message, self.sender),
                hostname=smtp.host,
                port=smtp.port,
                username=smtp.username,
                password=smtp.password,
                use_tls=smtp.tls,
                start_tls=start_tls,
                timeout=self.timeout_s,
            )
        except aiosmtplib.SMTPTimeoutError as exc:
            return Result("timeout", error=_describe(exc))
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [r.code for r in exc.recipients]
            code = codes[0] if codes else None
            return Result(
                "rejected",
                status_code=code,
                error=_describe(exc),
                permanent=all(c >= 500 for c in codes),
            )
        except aiosmtplib.SMTPResponseException as exc:
            return Result(
                "rejected", status_code=exc.code, error=_describe(exc), permanent=exc.code >= 500
            )
        except (aiosmtplib.SMTPConnectError, aiosmtplib.SMTPServerDisconnected, OSError) as exc:
            return Result("network", error=_describe(exc))
        except aiosmtplib.SMTPException as exc:
            return Result("error", error=_describe(exc))
        return Result("delivered", status_code=250)

    async def aclose(self) -> None:
        """Each message has its own connection: nothing to close."""


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]
