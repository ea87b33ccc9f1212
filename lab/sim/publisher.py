"""Publish simulated messages to an MQTT broker: a prepared batch as fast as the broker takes it
(``publish_all``), or a fleet live against the wall clock (``run_live``).

One paho-mqtt 2.x client is driven from the calling thread (``loop_read``/``loop_write`` on its
socket, no network thread): measured on localhost this publishes more messages per second than
paho's own thread, because publish() need not wake another thread for every message. QoS 1
messages are counted as published only when their PUBACK arrived.
"""

from __future__ import annotations

import select
import ssl
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from lab.sim.fleet import Fleet
from lab.sim.outgoing import Outgoing
from lab.sim.resend import DeviceBuffers, TransitLoss
from services.settings import MqttTarget

MqttVersion = Literal["5", "3.1.1"]
_CONNECT_TIMEOUT_S = 10.0
_PROGRESS_EVERY_S = 0.25
_LIVE_BATCH = 2000
"""Messages sent between checks of the stop signal, the duration and the progress display."""


class StopSignal(Protocol):
    """Anything with ``is_set()``: a ``threading.Event``, or an ``asyncio.Event`` read from its
    loop's thread."""

    def is_set(self) -> bool: ...


class PublishError(Exception):
    """The broker refused us, could not be reached, or stopped acknowledging."""


@dataclass(slots=True)
class PublishReport:
    """What a publishing run did. Counts are of messages the broker acknowledged (QoS 1)."""

    published: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    malformed: int = 0
    """Published messages that the simulator broke on purpose (the contract must refuse them)."""
    refused: int = 0
    """Messages whose PUBACK carried a failure reason code (MQTT 5, e.g. not authorized)."""
    pumps: int = 0
    """Distinct pumps that published."""
    elapsed_s: float = 0.0
    sim_until: datetime | None = None
    """How far simulation time ran (``run_live``)."""

    @property
    def rate(self) -> float:
        """Messages per second of wall time."""
        return self.published / self.elapsed_s if self.elapsed_s > 0 else 0.0


def sim_clock(
    *, wall_now: datetime, origin: datetime, elapsed_s: float, accelerate: float
) -> datetime:
    """Simulation time for a live run: ``accelerate`` times faster than the wall clock from
    ``origin``, but never ahead of the wall clock (so nothing is recorded in the future)."""
    return min(wall_now, origin + timedelta(seconds=elapsed_s * accelerate))


def publish_all(
    target: MqttTarget,
    messages: Sequence[Outgoing],
    *,
    client_id: str,
    qos: Literal[0, 1] = 1,
    max_inflight: int = 1000,
    progress: bool = False,
    protocol: MqttVersion = "5",
    fleet: Fleet | None = None,
    stop: StopSignal | None = None,
    ack_timeout_s: float = 30.0,
) -> PublishReport:
    """Publish ``messages`` in order, as fast as the broker accepts them, and return once every
    one is acknowledged. Raises :class:`PublishError` if the broker refuses the connection or
    stops acknowledging for ``ack_timeout_s``.

    ``max_inflight`` bounds unacknowledged messages (further bounded by the broker's MQTT 5
    Receive Maximum). ``fleet`` only adds the fleet's pumps and faults to the summary that
    ``progress`` prints. ``stop`` ends the run early (what was sent is still acknowledged)."""
    counts = _Counts()
    started = time.monotonic()
    with (
        _Link(
            target,
            client_id=client_id,
            qos=qos,
            max_inflight=max_inflight,
            protocol=protocol,
            ack_timeout_s=ack_timeout_s,
            stop=stop,
        ) as link,
        _progress(progress, total=len(messages)) as show,
    ):
        shown = time.monotonic()
        for i, message in enumerate(messages):
            if stop is not None and i % 256 == 0 and stop.is_set():
                break
            link.publish(message.topic, message.payload)
            counts.add(message)
            if i & 1023 == 0 and time.monotonic() - shown > _PROGRESS_EVERY_S:
                shown = time.monotonic()
                show(link.acked, "")
        link.drain()
        show(link.acked, "")
        report = counts.report(link, time.monotonic() - started)
    if progress:
        print_summary(report, fleet)
    return report


