"""Replay a simulated fleet through the real ingest and alert services, chunk by chunk, and judge
the alerts against the simulator's ground truth. Used by ``pumpwatch bench alerts`` and by
``tests/test_clinical_scenarios.py``.

How a replay runs (:func:`replay`):

1. ``pumpwatch ingest`` and ``pumpwatch alerts`` start as real processes (``python -m services
   …``) configured through the environment. The alert service judges by the data's clock
   (``PUMPWATCH_ALERTS_CLOCK=data``: the newest reading's time) and its own sweeps are a day of
   wall time apart: the replay asks for every sweep itself. Ingest commits one batch at a time
   (``PUMPWATCH_INGEST_COMMITS_IN_FLIGHT=1``), so the data clock never runs ahead of a batch
   still being committed (it is the newest reading of all pumps: a later batch landing first
   would make every pump of the earlier one look an hour or more silent).
2. The fleet's pumps are registered in ``pumps`` first (as a clinic registers an implant), so
   that visits can be booked before their first data. The fleet is then published in chunks of
   simulated time (``chunk``, 6 h by default). After each
   chunk the replay waits until ingest has stored every valid message published so far (its
   ``/metrics``), books the refill visits the simulated clinic plans (for the pumps in ``book``),
   then sends ``NOTIFY pumpwatch_ingest, '{"serials": null}'``, which makes the alert service
   sweep every pump, and waits until that sweep is done: ``pumpwatch_alerts_sweeps_total`` has
   risen, ``pumpwatch_alerts_pending_pumps`` is 0 and ``pumpwatch_alerts_evaluations_total``
   has risen by at least the number of pumps. So every pump is judged at least once per chunk,
   at the chunk's end, and an alert's ``condition_at`` (the data clock when it changed) is at
   most one chunk after the data first allowed it. (Ingest's own notifications also have the
   service evaluate pumps while a chunk is being stored, as in production.)
3. Every change of every alert row is recorded by a trigger the replay adds to its scratch
   database (``bench_alert_log``: rule, priority, status, occurrence, ``condition_at`` after
   each INSERT or UPDATE). The ``alerts`` table alone cannot say when an alert first opened in
   data time: refreshing an alert's words moves its ``condition_at``, and ``alert_history``
   stamps the wall clock.

Booking refill visits (``book``): ``UPDATE pumps SET refill_appointment_at`` to the visit the
simulated clinic plans next (``Fleet.planned_refills``), after every chunk. A booked visit in
time keeps refill_due quiet, so the pumps *not* booked show the refill-due alerts of a clinic
that books nothing, and the booked ones what a booking leaves (the worst case at 14.5 % over the
programmed rate). Pumps whose refill is missed are never booked: the simulated clinic plans
none.

:func:`judge` matches the recorded changes against ``Fleet.truth``: per manifestation, the
first alert of an expected rule, how long after onset, at what priority, before the harm; and
every alert opening that no manifestation explains, split into healthy-life rules
(``lab.sim.truth.LIFE_RULES``) and false alerts.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import asyncpg

from lab.processes import ServiceProcess, metrics_service
from lab.sim.fleet import LIFE_RULES, Fleet, Injected
from lab.sim.publisher import publish_all
from services.domain.alerting import Priority, Rule
from services.settings import parse_mqtt_url
from services.storage.channels import INGEST

Action = Literal["opened", "reopened", "escalated", "eased", "resolved", "refreshed"]

_POLL_S = 0.01
_SETUP_LOG = """
CREATE TABLE IF NOT EXISTS bench_alert_log (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    alert_id     uuid NOT NULL,
    serial       text NOT NULL,
    rule         text NOT NULL,
    priority     text NOT NULL,
    status       text NOT NULL,
    occurrence   text,
    condition_at timestamptz NOT NULL,
    old_priority text,
    old_status   text
);
CREATE OR REPLACE FUNCTION bench_log_alert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO bench_alert_log (alert_id, serial, rule, priority, status, occurrence,
                                 condition_at, old_priority, old_status)
    VALUES (NEW.id, NEW.serial, NEW.rule, NEW.priority, NEW.status, NEW.occurrence,
            NEW.condition_at, OLD.priority, OLD.status);
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS bench_log_alert ON alerts;
CREATE TRIGGER bench_log_alert AFTER INSERT OR UPDATE ON alerts
    FOR EACH ROW EXECUTE FUNCTION bench_log_alert();
