"""Judging a batch: each received message is accepted (as rows to store) or quarantined.

Pure code apart from the clock passed in; the database work is in ``writer``.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
from msgspec import UnsetType

from services.domain import contract
from services.domain.contract import (
    BolusEvent,
    Event,
    Message,
    PrescriptionChangeEvent,
    Reason,
    RefillEvent,
    Rejected,
    Telemetry,
)
from services.ingest.backlog import Incoming
from services.logs import get

log = get(__name__)

_QUARANTINE_PAYLOAD_LIMIT = contract.MAX_PAYLOAD_BYTES
_DETAIL_LIMIT = 2000


@dataclass(slots=True)
class Accepted:
    incoming: Incoming
    message: Message
    msg_id: str
    """Lower-case canonical text, as PostgreSQL prints a uuid."""
    row: tuple[Any, ...]
    """A readings row for telemetry, an events row for events (columns as in ``sql``)."""

    @property
    def is_telemetry(self) -> bool:
        return isinstance(self.message, Telemetry)

    @property
    def model(self) -> str | None:
        """The pump model a reading names; events name none."""
        return _opt(self.message.model) if isinstance(self.message, Telemetry) else None


@dataclass(slots=True)
class Quarantined:
    incoming: Incoming
    reason: Reason
    detail: str


@dataclass(slots=True)
class Judged:
    accepted: list[Accepted] = field(default_factory=list)
    quarantined: list[Quarantined] = field(default_factory=list)
    duplicates_in_batch: list[Incoming] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    """msg_ids accepted so far, to recognise a repeat within the batch."""

    def __len__(self) -> int:
        return len(self.accepted) + len(self.quarantined)

    def split(self) -> tuple[Judged, Judged]:
        """Two halves, each whole messages, for finding the one the database refuses."""
        items: list[Accepted | Quarantined] = [*self.accepted, *self.quarantined]
        half = len(items) // 2
        return _regroup(items[:half]), _regroup(items[half:])


@dataclass(frozen=True, slots=True)
class Rules:
    topic_prefix: str
    max_future: timedelta
    oldest: datetime


def judge(
    batch: list[Incoming], rules: Rules, now: datetime, *, into: Judged | None = None
) -> Judged:
    """Judge each message; with ``into``, add to an earlier part of the same batch."""
    judged = into if into is not None else Judged()
    seen = judged.seen
    for incoming in batch:
        try:
            accepted = _accept(incoming, rules, now)
        except Rejected as exc:
            judged.quarantined.append(Quarantined(incoming, exc.reason, exc.detail))
            continue
        except Exception as exc:  # any input must not stop the stream: quarantine, and say why
            log.exception("judge_failed", topic=incoming.topic, bytes=len(incoming.payload))
            judged.quarantined.append(
                Quarantined(incoming, Reason.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")
            )
            continue
        if accepted.msg_id in seen:
            judged.duplicates_in_batch.append(incoming)
        else:
            seen.add(accepted.msg_id)
            judged.accepted.append(accepted)
    return judged


def quarantine_row(item: Quarantined) -> tuple[bytes, str, bytes, int, str, str, datetime]:
    incoming = item.incoming
    topic = _clean(incoming.topic, 1024)
    digest = hashlib.sha256(topic.encode() + b"\x00" + incoming.payload).digest()
    return (
        digest,
        topic,
        incoming.payload[:_QUARANTINE_PAYLOAD_LIMIT],
        len(incoming.payload),
        item.reason.value,
        _clean(item.detail, _DETAIL_LIMIT),
        datetime.fromtimestamp(incoming.received_at, UTC),
    )


def quarantine_rows(items: list[Quarantined]) -> list[tuple[Any, ...]]:
    """Rows for ``UPSERT_QUARANTINE``: one per distinct (topic, payload), with its count."""
    by_digest: dict[bytes, tuple[Any, ...]] = {}
    counts: Counter[bytes] = Counter()
    for item in items:
        row = quarantine_row(item)
        counts[row[0]] += 1
        by_digest.setdefault(row[0], row)
    return [(*row, counts[digest]) for digest, row in by_digest.items()]


def _accept(incoming: Incoming, rules: Rules, now: datetime) -> Accepted:
    serial, kind = contract.parse_topic(incoming.topic, rules.topic_prefix)
    message = contract.decode(kind, incoming.payload)
    contract.check(
        message, topic_serial=serial, now=now, max_future=rules.max_future, oldest=rules.oldest
    )
    msg_id = message.msg_id.lower()
    received_at = datetime.fromtimestamp(incoming.received_at, UTC)
    payload = incoming.payload.decode("utf-8")
    if isinstance(message, Telemetry):
        row = _reading_row(message, msg_id, received_at, payload)
    else:
        row = _event_row(message, msg_id, received_at, payload)
    return Accepted(incoming, message, msg_id, row)


def _opt(value: Any) -> Any:
    return None if isinstance(value, UnsetType) else value


def _reading_row(m: Telemetry, msg_id: str, received_at: datetime, payload: str) -> tuple[Any, ...]:
    schedule = _opt(m.infusion.schedule)
    flow = _opt(m.flow)
    battery = _opt(m.battery)
    offset = m.recorded_at.utcoffset()
    return (
        msg_id,
        m.serial,
        m.recorded_at,
        0 if offset is None else int(offset.total_seconds() // 60),
        received_at,
        m.sequence,
        m.source_kind,
        m.source_id,
        _opt(m.model),
        m.reservoir.volume_ml,
        m.reservoir.capacity_ml,
        _opt(m.reservoir.low_alarm_ml),
        _opt(m.reservoir.basis),
        m.drug.name,
        m.drug.concentration_mcg_per_ml,
        m.infusion.mode,
        m.infusion.rate_ml_per_day,
        _opt(m.infusion.daily_dose_mcg),
        None if schedule is None else msgspec.json.encode(schedule).decode(),
        None if flow is None else _opt(flow.measured_ml_per_day),
        None if battery is None else _opt(battery.remaining_pct),
        None if battery is None else _opt(battery.status),
        [] if isinstance(m.alarms, UnsetType) else m.alarms,
        payload,
        m.source_firmware,
    )


def _event_row(
    m: Event,
    msg_id: str,
    received_at: datetime,
    payload: str,
) -> tuple[Any, ...]:
    body: msgspec.Struct
    if isinstance(m, RefillEvent):
        kind, body = "refill", m.refill
    elif isinstance(m, PrescriptionChangeEvent):
        kind, body = "prescription_change", m.infusion
    elif isinstance(m, BolusEvent):
        kind, body = "bolus", m.bolus
    else:
        kind, body = "claim", m.claim
    return (
        msg_id,
        m.serial,
        kind,
        m.recorded_at,
        received_at,
        m.sequence,
        m.source_kind,
        m.source_id,
        msgspec.json.encode(body).decode(),
        payload,
    )


def _regroup(items: list[Accepted | Quarantined]) -> Judged:
    return Judged(
        accepted=[i for i in items if isinstance(i, Accepted)],
        quarantined=[i for i in items if isinstance(i, Quarantined)],
    )


def _clean(text: str, limit: int) -> str:
    """Text PostgreSQL will take: no NUL, no lone surrogates, bounded."""
    text = text.replace("\x00", "\\u0000").encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[:limit] + "…"