def run_live(
    target: MqttTarget,
    fleet: Fleet,
    *,
    client_id: str,
    rate_per_s: float | None = None,
    accelerate: float = 1.0,
    duration_s: float | None = None,
    stop: StopSignal | None = None,
    progress: bool = False,
    qos: Literal[0, 1] = 1,
    max_inflight: int = 1000,
    protocol: MqttVersion = "5",
    ack_timeout_s: float = 30.0,
    wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    devices: DeviceBuffers | None = None,
    transit_loss: TransitLoss | None = None,
) -> PublishReport:
    """Run the fleet against the wall clock and publish its messages as they fall due.

    Simulation time is ``sim_clock``: from ``fleet.now`` it runs ``accelerate`` times faster than
    the wall clock until it catches up with it, then in real time. A fleet that starts days in
    the past thus backfills quickly and then continues live. ``rate_per_s`` caps the publish
    rate (simulation time then falls behind). Stops when ``stop`` is set or after
    ``duration_s``; messages sent by then are acknowledged before returning.

    ``devices``: every message is kept there as its device sends it (for ``resend``, see
    ``lab.sim.resend``). ``transit_loss``: the messages it picks are kept but not published."""
    if accelerate <= 0:
        raise ValueError("accelerate must be positive")
    if rate_per_s is not None and rate_per_s <= 0:
        raise ValueError("rate_per_s must be positive")
    counts = _Counts()
    origin = fleet.now
    # At most one reading per pump per advance, so catching up never builds a huge backlog.
    step = fleet.interval
    pending: deque[Outgoing] = deque()
    bucket = _TokenBucket(rate_per_s) if rate_per_s else None
    if transit_loss is not None:
        transit_loss.choose(p.serial for p in [*fleet.healthy(), *fleet.pumps])
    started = time.monotonic()
    with (
        _Link(
            target,
            client_id=client_id,
            qos=qos,
            max_inflight=max_inflight,
            protocol=protocol,
            ack_timeout_s=ack_timeout_s,
            stop=stop,
        ) as link,
        _progress(progress, total=None) as show,
    ):
        shown = 0.0
        while not (stop is not None and stop.is_set()):
            now = time.monotonic()
            if duration_s is not None and now - started >= duration_s:
                break
            if not pending:
                wanted = sim_clock(
                    wall_now=wall_clock(),
                    origin=origin,
                    elapsed_s=now - started,
                    accelerate=accelerate,
                )
                pending.extend(fleet.advance(min(wanted, fleet.now + step)))
            budget = min(len(pending), _LIVE_BATCH)
            if bucket is not None:
                budget = bucket.take(budget)
            for _ in range(budget):
                message = pending.popleft()
                if not _reaches_broker(message, devices, transit_loss):
                    continue
                link.publish(message.topic, message.payload)
                counts.add(message)
            if not budget:
                # Nothing to send yet: wait on the socket (acknowledgements, keepalive).
                link.service(0.02 if bucket is None or not pending else bucket.wait_s())
            if now - shown > _PROGRESS_EVERY_S:
                shown = now
                show(link.acked, _live_status(fleet.now, wall_clock()))
        link.drain()
        show(link.acked, _live_status(fleet.now, wall_clock()))
        report = counts.report(link, time.monotonic() - started)
    report.sim_until = fleet.now
    if progress:
        print_summary(report, fleet)
    return report


def _reaches_broker(
    message: Outgoing, devices: DeviceBuffers | None, transit_loss: TransitLoss | None
) -> bool:
    """The device keeps what it sends; whether the broker gets it is another matter."""
    if devices is not None:
        devices.keep(message)
    return transit_loss is None or not transit_loss.drops(message)


