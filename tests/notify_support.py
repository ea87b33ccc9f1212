"""Real receivers for notification tests: an HTTP server that records webhooks (and can be told
to fail, stall or redirect), an SMTP server (aiosmtpd), and the notification worker run
in-process against the test's database."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email import message_from_bytes, policy
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import asyncpg
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import Envelope, Session

from lab.embedded import free_port
from services.alerts.engine import BatchResult, Engine
from services.alerts.metrics import AlertsMetrics
from services.domain.alerting import RuleSettings
from services.notify.metrics import NotifyMetrics
from services.notify.settings import NotifySettings
from services.notify.webhooks import Resolver
from services.notify.worker import Clock, Notifications
from services.storage.database import prepare_connection
from tests import alert_fixtures as fx

# -- webhooks ------------------------------------------------------------------------------------


@dataclass
class Received:
    at: float
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Reply:
    status: int = 204
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


class Receiver:
    """An HTTP server on 127.0.0.1 recording every POST. ``replies`` are used in order, then
    ``default``; a reply may stall (``delay_s``) before answering."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.replies: list[Reply] = []
        self.default = Reply()
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                body = self.rfile.read(length)
                with receiver._lock:
                    receiver.received.append(
                        Received(
                            time.time(),
                            self.path,
                            {k.lower(): v for k, v in self.headers.items()},
                            body,
                        )
                    )
                    reply = receiver.replies.pop(0) if receiver.replies else receiver.default
                if reply.delay_s:
                    time.sleep(reply.delay_s)
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet."""

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.port: int = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, path: str = "/hook", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def start(self) -> Receiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def count(self) -> int:
        with self._lock:
            return len(self.received)


@contextlib.contextmanager
def receiver() -> Iterator[Receiver]:
    server = Receiver().start()
    try:
        yield server
    finally:
        server.stop()


def static_resolver(names: dict[str, list[str]]) -> Resolver:
    """A resolver hook: these names resolve to these addresses (the system for the rest)."""
    from services.notify.webhooks import system_resolver

    async def resolve(host: str, port: int) -> list[str]:
        if host in names:
            return list(names[host])
        return await system_resolver(host, port)

    return resolve


# -- email ---------------------------------------------------------------------------------------


@dataclass
class Mail:
    sender: str
    recipients: list[str]
    message: EmailMessage

    @property
    def subject(self) -> str:
        """Unfolded (a long subject is folded onto continuation lines on the wire)."""
        return " ".join(str(self.message["Subject"]).split())

    def part(self, subtype: str) -> str:
        found = self.message.get_body(preferencelist=(subtype,))
        assert found is not None, f"no text/{subtype} part"
        content = found.get_content()
        assert isinstance(content, str)
        return content


class _Sink:
    def __init__(self) -> None:
        self.mails: list[Mail] = []
        self.refuse: set[str] = set()

    async def handle_RCPT(
        self,
        server: SMTPServer,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if address in self.refuse:
            return "550 no such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTPServer, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        parsed = message_from_bytes(content, policy=policy.default)
        assert isinstance(parsed, EmailMessage)
        self.mails.append(Mail(str(envelope.mail_from), list(envelope.rcpt_tos), parsed))
        return "250 Message accepted for delivery"


@dataclass
class SmtpSink:
    port: int
    handler: _Sink

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    @property
    def mails(self) -> list[Mail]:
        return list(self.handler.mails)

    def to(self, address: str) -> list[Mail]:
        return [m for m in self.handler.mails if address in m.recipients]


@contextlib.contextmanager
def smtp_sink() -> Iterator[SmtpSink]:
    handler = _Sink()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield SmtpSink(port, handler)
    finally:
        controller.stop()


# -- the worker in-process -----------------------------------------------------------------------


def settings(database_url: str, **overrides: Any) -> NotifySettings:
    """Settings for a fast test: retries after 50 ms (doubling to 200 ms) for a short window."""
    values: dict[str, Any] = {
        "database_url": database_url,
        "metrics_port": 0,
        "notify_retry_first_s": 0.05,
        "notify_retry_max_s": 0.2,
        "notify_retry_window_s": 30.0,
        "notify_poll_interval_s": 0.05,
        "smtp_starttls": "off",
        "webhook_allow_hosts": "127.0.0.1",
        "webhook_timeout_s": 5.0,
    }
    values.update(overrides)
    return NotifySettings(**values)


@contextlib.asynccontextmanager
async def pool_for(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=6, init=prepare_connection)
    assert pool is not None
    try:
        yield pool
    finally:
        await pool.close()


@dataclass
class Worker:
    notifications: Notifications
    metrics: NotifyMetrics
    stop: asyncio.Event

    async def until(self, holds: Callable[[], Any], timeout_s: float = 30.0) -> None:
        """Wait until ``holds()`` (sync or async) is true; fails after the timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = holds()
            if asyncio.iscoroutine(value):
                value = await value
            if value:
                return
            assert time.monotonic() < deadline, "condition not reached in time"
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running(
    pool: asyncpg.Pool,
    config: NotifySettings,
    *,
    clock: Clock | None = None,
    resolver: Resolver | None = None,
    loops: bool = True,
) -> AsyncIterator[Worker]:
    """The notification worker with its loops running (fan-out, delivering, gauges); escalation
    and digests run when a test calls them."""
    stop = asyncio.Event()
    metrics = NotifyMetrics()
    kwargs: dict[str, Any] = {"stop": stop, "database_url": config.database_url}
    if clock is not None:
        kwargs["clock"] = clock
    if resolver is not None:
        kwargs["resolver"] = resolver
    async with Notifications(pool, config, metrics, **kwargs) as notifications:
        tasks = (
            [asyncio.create_task(loop) for loop in notifications.loops(scheduled=False)]
            if loops
            else []
        )
        try:
            yield Worker(notifications, metrics, stop)
        finally:
            stop.set()
            if tasks:
                await asyncio.wait(tasks, timeout=20)
            for task in tasks:
                task.cancel()


