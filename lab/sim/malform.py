"""Ways to break a message so that the contract must refuse it, and the reason it must give."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import msgspec

from lab.sim.outgoing import Kind
from services.domain.contract import UUID_PATTERN, Reason

_encode = msgspec.json.encode
_UUID_RE = re.compile(UUID_PATTERN)
_NOT_A_NUMBER = "\u2063nan\u2063"
"""A marker string replaced by a bare non-JSON number token after encoding."""

Breaker = Callable[[dict[str, Any], random.Random, datetime], tuple[bytes, Reason]]


def malform(
    doc: dict[str, Any], kind: Kind, rng: random.Random, at: datetime
) -> tuple[bytes, Reason, str | None]:
    """Break a valid message (``doc`` is a private copy that may be changed) in one of many ways.

    Returns the payload, the reason the contract must quarantine it for, and its ``msg_id`` if a
    lenient parser could still read one."""
    breakers = _TELEMETRY if kind == "telemetry" else _EVENTS
    payload, reason = rng.choice(breakers)(doc, rng, at)
    return payload, reason, lenient_msg_id(payload)


def lenient_msg_id(payload: bytes) -> str | None:
    """The ``msg_id`` a forgiving parser (NaN allowed, last duplicate wins) finds, if any."""
    try:
        tree = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    msg_id = tree.get("msg_id") if isinstance(tree, dict) else None
    return msg_id if isinstance(msg_id, str) and _UUID_RE.match(msg_id) else None


def _truncated(doc: dict[str, Any], rng: random.Random, at: datetime) -> tuple[bytes, Reason]:
    # Any proper prefix of a JSON object lacks its closing brace.
    raw = _encode(doc)
    return raw[: rng.randint(1, len(raw) - 1)], Reason.INVALID_JSON


def _not_a_number(doc: dict[str, Any], rng: random.Random, at: datetime) -> tuple[bytes, Reason]:
    token = rng.choice((b"NaN", b"Infinity", b"-Infinity", b"1e999"))
    if "reservoir" in doc:
        doc["reservoir"]["volume_ml"] = _NOT_A_NUMBER
    else:
        doc["seq"] = _NOT_A_NUMBER
    raw = _encode(doc).replace(_encode(_NOT_A_NUMBER), token)
    return raw, Reason.INVALID_JSON


def _duplicate_key(doc: dict[str, Any], rng: random.Random, at: datetime) -> tuple[bytes, Reason]:
    key = rng.choice(("serial", "msg_id", "v"))
    raw = _encode(doc)
    return raw[:-1] + b"," + _encode(key) + b":" + _encode(doc[key]) + b"}", Reason.INVALID_JSON


def _nul(doc: dict[str, Any], rng: random.Random, at: datetime) -> tuple[bytes, Reason]:
    source = doc["source"]
    source["firmware"] = source["firmware"] + "\x00"
    return _encode(doc), Reason.INVALID_JSON


def _bad_utf8(doc: dict[str, Any], rng: random.Random, at: datetime) -> tuple[bytes, Reason]:
    raw = _encode(doc)
    marker = b'"firmware":"'
    cut = raw.index(marker) + len(marker)
    return raw[:cut] + b"\xff\xfe" + raw[cut:], Reason.INVALID_JSON


def _not_an_object(doc: dict[str, Any], rng: random.Random, at: datetime) -> tuple[bytes, Reason]:
    return _encode([doc]), Reason.SCHEMA


def _missing_field(doc: dict[str, Any], rng: random.Random, at: datetime) -> tuple[bytes, Reason]:
    body = [k for k in ("reservoir", "drug", "infusion", "type", "refill", "bolus") if k in doc]
    del doc[rng.choice(["msg_id", "serial", "recorded_at", "v", *body])]
    return _encode(doc), Reason.SCHEMA


def _wrong_value(doc: dict[str, Any], rng: random.Random, at: datetime) -> tuple[bytes, Reason]:
    choices: list[Callable[[], None]] = [
        lambda: doc.__setitem__("v", 2),
        lambda: doc.__setitem__("seq", -1),
        lambda: doc.__setitem__("msg_id", "not-a-uuid"),
        lambda: doc.__setitem__("recorded_at", at.replace(tzinfo=None).isoformat()),
        lambda: doc["source"].__setitem__("kind", "satellite"),
    ]
    if "reservoir" in doc:
        choices += [
            lambda: doc["reservoir"].__setitem__("volume_ml", -round(rng.uniform(0.1, 5.0), 2)),
            lambda: doc["reservoir"].__setitem__("volume_ml", str(doc["reservoir"]["volume_ml"])),
            lambda: doc["battery"].__setitem__("remaining_pct", 140),
            lambda: doc["infusion"].__setitem__("mode", "turbo"),
        ]
    if "refill" in doc:
        choices.append(lambda: doc["refill"].__setitem__("residual_ml", -1.5))
    if "bolus" in doc:
        choices.append(lambda: doc["bolus"].__setitem__("dose_mcg", 0))
    if "type" in doc:
        choices.append(lambda: doc.__setitem__("type", "teleport"))
    rng.choice(choices)()
    return _encode(doc), Reason.SCHEMA


def _wrong_serial(doc: dict[str, Any], rng: random.Random, at: datetime) -> tuple[bytes, Reason]:
    serial = doc["serial"]
    doc["serial"] = serial[:-1] + ("X" if serial[-1] != "X" else "Y")
    return _encode(doc), Reason.SERIAL_MISMATCH


def _future_clock(doc: dict[str, Any], rng: random.Random, at: datetime) -> tuple[bytes, Reason]:
    # Years ahead: refused by any server whose clock is within years of the simulated time.
    doc["recorded_at"] = (at + timedelta(days=rng.uniform(730, 3650))).isoformat()
    return _encode(doc), Reason.CLOCK_SKEW


def _inconsistent_dose(
    doc: dict[str, Any], rng: random.Random, at: datetime
) -> tuple[bytes, Reason]:
    infusion = doc["infusion"]
    infusion["daily_dose_mcg"] = round(infusion["daily_dose_mcg"] * rng.choice((0.5, 0.9, 1.1, 2)))
    return _encode(doc), Reason.INCONSISTENT_DOSE


_COMMON: list[Breaker] = [
    _truncated,
    _not_a_number,
    _duplicate_key,
    _nul,
    _bad_utf8,
    _not_an_object,
    _missing_field,
    _wrong_value,
    _wrong_serial,
    _future_clock,
]
_TELEMETRY: list[Breaker] = [*_COMMON, _inconsistent_dose, _wrong_value]
_EVENTS: list[Breaker] = _COMMON