"""
_LOG_ROWS = """
SELECT id, alert_id, serial, rule, priority, status, occurrence, condition_at, old_priority,
       old_status
FROM bench_alert_log ORDER BY id
"""
_REGISTER = """
INSERT INTO pumps (serial, model)
SELECT * FROM unnest($1::text[], $2::text[]) ORDER BY 1
ON CONFLICT (serial) DO NOTHING
"""
_BOOK = """
UPDATE pumps p SET refill_appointment_at = v.at
FROM unnest($1::text[], $2::timestamptz[]) AS v(serial, at)
WHERE p.serial = v.serial AND p.refill_appointment_at IS DISTINCT FROM v.at
"""
SWEEP_PAYLOAD = json.dumps({"serials": None})


class ReplayError(RuntimeError):
    """The services stopped making progress during a replay (one that dies raises
    lab.processes.ServiceError)."""


# -- the services as processes --------------------------------------------------------------------


def ingest_process(
    database_url: str, broker_url: str, log_path: Path, **env: str
) -> ServiceProcess:
    """Ingest with a client id and shared-subscription group of its own: a broker keeps routing
    a share of the stream to a group member whose session outlived its process."""
    name = f"replay-ingest-{uuid.uuid4().hex[:8]}"
    settings = {
        "PUMPWATCH_DATABASE_URL": database_url,
        "PUMPWATCH_MQTT_URL": broker_url,
        "PUMPWATCH_MQTT_CLIENT_ID": name,
        "PUMPWATCH_MQTT_SHARE_GROUP": name,
    }
    return metrics_service("ingest", settings | env, log_path)


def alerts_process(
    database_url: str, broker_url: str, log_path: Path, **env: str
) -> ServiceProcess:
    settings = {"PUMPWATCH_DATABASE_URL": database_url, "PUMPWATCH_MQTT_URL": broker_url}
    return metrics_service("alerts", settings | env, log_path)


def notify_process(
    database_url: str, broker_url: str, log_path: Path, **env: str
) -> ServiceProcess:
    """``pumpwatch notify``: the notification worker alone (MQTT deliveries to the broker)."""
    settings = {"PUMPWATCH_DATABASE_URL": database_url, "PUMPWATCH_MQTT_URL": broker_url}
    return metrics_service("notify", settings | env, log_path)


def stored(metrics: Mapping[str, float]) -> int:
    """Messages ingest stored (telemetry and events)."""
    return int(
        metrics.get('pumpwatch_ingest_messages_stored_total{kind="telemetry"}', 0.0)
        + metrics.get('pumpwatch_ingest_messages_stored_total{kind="events"}', 0.0)
    )


# -- the replay -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    chunk: int
    chunks: int
    sim_now: datetime
    messages: int
    """Valid messages published (and stored) so far."""
    wall_s: float


@dataclass(frozen=True)
class AlertChange:
    """One change of one alert row, as the log trigger saw it."""

    id: int
    alert_id: str
    serial: str
    rule: Rule
    priority: Priority
    status: str
    occurrence: str | None
    condition_at: datetime
    """The data clock when it changed."""
    action: Action

    @property
    def active(self) -> bool:
        return self.status != "resolved"


@dataclass
class ReplayResult:
    start: datetime
    end: datetime
    chunk: timedelta
    chunks: int = 0
    messages: int = 0
    """Valid messages published (each stored once)."""
    invalid: int = 0
    """Malformed messages published (quarantined)."""
    wall_s: float = 0.0
    changes: list[AlertChange] = field(default_factory=list)
    evaluations: int = 0
    evaluation_errors: int = 0
    booked: int = 0
    """Booking updates made (a pump's next visit moved)."""


def _action(
    status: str, priority: Priority, old_status: str | None, old_priority: Priority | None
) -> Action:
    if old_status is None:
        return "opened"
    if old_status == "resolved" and status != "resolved":
        return "reopened"
    if status == "resolved":
        return "resolved" if old_status != "resolved" else "refreshed"
    if old_priority is not None and priority > old_priority:
        return "escalated"
    if old_priority is not None and priority < old_priority:
        return "eased"
    return "refreshed"


async def replay(
    *,
    broker_url: str,
    database_url: str,
    fleet: Fleet,
    until: datetime,
    log_dir: Path,
    chunk: timedelta = timedelta(hours=6),
    book: Collection[str] = (),
    ingest_env: Mapping[str, str] | None = None,
    alerts_env: Mapping[str, str] | None = None,
    progress: Callable[[Progress], None] | None = None,
    mqtt5: bool = True,
    wait_s: float = 120.0,
) -> ReplayResult:
    """Publish ``fleet`` from its ``now`` to ``until`` through ingest and alerts (module
    docstring). The database must be migrated and hold no pumps yet; ``until`` may not be in
    the future (ingest refuses readings from the future)."""
    if until > datetime.now(UTC):
        raise ValueError("a replay cannot run into the future: ingest quarantines such readings")
    if chunk <= timedelta(0):
        raise ValueError("chunk must be positive")
    await asyncio.to_thread(log_dir.mkdir, parents=True, exist_ok=True)
    result = ReplayResult(start=fleet.now, end=until, chunk=chunk)
    protocol: dict[str, str] = (
        {} if mqtt5 else {"PUMPWATCH_MQTT_PROTOCOL": "3.1.1", "PUMPWATCH_MQTT_SHARE_GROUP": ""}
    )
    ingest = ingest_process(
        database_url,
        broker_url,
        log_dir / "ingest.log",
        PUMPWATCH_INGEST_COMMITS_IN_FLIGHT="1",
        PUMPWATCH_INGEST_BATCH_MAX_WAIT_MS="5",
        **protocol,
        **(ingest_env or {}),
    )
    alerts = alerts_process(
        database_url,
        broker_url,
        log_dir / "alerts.log",
        PUMPWATCH_ALERTS_CLOCK="data",
        PUMPWATCH_ALERTS_SWEEP_INTERVAL_S="86400",
        **(alerts_env or {}),
    )
    conn = await asyncpg.connect(database_url)
    started = time.monotonic()
    try:
        await conn.execute(_SETUP_LOG)
        await asyncio.to_thread(ingest.start)
        await asyncio.to_thread(alerts.start)
        target = parse_mqtt_url(broker_url)
        # The clinic registers its pumps (and books their visits) before any data arrives.
        await conn.execute(
            _REGISTER, [p.serial for p in fleet.pumps], [p.model for p in fleet.pumps]
        )
        booked = set(book)
        result.booked += await _book(conn, fleet, booked)
        total = max(1, -(-(until - fleet.now) // chunk))
        client_id = f"replay-publisher-{uuid.uuid4().hex[:8]}"
        while fleet.now < until:
            end = min(fleet.now + chunk, until)
            messages = fleet.advance(end)
            if messages:
                valid = sum(m.valid for m in messages)
                result.messages += valid
                result.invalid += len(messages) - valid
                await asyncio.to_thread(
                    publish_all,
                    target,
                    messages,
                    client_id=client_id,
                    protocol="5" if mqtt5 else "3.1.1",
                )
                await _until(
                    lambda: stored(ingest.metrics()) >= result.messages,
                    (ingest, alerts),
                    wait_s,
                    f"ingest to store {result.messages} messages",
                )
            if booked:
                visits = [(s, at) for s, at in fleet.planned_refills().items() if s in booked]
                status = await conn.execute(_BOOK, [s for s, _ in visits], [at for _, at in visits])
                result.booked += int(status.split()[-1])
            await _sweep(conn, alerts, ingest, wait_s)
            result.chunks += 1
            if progress is not None:
                progress(
                    Progress(
                        result.chunks,
                        total,
                        fleet.now,
                        result.messages,
                        time.monotonic() - started,
                    )
                )
        final = await asyncio.to_thread(alerts.metrics)
        result.evaluations = int(final.get("pumpwatch_alerts_evaluations_total", 0.0))
        result.evaluation_errors = int(final.get("pumpwatch_alerts_evaluation_errors_total", 0.0))
        result.changes = [_change(row) for row in await conn.fetch(_LOG_ROWS)]
    finally:
        await conn.close()
        await asyncio.to_thread(alerts.stop)
        await asyncio.to_thread(ingest.stop)
    result.wall_s = time.monotonic() - started
    return result


async def _book(conn: asyncpg.Connection, fleet: Fleet, booked: set[str]) -> int:
    """Book the next visit the clinic plans for these pumps; how many bookings moved."""
    if not booked:
        return 0
    visits = [(s, at) for s, at in fleet.planned_refills().items() if s in booked]
    status = await conn.execute(_BOOK, [s for s, _ in visits], [at for _, at in visits])
    return int(status.split()[-1])


def _change(row: asyncpg.Record) -> AlertChange:
    priority = Priority.from_label(row["priority"])
    old = None if row["old_priority"] is None else Priority.from_label(row["old_priority"])
    return AlertChange(
        row["id"],
        str(row["alert_id"]),
        row["serial"],
        Rule(row["rule"]),
        priority,
        row["status"],
        row["occurrence"],
        row["condition_at"],
        _action(row["status"], priority, row["old_status"], old),
    )


async def _until(
    ready: Callable[[], bool],
    services: Iterable[ServiceProcess],
    wait_s: float,
    what: str,
) -> None:
    deadline = time.monotonic() + wait_s
    while not await asyncio.to_thread(ready):
        for service in services:
            service.check()
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {s.command}:\n{s.log()}" for s in services)
            raise ReplayError(f"waited {wait_s:.0f} s for {what}\n{logs}")
        await asyncio.sleep(_POLL_S)


async def _sweep(
    conn: asyncpg.Connection, alerts: ServiceProcess, ingest: ServiceProcess, wait_s: float
) -> None:
    """Have the alert service evaluate every pump at the current data clock, and wait for it."""
    before = await asyncio.to_thread(alerts.metrics)
    sweeps = before.get("pumpwatch_alerts_sweeps_total", 0.0)
    evaluations = before.get("pumpwatch_alerts_evaluations_total", 0.0)
    pumps = int(await conn.fetchval("SELECT count(*) FROM pumps"))
    await conn.execute("SELECT pg_notify($1, $2)", INGEST, SWEEP_PAYLOAD)

    def swept() -> bool:
        now = alerts.metrics()
        return (
            now.get("pumpwatch_alerts_sweeps_total", 0.0) > sweeps
            and now.get("pumpwatch_alerts_pending_pumps", 1.0) == 0
            and now.get("pumpwatch_alerts_evaluations_total", 0.0) >= evaluations + pumps
        )

    await _until(swept, (alerts, ingest), wait_s, f"a sweep of {pumps} pumps")


# -- judging the alerts against the ground truth -------------------------------------------------


@dataclass(frozen=True)
class Detection:
    """How the alerts answered one manifestation of a fault."""

    record: Injected
    first: AlertChange | None
    """The first change of an alert of an expected rule that matches it (None: not detected)."""
    priority: Priority | None
    """The highest priority those alerts had by ``record.deadline + slack``."""
    rules: frozenset[Rule]
    """The expected rules whose alerts were active by then."""
    slack: timedelta

    @property
    def detected(self) -> bool:
        return self.first is not None

    @property
    def delay(self) -> timedelta | None:
        """Data time from onset to the first alert (negative: it came ahead, e.g. refill due)."""
        return None if self.first is None else self.first.condition_at - self.record.onset

    @property
    def in_time(self) -> bool:
        """Detected by the deadline: onset + the rule's own delay + one chunk."""
        return (
            self.first is not None and self.first.condition_at <= self.record.deadline + self.slack
        )

    @property
    def before_harm(self) -> bool | None:
        """None when the record names no harm time."""
        if self.record.harm_at is None:
            return None
        return self.first is not None and self.first.condition_at < self.record.harm_at


@dataclass(frozen=True)
class Opening:
    """An alert opened (or reopened) and what it became before it resolved."""

    change: AlertChange
    highest: Priority
    verdict: Literal["explained", "life", "false"]
    explained_by: Injected | None


@dataclass
class Judgement:
    detections: list[Detection]
    pending: list[Injected]
    """Manifestations whose deadline the replay did not reach: not judged."""
    openings: list[Opening]

    def false_alerts(self) -> list[Opening]:
        return [o for o in self.openings if o.verdict == "false"]

    def life_alerts(self) -> list[Opening]:
        return [o for o in self.openings if o.verdict == "life"]


def judge(
    truth: Iterable[Injected],
    changes: Iterable[AlertChange],
    *,
    end: datetime,
    slack: timedelta,
) -> Judgement:
    """Match the alert changes of a replay ending at ``end`` against the ground truth;
    ``slack``: how much later than a record's deadline an alert may come (one chunk)."""
    records = list(truth)
    by_pump: dict[str, list[AlertChange]] = defaultdict(list)
    for change in sorted(changes, key=lambda c: c.id):
        by_pump[change.serial].append(change)
    detections: list[Detection] = []
    pending: list[Injected] = []
    for record in records:
        if not record.detectable:
            continue
        if record.deadline + slack > end:
            pending.append(record)
            continue
        later = _next_onset(record, records)
        detections.append(_detect(record, by_pump[record.serial], later, slack))
    records_by_pump: dict[str, list[Injected]] = defaultdict(list)
    for record in records:
        records_by_pump[record.serial].append(record)
    openings = [
        opening
        for serial, found in by_pump.items()
        for opening in _openings(found, records_by_pump[serial])
    ]
    return Judgement(detections, pending, openings)


def _next_onset(record: Injected, records: list[Injected]) -> datetime | None:
    """The onset of the pump's next manifestation of the same kind: an alert after it belongs to
    that one."""
    return min(
        (
            r.onset
            for r in records
            if r.serial == record.serial
            and r.signature == record.signature
            and r.onset > record.onset
        ),
        default=None,
    )


def _detect(
    record: Injected, changes: list[AlertChange], later: datetime | None, slack: timedelta
) -> Detection:
    occurrence = f"refill {record.onset.astimezone(UTC).isoformat()}"
    earliest = record.onset - record.lead
    matching = [
        c
        for c in changes
        if c.rule in record.expected_rules
        and c.active
        and (
            c.occurrence == occurrence
            if record.signature == "refill"
            else earliest <= c.condition_at and (later is None or c.condition_at < later)
        )
    ]
    first = min(matching, key=lambda c: (c.condition_at, c.id), default=None)
    by = record.deadline + slack
    reached = [c for c in matching if c.condition_at <= by]
    return Detection(
        record,
        first,
        max((c.priority for c in reached), default=None),
        frozenset(c.rule for c in reached),
        slack,
    )


def _openings(changes: list[AlertChange], records: list[Injected]) -> list[Opening]:
    out: list[Opening] = []
    episode: dict[str, tuple[AlertChange, Priority]] = {}

    def close(alert_id: str) -> None:
        opened, highest = episode.pop(alert_id)
        record = _explanation(opened, records)
        verdict: Literal["explained", "life", "false"] = (
            "explained" if record is not None else "life" if opened.rule in LIFE_RULES else "false"
        )
        out.append(Opening(opened, highest, verdict, record))

    for change in changes:
        if change.action in ("opened", "reopened"):
            episode[change.alert_id] = (change, change.priority)
        elif change.alert_id in episode:
            opened, highest = episode[change.alert_id]
            episode[change.alert_id] = (opened, max(highest, change.priority))
            if change.action == "resolved":
                close(change.alert_id)
    for alert_id in list(episode):
        close(alert_id)
    return sorted(out, key=lambda o: o.change.id)


_GRACE = timedelta(days=1)


def _explanation(change: AlertChange, records: list[Injected]) -> Injected | None:
    """The manifestation that accounts for this alert: one of its pump whose rules include the
    alert's and that had begun (or was due within its lead, or a day) when the alert opened."""
    for record in records:
        if change.rule not in record.explains | record.expected_rules:
            continue
        if change.condition_at < record.onset - record.lead - _GRACE:
            continue
        if record.ends is not None and change.condition_at > record.ends + _GRACE:
            continue  # a spell explains alerts while it lasts (and a day after)
        return record
    return None