# -- data ----------------------------------------------------------------------------------------

PATIENT_NAME = "Test Patient"  # alert_fixtures' display name


async def clinic_with_pump(
    pool: asyncpg.Pool,
    serial: str,
    *,
    notification_settings: dict[str, Any] | None = None,
    timezone: str = "Europe/Berlin",
    name: str = "Spinal unit",
) -> tuple[str, str]:
    """A clinic (with these notification settings), a patient and their pump; returns
    (clinic_id, patient_id)."""
    async with pool.acquire() as conn:
        clinic_id = await fx.clinic(conn, timezone=timezone, name=name)
        if notification_settings is not None:
            await conn.execute(
                "UPDATE clinics SET notification_settings = $2 WHERE id = $1",
                clinic_id,
                notification_settings,
            )
        patient_id = await fx.patient(conn, clinic_id)
        await fx.pump(conn, serial, patient_id=patient_id)
    return clinic_id, patient_id


async def add_pump(pool: asyncpg.Pool, clinic_id: str, serial: str) -> None:
    async with pool.acquire() as conn:
        patient_id = await fx.patient(conn, clinic_id)
        await fx.pump(conn, serial, patient_id=patient_id)


async def stall(pool: asyncpg.Pool, serial: str) -> None:
    """A reading with the motor stalled: flow stopped, a high alert."""
    async with pool.acquire() as conn:
        await fx.reading(
            conn, serial, datetime.now(UTC) - timedelta(minutes=1), alarms=("motor_stall",)
        )


async def days_left(pool: asyncpg.Pool, serial: str, days: float) -> None:
    """A reading whose reservoir reaches its 2 mL alarm ``days`` from now at 0.2 mL/day:
    refill due (low within 14 days, medium within 7, high within 2)."""
    async with pool.acquire() as conn:
        await fx.reading(
            conn,
            serial,
            datetime.now(UTC) - timedelta(minutes=5),
            volume_ml=2.0 + 0.2 * days + 0.2 * 5 / 1440,
        )


async def evaluate(pool: asyncpg.Pool, *serials: str) -> BatchResult:
    """One pass of the alert engine over these pumps, with the default rules."""
    engine = Engine(
        pool,
        settings=RuleSettings(),
        flap_window=timedelta(hours=6),
        data_clock=False,
        metrics=AlertsMetrics(),
    )
    return await engine.evaluate(list(serials))


async def add_webhook(
    pool: asyncpg.Pool,
    clinic_id: str,
    url: str,
    secret: str,
    *,
    events: tuple[str, ...] = ("alert.opened", "alert.escalated", "alert.resolved"),
    previous_secret: str | None = None,
    previous_secret_expires_at: datetime | None = None,
) -> str:
    """A webhook row as the API writes it."""
    webhook_id = await pool.fetchval(
        "INSERT INTO webhooks (clinic_id, url, events, secret, previous_secret, "
        "previous_secret_expires_at, created_by) VALUES ($1, $2, $3, $4, $5, $6, 'test') "
        "RETURNING id",
        clinic_id,
        url,
        list(events),
        secret,
        previous_secret,
        previous_secret_expires_at,
    )
    return str(webhook_id)


async def acknowledge(pool: asyncpg.Pool, alert_id: Any, *, at: datetime | None = None) -> None:
    """Acknowledge as the API does: the alert row and a history row."""
    when = at or datetime.now(UTC)
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            "UPDATE alerts SET status = 'acknowledged', acknowledged_at = $2, "
            "acknowledged_by = 'key:test', updated_at = $2 WHERE id = $1 "
            "RETURNING priority",
            alert_id,
            when,
        )
        assert row is not None
        await conn.execute(
            "INSERT INTO alert_history (alert_id, at, actor, action, from_status, to_status, "
            "from_priority, to_priority, reason) VALUES ($1, $2, 'key:test', 'acknowledged', "
            "'open', 'acknowledged', $3, $3, 'seen')",
            alert_id,
            when,
            row["priority"],
        )