def summary_table(report: PublishReport, fleet: Fleet | None = None) -> Table:
    """The end-of-run summary: pumps, messages by kind, malformed, faults, speed."""
    table = Table(title="pumpwatch simulate", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("pumps", str(len(fleet.pumps) if fleet else report.pumps))
    for kind in ("telemetry", "events"):
        table.add_row(f"{kind} messages", f"{report.by_kind.get(kind, 0):,}")
    table.add_row("malformed (sent on purpose)", f"{report.malformed:,}")
    if report.refused:
        table.add_row("refused by the broker", f"[red]{report.refused:,}[/red]")
    if fleet is not None:
        faults = fleet.fault_counts()
        described = ", ".join(f"{fault} {count}" for fault, count in faults.items())
        table.add_row("faults in the fleet", described or "none")
        if fleet.lost:
            table.add_row("lost before the broker (gap)", f"{len(fleet.lost):,}")
    if report.sim_until is not None:
        table.add_row("simulated until", report.sim_until.isoformat(timespec="seconds"))
    table.add_row("published", f"{report.published:,}")
    table.add_row("elapsed", f"{report.elapsed_s:.2f} s")
    table.add_row("messages/s", f"{report.rate:,.0f}")
    return table


def print_summary(report: PublishReport, fleet: Fleet | None = None) -> None:
    """Print ``summary_table`` to standard output."""
    Console().print(summary_table(report, fleet))


# -- internals -------------------------------------------------------------------------------


class _Counts:
    __slots__ = ("by_kind", "malformed", "serials")

    def __init__(self) -> None:
        self.by_kind: Counter[str] = Counter()
        self.malformed = 0
        self.serials: set[str] = set()

    def add(self, message: Outgoing) -> None:
        self.by_kind[message.kind] += 1
        if not message.valid:
            self.malformed += 1
        self.serials.add(message.serial)

    def report(self, link: _Link, elapsed_s: float) -> PublishReport:
        return PublishReport(
            published=link.acked,
            by_kind=dict(self.by_kind),
            malformed=self.malformed,
            refused=link.refused,
            pumps=len(self.serials),
            elapsed_s=elapsed_s,
        )


class _TokenBucket:
    """Allows ``rate`` messages per second, in bursts of at most a tenth of a second's worth."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate / 10)
        self.tokens = 0.0
        self.at = time.monotonic()

    def take(self, wanted: int) -> int:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.rate)
        self.at = now
        granted = min(wanted, int(self.tokens))
        self.tokens -= granted
        return granted

    def wait_s(self) -> float:
        """Time until the next token."""
        return min(0.1, max(0.0, (1.0 - self.tokens) / self.rate))


class _Link:
    """One MQTT connection serviced from the calling thread, with a window of unacknowledged
    messages. Reconnects (and paho re-sends what was not acknowledged) if the connection drops.
    """

    def __init__(
        self,
        target: MqttTarget,
        *,
        client_id: str,
        qos: Literal[0, 1],
        max_inflight: int,
        protocol: MqttVersion,
        ack_timeout_s: float,
        stop: StopSignal | None,
    ) -> None:
        if max_inflight < 1:
            raise ValueError("max_inflight must be at least 1")
        self.target = target
        self.qos = qos
        self.window = max_inflight
        self.max_inflight = max_inflight
        self.ack_timeout_s = ack_timeout_s
        self._stop = stop
        self.sent = 0
        self.acked = 0
        self.refused = 0
        self.connected = False
        self._refusal: str | None = None
        self._progress_at = time.monotonic()
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv5 if protocol == "5" else paho.MQTTv311,
        )
        # paho's own in-flight limit (20 by default) is switched off (0 = none): above its limit
        # paho queues messages and rescans its whole queue on every PUBACK, which made publishing
        # several times slower. The window is enforced here instead.
        client.max_inflight_messages_set(0)
        client.max_queued_messages_set(0)
        if target.username:
            client.username_pw_set(target.username, target.password)
        if target.tls:
            client.tls_set(ca_certs=target.ca_file, cert_reqs=ssl.CERT_REQUIRED)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        self._client = client

    def __enter__(self) -> _Link:
        try:
            self._client.connect(self.target.host, self.target.port, keepalive=30)
        except OSError as exc:
            raise PublishError(f"cannot reach the broker {self.target.redacted()}: {exc}") from None
        try:
            self._await_connack()
        except BaseException:
            self._close_socket()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.connected:
                self._client.disconnect()
                deadline = time.monotonic() + 2.0
                while self.connected and time.monotonic() < deadline:
                    self._io(0.05)
        finally:
            self._close_socket()

    def publish(self, topic: str, payload: bytes) -> None:
        """Send one message, first waiting (servicing the socket) while the window is full."""
        while self.sent - self.acked >= self.window:
            self.service(0.5)
        info = self._client.publish(topic, payload, qos=self.qos)
        # NO_CONN: paho keeps the message and sends it after the reconnect.
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise PublishError(f"publish to {topic} failed: {paho.error_string(info.rc)}")
        self.sent += 1

    def drain(self) -> None:
        """Wait until every message sent has been acknowledged."""
        while self.acked < self.sent:
            self.service(0.5)

    def service(self, timeout_s: float) -> None:
        """One round of network I/O (acknowledgements, queued writes, keepalive); reconnects
        if the connection was lost."""
        if not self.connected or self._client.socket() is None:
            self._reconnect()
            return
        self._io(timeout_s)
        self._check_stalled()

    def _io(self, timeout_s: float) -> None:
        client = self._client
        sock = client.socket()
        if sock is None:
            return
        writing = [sock] if client.want_write() else []
        readable, writable, _ = select.select([sock], writing, [], timeout_s)
        # Each loop_* call handles its own errors: on a lost connection paho closes the socket
        # and calls on_disconnect, and the next service() reconnects.
        ok = MQTTErrorCode.MQTT_ERR_SUCCESS
        if readable and client.loop_read() != ok:
            return
        if writable and client.loop_write() != ok:
            return
        client.loop_misc()

    def _close_socket(self) -> None:
        sock = self._client.socket()
        if sock is not None:
            sock.close()

    # -- connection ----------------------------------------------------------------------------

    def _await_connack(self) -> None:
        deadline = time.monotonic() + _CONNECT_TIMEOUT_S
        while not self.connected:
            if self._refusal is not None:
                raise PublishError(
                    f"the broker {self.target.redacted()} refused the connection: {self._refusal}"
                )
            if time.monotonic() > deadline:
                raise PublishError(
                    f"no CONNACK from {self.target.redacted()} within {_CONNECT_TIMEOUT_S:.0f} s"
                )
            sock = self._client.socket()
            if sock is None:
                raise PublishError(f"the broker {self.target.redacted()} closed the connection")
            readable, _, _ = select.select([sock], [], [], 0.1)
            if readable:
                self._client.loop_read()
            self._client.loop_misc()

    def _reconnect(self) -> None:
        """The connection dropped: reconnect with backoff for at most ``ack_timeout_s``.

        paho re-sends the unacknowledged messages once the new connection is up."""
        if self._refusal is not None:
            raise PublishError(f"the broker refused the connection: {self._refusal}")
        broker = self.target.redacted()
        deadline = time.monotonic() + self.ack_timeout_s
        delay = 0.1
        while True:
            if self._stop is not None and self._stop.is_set():
                raise PublishError(
                    f"stopped while reconnecting to {broker}; "
                    f"{self.sent - self.acked} messages unacknowledged"
                )
            try:
                self._client.reconnect()
                self._await_connack()
                return
            except OSError:
                pass
            except PublishError:
                if self._refusal is not None:
                    raise
            if time.monotonic() + delay > deadline:
                raise PublishError(
                    f"lost the connection to {broker} and could not reconnect within "
                    f"{self.ack_timeout_s:.0f} s"
                )
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _check_stalled(self) -> None:
        if self.acked == self.sent:
            self._progress_at = time.monotonic()
        elif time.monotonic() - self._progress_at > self.ack_timeout_s:
            raise PublishError(
                f"no acknowledgement from {self.target.redacted()} for {self.ack_timeout_s:.0f} s "
                f"({self.sent - self.acked} of {self.sent} messages unacknowledged)"
            )

    # -- paho callbacks (called from inside loop_read / loop_write) ---------------------------

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            self._refusal = str(reason_code)
            return
        self.connected = True
        # MQTT 5: the broker says how many unacknowledged QoS 1 messages it accepts (Mosquitto:
        # its max_inflight_messages, 20 by default); sending more is a protocol error.
        receive_maximum = getattr(properties, "ReceiveMaximum", None)
        if isinstance(receive_maximum, int) and receive_maximum > 0:
            self.window = min(self.max_inflight, receive_maximum)

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self.connected = False

    def _on_publish(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self.acked += 1
        self._progress_at = time.monotonic()
        if reason_code.is_failure:
            self.refused += 1


@contextmanager
def _progress(enabled: bool, *, total: int | None) -> Iterator[Callable[[int, str], None]]:
    """A rich progress display on standard error; yields ``show(done, status)``."""
    if not enabled:
        yield lambda done, status: None
        return
    counter: list[ProgressColumn] = (
        [BarColumn(), MofNCompleteColumn()]
        if total is not None
        else [TextColumn("{task.completed:,.0f} acknowledged")]
    )
    columns = [
        SpinnerColumn(),
        TextColumn("[bold]publishing[/bold]"),
        *counter,
        TextColumn("{task.fields[rate]}"),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
    ]
    started = time.monotonic()
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task("publish", total=total, rate="", status="")

        def show(done: int, status: str) -> None:
            elapsed = time.monotonic() - started
            rate = f"{done / elapsed:,.0f} msg/s" if elapsed > 0 else ""
            bar.update(task, completed=done, rate=rate, status=status)

        yield show


def _live_status(sim_now: datetime, wall_now: datetime) -> str:
    behind = wall_now - sim_now
    if behind < timedelta(minutes=1):
        return f"sim {sim_now:%Y-%m-%d %H:%M} (live)"
    hours = behind.total_seconds() / 3600
    ago = f"{hours / 24:.1f} d" if hours >= 48 else f"{hours:.1f} h"
    return f"sim {sim_now:%Y-%m-%d %H:%M} ({ago} behind, catching up)"
