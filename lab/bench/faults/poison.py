"""Scenario 5: a poison stream. Valid messages interleaved one for one with malformed ones of
twelve kinds, published as fast as the broker takes them to one ``pumpwatch ingest``.

Checked: every valid message stored once; every malformed one quarantined with the reason the
contract requires (matched per distinct topic and payload by the quarantine's digest, with its
count of occurrences); the same ingest process, on its first connection, alive throughout; and
its backlog back to zero with every received message accounted for.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from lab.bench.faults.common import (
    Lab,
    Outcome,
    Size,
    check_stored,
    fetch,
    fleet_stream,
    ingest_service,
    publish,
    seconds,
    total,
    wait_until,
)
from lab.sim.fleet import Outgoing
from services.domain.contract import Reason

RECEIVED = "pumpwatch_ingest_messages_received_total"
STORED = "pumpwatch_ingest_messages_stored_total"
DUPLICATES = "pumpwatch_ingest_messages_duplicate_total"
QUARANTINED = "pumpwatch_ingest_messages_quarantined_total"
BACKLOG = "pumpwatch_ingest_backlog_messages"


@dataclass(frozen=True)
class PoisonSize:
    valid: int
    malformed: int
    pumps: int


SIZES: dict[Size, PoisonSize] = {
    "reduced": PoisonSize(valid=2_000, malformed=2_000, pumps=50),
    "full": PoisonSize(valid=10_000, malformed=10_000, pumps=50),
}


@dataclass(frozen=True)
class Poison:
    kind: str
    topic: str
    payload: bytes
    reason: Reason

    def outgoing(self, at: datetime) -> Outgoing:
        return Outgoing(
            topic=self.topic,
            payload=self.payload,
            kind="telemetry",
            msg_id=None,
            serial=self.topic.split("/")[1],
            valid=False,
            at=at,
            reason=self.reason,
        )


Maker = Callable[[dict[str, Any], str, random.Random], Poison]
_MARK = "\u2063poison\u2063"


def _with_raw(doc: dict[str, Any], put: Callable[[dict[str, Any]], None], raw: bytes) -> bytes:
    """``doc`` encoded with one value replaced by ``raw`` bytes (which JSON cannot express)."""
    put(doc)
    return json.dumps(doc).encode().replace(json.dumps(_MARK).encode(), raw, 1)


def _set_firmware(doc: dict[str, Any]) -> None:
    doc["source"]["firmware"] = _MARK


def _set_volume(doc: dict[str, Any]) -> None:
    doc["reservoir"]["volume_ml"] = _MARK


def _topic(serial: str) -> str:
    return f"pumps/{serial}/telemetry"


def deep_nesting(doc: dict[str, Any], serial: str, rng: random.Random) -> Poison:
    depth = rng.choice((33, 40, 200, 5000))
    doc["extra"] = _MARK
    raw = (
        json.dumps(doc).encode().replace(json.dumps(_MARK).encode(), b"[" * depth + b"]" * depth, 1)
    )
    return Poison("deep nesting", _topic(serial), raw, Reason.INVALID_JSON)


def huge_number(doc: dict[str, Any], serial: str, rng: random.Random) -> Poison:
    digits = "9" + "".join(rng.choice("0123456789") for _ in range(4999))
    return Poison(
        "5,000-digit number",
        _topic(serial),
        _with_raw(doc, _set_volume, digits.encode()),
        Reason.INVALID_JSON,
    )


def not_a_number(doc: dict[str, Any], serial: str, rng: random.Random) -> Poison:
    token = rng.choice((b"NaN", b"Infinity", b"-Infinity", b"1e999"))
    return Poison(
        "NaN/Infinity", _topic(serial), _with_raw(doc, _set_volume, token), Reason.INVALID_JSON
    )


def nul(doc: dict[str, Any], serial: str, rng: random.Random) -> Poison:
    raw = _with_raw(doc, _set_firmware, b'"2.4\\u0000.1"')
    return Poison("NUL", _topic(serial), raw, Reason.INVALID_JSON)


def lone_surrogate(doc: dict[str, Any], serial: str, rng: random.Random) -> Poison:
    escape = rng.choice((b"\\ud800", b"\\udfff", b"\\udbff x"))
    raw = _with_raw(doc, _set_firmware, b'"2.4' + escape + b'"')
    return Poison("lone surrogate", _topic(serial), raw, Reason.INVALID_JSON)


def invalid_utf8(doc: dict[str, Any], serial: str, rng: random.Random) -> Poison:
    bad = rng.choice((b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"\xc0\xaf"))
    raw = _with_raw(doc, _set_firmware, b'"2.4' + bad + b'"')
    return Poison("invalid UTF-8", _topic(serial), raw, Reason.INVALID_JSON)


def oversize(doc: dict[str, Any], serial: str, rng: random.Random) -> Poison:
    doc["padding"] = "x" * rng.randint(65_537, 200_000)
    return Poison("over 64 KiB", _topic(serial), json.dumps(doc).encode(), Reason.TOO_LARGE)


def wrong_type(doc: dict[str, Any], serial: str, rng: random.Random) -> Poison:
    choice = rng.randrange(4)
    if choice == 0:
        doc["reservoir"]["volume_ml"] = str(doc["reservoir"]["volume_ml"])
    elif choice == 1:
        doc["alarms"] = "motor_stall"
    elif choice == 2:
        doc["reservoir"] = [doc["reservoir"]]
    else:
        doc["v"] = True
    return Poison("wrong types", _topic(serial), json.dumps(doc).encode(), Reason.SCHEMA)


def serial_mismatch(doc: dict[str, Any], serial: str, rng: random.Random) -> Poison:
    doc["serial"] = f"OTHER{rng.randrange(10**6):06d}"
    return Poison(
        "serial ≠ topic", _topic(serial), json.dumps(doc).encode(), Reason.SERIAL_MISMATCH
    )


def wrong_topic(doc: dict[str, Any], serial: str, rng: random.Random) -> Poison:
    if rng.random() < 0.5:
        # A reading on the events topic: no event type.
        return Poison(
            "reading on the events topic",
            f"pumps/{serial}/events",
            json.dumps(doc).encode(),
            Reason.SCHEMA,
        )
    short = f"p{rng.randrange(100):02d}"  # 3 characters: not a serial
    return Poison("bad topic serial", _topic(short), json.dumps(doc).encode(), Reason.BAD_TOPIC)


def empty(doc: dict[str, Any], serial: str, rng: random.Random) -> Poison:
    payload = rng.choice((b"", b" ", b"\n", b"{}"))
    reason = Reason.SCHEMA if payload == b"{}" else Reason.INVALID_JSON
    return Poison("empty", _topic(serial), payload, reason)


def binary(doc: dict[str, Any], serial: str, rng: random.Random) -> Poison:
    body = bytes(rng.randrange(256) for _ in range(rng.randint(1, 2048)))
    # A leading byte no JSON text starts with: never valid, whatever follows.
    return Poison("binary", _topic(serial), b"\x00\x9f" + body, Reason.INVALID_JSON)


MAKERS: list[Maker] = [
    deep_nesting,
    huge_number,
    not_a_number,
    nul,
    lone_surrogate,
    invalid_utf8,
    oversize,
    wrong_type,
    serial_mismatch,
    wrong_topic,
    empty,
    binary,
]


def poison_stream(valid: list[Outgoing], count: int, rng: random.Random) -> list[Poison]:
    """``count`` malformed messages, round robin over the kinds, each made from a valid reading
    with a fresh msg_id (so payloads differ, except the few kinds of empty payload)."""
    templates = [m for m in valid if m.kind == "telemetry"]
    made: list[Poison] = []
    for i in range(count):
        base = rng.choice(templates)
        doc = json.loads(base.payload)
        doc["msg_id"] = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        made.append(MAKERS[i % len(MAKERS)](doc, base.serial, rng))
    rng.shuffle(made)
    return made


def digest(topic: str, payload: bytes) -> bytes:
    """The quarantine's key of one (topic, payload), as ingest computes it."""
    return hashlib.sha256(topic.encode() + b"\x00" + payload).digest()


def run(lab: Lab, size: Size, seed: int) -> Outcome:
    spec = SIZES[size]
    outcome = Outcome(
        "poison",
        f"{spec.valid:,} valid messages interleaved with {spec.malformed:,} malformed "
        f"({len(MAKERS)} kinds)",
    )
    started = time.monotonic()
    rng = random.Random(seed)
    valid = fleet_stream(spec.valid, pumps=spec.pumps, seed=seed)
    poisons = poison_stream(valid, spec.malformed, rng)
    now = datetime.now(UTC)
    stream: list[Outgoing] = []
    for good, bad in zip(valid, poisons, strict=False):
        stream.extend((good, bad.outgoing(now)))
    stream.extend(valid[len(poisons) :])
    stream.extend(p.outgoing(now) for p in poisons[len(valid) :])

    database_url = lab.database()
    broker = lab.broker("poison-mosquitto")
    ingest = ingest_service(lab, database_url, broker.url, name="poison-ingest")
    ingest.start()
    pid = ingest.pid
    acked = publish(broker.url, stream, client="poison-pub")
    outcome.attempted = len(stream)
    outcome.acknowledged = acked

    def settled() -> bool:
        samples = ingest.samples()
        if samples is None:
            return False
        done = total(samples, STORED) + total(samples, DUPLICATES) + total(samples, QUARANTINED)
        return total(samples, RECEIVED) == len(stream) == done and samples.get(BACKLOG) == 0

    try:
        drain_s = wait_until(settled, "every message to be settled", timeout_s=300, alive=ingest)
        outcome.figures["backlog drained, after the last PUBACK"] = seconds(drain_s)
    except (TimeoutError, RuntimeError) as exc:
        outcome.problems.append(str(exc).splitlines()[0])
    samples = ingest.samples() or {}
    outcome.check(ingest.alive and ingest.pid == pid, "the ingest process did not survive")
    outcome.check(samples.get(BACKLOG) == 0, f"backlog is {samples.get(BACKLOG)}, not 0")
    connections = len(ingest.records("mqtt_connected"))
    outcome.check(connections == 1, f"ingest connected {connections} times, not once")
    errors = [r for r in ingest.records() if r.get("level") in ("error", "critical")]
    outcome.check(not errors, f"{len(errors)} error records in ingest's log")
    outcome.check(ingest.terminate() == 0, "ingest did not stop cleanly on SIGTERM")

    stored = asyncio.run(check_stored(database_url, valid))
    outcome.stored = stored.stored
    outcome.lost = len(stored.lost)
    outcome.duplicated = stored.duplicated
    outcome.check(stored.unexpected == 0, f"{stored.unexpected} unexpected messages stored")
    _check_quarantine(outcome, database_url, poisons)
    outcome.elapsed_s = time.monotonic() - started
    return outcome


def _check_quarantine(outcome: Outcome, database_url: str, poisons: list[Poison]) -> None:
    expected: dict[bytes, tuple[Reason, int, str]] = {}
    for p in poisons:
        key = digest(p.topic, p.payload)
        reason, count, kind = expected.get(key, (p.reason, 0, p.kind))
        expected[key] = (reason, count + 1, kind)
    rows = asyncio.run(
        fetch(database_url, "SELECT digest, reason, occurrences, detail FROM quarantine")
    )
    found = {bytes(r["digest"]): (r["reason"], r["occurrences"], r["detail"]) for r in rows}
    quarantined = sum(r["occurrences"] for r in rows)
    wrong: Counter[str] = Counter()
    example: dict[str, str] = {}
    missing: Counter[str] = Counter()
    by_kind: Counter[str] = Counter()
    for key, (reason, count, kind) in expected.items():
        by_kind[kind] += count
        got = found.get(key)
        if got is None:
            missing[kind] += count
        elif got[0] != reason.value or got[1] != count:
            wrong[kind] += count
            example.setdefault(kind, f"{got[0]} x{got[1]} ({got[2][:80]}), wanted {reason.value}")
    outcome.figures["quarantined (occurrences)"] = f"{quarantined:,} of {len(poisons):,}"
    outcome.figures["kinds of poison"] = ", ".join(f"{k} {n}" for k, n in sorted(by_kind.items()))
    outcome.figures["wrong reason / missing"] = f"{sum(wrong.values())} / {sum(missing.values())}"
    outcome.check(
        len(found) == len(expected), f"{len(found)} quarantine rows, {len(expected)} wanted"
    )
    for kind, n in wrong.items():
        outcome.problems.append(f"{n} '{kind}' quarantined wrongly, e.g. {example[kind]}")
    for kind, n in missing.items():
        outcome.problems.append(f"{n} '{kind}' not quarantined")
