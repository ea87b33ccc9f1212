"""The decoder's fast path gives exactly the slow path's verdict, on every input.

``contract.decode`` decodes common telemetry straight into the struct
(``contract._decode_plain_telemetry``) and answers from it only when it has proven, on the raw
text, that the slow path (``contract._decode_slow``: generic tree, checks, ``convert``) would
accept the payload with an equal message. Here both are run on the same payloads and must agree:
accepted with messages of the same ``repr`` (so ``1`` and ``1.0``, ``0.0`` and ``-0.0``, and the
time zone of a stamp are told apart), or rejected with the same reason and detail.

The payloads are the simulator's (as it publishes them: compact, offsets ``+01:00``, ``+00:00``
and others), the contract's corpus and its mutations, and valid telemetry changed in the ways
that could fool the fast path's proof: repeated keys (also nested, also among unknown fields),
unknown fields, other spellings of ``recorded_at``, integral floats and boundary numbers, escapes
in strings, and spaces around the colons.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lab.sim.faults import Fault
from lab.sim.fleet import Fleet
from services.domain import contract
from services.domain.contract import Kind, Message, Rejected
from tests.support import telemetry
from tests.test_contract import (
    CORPUS,
    FULL_TELEMETRY,
    MIN_TELEMETRY,
    TELEMETRY_EXAMPLE,
    corrupted,
    mutated,
    timestamps,
)

Outcome = tuple[str, str, str]


def _outcome(decode: Callable[[Kind, bytes], Message], kind: Kind, raw: bytes) -> Outcome:
    try:
        message = decode(kind, raw)
    except Rejected as exc:
        return ("rejected", exc.reason.value, exc.detail)
    return ("accepted", type(message).__name__, repr(message))


def assert_same(kind: Kind, raw: bytes) -> bool:
    """Both paths give the same outcome; True when the fast path gave it."""
    slow = _outcome(contract._decode_slow, kind, raw)
    assert _outcome(contract.decode, kind, raw) == slow, raw
    if kind != "telemetry" or b"\\" in raw or len(raw) > contract.MAX_PAYLOAD_BYTES:
        return False
    fast = contract._decode_plain_telemetry(raw)
    if fast is None:
        return False
    assert slow == ("accepted", "Telemetry", repr(fast)), raw
    assert fast == contract._decode_slow(kind, raw)
    return True


# --------------------------------------------------------------------------------------------
# What the simulator publishes: every valid reading takes the fast path.


def _simulated() -> list[bytes]:
    fleet = Fleet(
        pumps=40,
        seed=11,
        start=datetime(2026, 3, 1, tzinfo=UTC),
        fault_rates={Fault.MALFORMED: 0.3, Fault.MOTOR_STALL: 0.2, Fault.OCCLUSION: 0.2},
    )
    return [m.payload for m in fleet.advance(datetime(2026, 3, 1, 8, tzinfo=UTC))]


SIMULATED = _simulated()


def test_the_simulators_readings_take_the_fast_path_and_agree() -> None:
    valid = fast = 0
    offsets: set[bytes] = set()
    for raw in SIMULATED:
        if _outcome(contract._decode_slow, "telemetry", raw)[0] == "accepted":
            valid += 1
            offsets.add(raw.split(b'"recorded_at":"')[1][19:26])
        fast += assert_same("telemetry", raw)
        assert_same("events", raw)
    assert valid > 1000
    assert fast == valid  # not one valid reading left to the slow path
    assert b'+00:00"' in offsets  # comes back as "Z": one colon fewer, allowed for
    assert len(offsets) > 2


def test_the_corpus_gives_the_same_verdicts() -> None:
    taken = 0
    for case in CORPUS:
        assert_same(case.kind, case.raw)
        taken += assert_same(case.kind, _compact(case.raw))
    assert taken > 20


def _compact(raw: bytes) -> bytes:
    """json.dumps's spelling (", ", ": ") as the simulator's (no spaces)."""
    return raw.replace(b'": ', b'":').replace(b', "', b',"')


# --------------------------------------------------------------------------------------------
# Payloads built to fool the proof. Each is valid telemetry with one change; the fast path must
# leave every one the slow path refuses (or would decode differently) to the slow path.

_COMMON = ("v", "msg_id", "serial", "seq", "recorded_at")
_BASE = msgspec.json.encode(  # as the simulator spells it
    {
        "v": 1,
        "msg_id": "3f0e8a52-5d4e-4c5b-9a57-0c7f1d2b9e11",
        "serial": "NGP204519H",
        "seq": 0,
        "recorded_at": "2026-11-24T08:30:00+01:00",
        **{k: v for k, v in telemetry().items() if k not in _COMMON},
    }
)
_HALFWAY = str(2**1024 - 2**970).encode()
_BELOW_HALFWAY = str(2**1024 - 2**970 - 1).encode()


def _swap(old: bytes, new: bytes, raw: bytes = _BASE) -> bytes:
    assert raw.count(old) == 1, old
    return raw.replace(old, new)


_STAMP = b'"2026-11-24T08:30:00+01:00"'
CRAFTED: dict[str, bytes] = {
    "base": _BASE,
    "repeated-key": _swap(b'"v":1,', b'"v":1,"v":1,'),
    "repeated-nested-key": _swap(b'"status":"ok"', b'"status":"ok","status":"eri"'),
    "repeated-key-in-unknown": _swap(b'"v":1,', b'"v":1,"x":{"a":1,"a":2},'),
    "repeated-key-zulu": _swap(_STAMP, b'"2026-11-24T07:30:00Z","v":1'),
    "repeated-key-utc-colon": _swap(_STAMP, b'"2026-11-24T07:30:00+00:00","v":1'),
    "repeated-key-minus-zero": _swap(_STAMP, b'"2026-11-24T07:30:00-00:00","v":1'),
    # An offset without its colon comes back with one: it would hide a repeated key.
    "repeated-key-offset-without-colon": _swap(_STAMP, b'"2026-11-24T08:30:00+0100","v":1'),
    "offset-without-colon": _swap(_STAMP, b'"2026-11-24T08:30:00+0100"'),
    "space-separator": _swap(_STAMP, b'"2026-11-24 08:30:00+01:00"'),
    "ten-fraction-digits": _swap(_STAMP, b'"2026-11-24T08:30:00.1234567891+01:00"'),
    "nine-fraction-digits": _swap(_STAMP, b'"2026-11-24T08:30:00.123456789+01:00"'),
    "rounded-up-fraction": _swap(_STAMP, b'"2026-11-24T23:59:59.9999996z"'),
    "lowercase": _swap(_STAMP, b'"2026-11-24t08:30:00z"'),
    "utc-colon": _swap(_STAMP, b'"2026-11-24T07:30:00+00:00"'),
    "trailing-newline": _swap(_STAMP, b'"2026-11-24T08:30:00+01:00\\n"'),
    "no-offset": _swap(_STAMP, b'"2026-11-24T08:30:00"'),
    "spaced-colon-stamp": _swap(b'"recorded_at":', b'"recorded_at" :'),
    "spaced-stamp": _swap(b'"recorded_at":', b'"recorded_at": '),
    "stamp-twice": _swap(b'"v":1,', b'"v":1,"recorded_at":"2026-11-24T08:30:00Z",'),
    "stamp-in-unknown": _swap(b'"v":1,', b'"v":1,"x":{"recorded_at":"2026-11-24T08:30:00Z"},'),
    "stamp-name-in-a-string": _swap(b'"baclofen"', b'"recorded_at"'),
    "unknown-field": _swap(b'"v":1,', b'"v":1,"x":1,'),
    "unknown-type": _swap(b'"v":1,', b'"v":1,"type":"refill",'),
    "colon-in-a-string": _swap(b'"baclofen"', b'"bac:lo:fen"'),
    # An escaped colon is not counted in the raw text but comes back as one: it would hide a
    # repeated key.
    "escaped-colon-and-repeated-key": _swap(b'"SynchroMed II 8637-40"', b'"a\\u003a","v":1'),
    "escaped-colon": _swap(b'"baclofen"', b'"bac\\u003alofen"'),
    "escaped-slash": _swap(b'"baclofen"', b'"bac\\/lofen"'),
    "nul": _swap(b'"baclofen"', b'"bac\\u0000lofen"'),
    "lone-surrogate": _swap(b'"baclofen"', b'"\\ud800"'),
    "integral-floats": _swap(b'"v":1,', b'"v":1.0,"seq":5E0,', _swap(b'"seq":0,', b"")),
    "v-1e0": _swap(b'"v":1,', b'"v":1e0,'),
    "seq-minus-zero": _swap(b'"seq":0,', b'"seq":-0,'),
    "seq-minus-zero-float": _swap(b'"seq":0,', b'"seq":-0.0,'),
    "seq-largest": _swap(b'"seq":0,', b'"seq":9223372036854775807,'),
    "seq-past-largest": _swap(b'"seq":0,', b'"seq":9223372036854775808,'),
    "seq-float-2-63": _swap(b'"seq":0,', b'"seq":9.223372036854775807e18,'),
    "seq-fraction": _swap(b'"seq":0,', b'"seq":1.5,'),
    "volume-minus-zero": _swap(b'"volume_ml":17.42', b'"volume_ml":-0'),
    "volume-minus-zero-float": _swap(b'"volume_ml":17.42', b'"volume_ml":-0.0'),
    "volume-exponent": _swap(b'"volume_ml":17.42', b'"volume_ml":1742E-2'),
    "volume-2-53-plus-1": _swap(b'"volume_ml":17.42', b'"volume_ml":9007199254740993'),
    "volume-2-64-plus-1": _swap(b'"volume_ml":17.42', b'"volume_ml":18446744073709551617'),
    "volume-below-overflow": _swap(b'"volume_ml":17.42', b'"volume_ml":' + _BELOW_HALFWAY),
    "volume-overflows": _swap(b'"volume_ml":17.42', b'"volume_ml":' + _HALFWAY),
    "volume-1e400": _swap(b'"volume_ml":17.42', b'"volume_ml":1e400'),
    "volume-tiny": _swap(b'"volume_ml":17.42', b'"volume_ml":5e-324'),
    "deep-unknown": _swap(b'"v":1,', b'"v":1,"x":' + b"[" * 40 + b"]" * 40 + b","),
    "whitespace": _BASE.replace(b'":', b'" : ').replace(b",", b" ,\n "),
    "trailing-garbage": _BASE + b"x",
    "too-large": _swap(b'"SynchroMed II 8637-40"', b'"' + b"x" * contract.MAX_PAYLOAD_BYTES + b'"'),
    "not-utf8": _swap(b'"baclofen"', b'"bac\xfflofen"'),
}  # fmt: skip


@pytest.mark.parametrize("raw", CRAFTED.values(), ids=CRAFTED.keys())
def test_crafted_payloads_give_the_same_verdict(raw: bytes) -> None:
    assert_same("telemetry", raw)


def test_the_fast_path_takes_the_common_spellings() -> None:
    for name in (
        "base",
        "lowercase",
        "utc-colon",
        "nine-fraction-digits",
        "rounded-up-fraction",
        "spaced-stamp",
        "integral-floats",
        "colon-in-a-string",
        "seq-largest",
        "volume-minus-zero",
        "volume-below-overflow",
    ):
        assert assert_same("telemetry", CRAFTED[name]), name
    assert assert_same("telemetry", json.dumps(json.loads(_BASE)).encode())


# --------------------------------------------------------------------------------------------
# Generated: valid telemetry (the simulator's and the contract's) with one to three changes.

_MARK = re.compile(rb'"\\u0002(\d+)":\s*0')
_VALUE = re.compile(rb'"\\u0003(\d+)"')

_FIELD_TEXT = st.sampled_from(["a", "a:b", ":", "recorded_at", "x:y:z", "é:", "08:00"])
_NUMBER_TOKENS = st.sampled_from(
    [
        b"0", b"-0", b"-0.0", b"1", b"1.0", b"1e0", b"10E-1", b"5.0", b"40", b"4e1", b"0.5",
        b"9223372036854775807", b"9223372036854775808", b"9.223372036854775807e18",
        b"18446744073709551617", b"9007199254740993", b"5e-324", b"1e308", b"1e400",
        _HALFWAY, _BELOW_HALFWAY, b"-1", b"true", b"null", b'"1"',
    ]
)  # fmt: skip
_STRING_TOKENS = st.sampled_from(
    [
        b'"a:b"', b'"a\\u003ab"', b'"a\\/b"', b'"\\u0000"', b'"\\ud800"', b'"a\\"b"',
        b'"a\\\\"', b'"\\u0041"', b'"recorded_at"', b'"2026-11-24T08:30:00Z"', b'""', b"1",
    ]
)  # fmt: skip
_STAMPS = st.sampled_from(
    [
        "2026-11-24T08:30:00+01:00", "2026-11-24T07:30:00+00:00", "2026-11-24T07:30:00-00:00",
        "2026-11-24T07:30:00Z", "2026-11-24t07:30:00z", "2026-11-24T08:30:00+0100",
        "2026-11-24T07:30:00+0000", "2026-11-24 08:30:00+01:00", "2026-11-24T08:30:00.5+01:00",
        "2026-11-24T08:30:00.1234567891+01:00", "2026-11-24T08:30+01:00", "2026-11-24T08:30:00",
        "2026-11-24T08:30:00+00:30", "2026-11-24T08:30:00-10:00", "2026-11-24T08:30:60Z",
    ]
) | timestamps  # fmt: skip
_FIELDS = sorted(contract.Telemetry.__struct_fields__)
_unknown_values: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=6) | _FIELD_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_FIELD_TEXT, inner, max_size=3),
    max_leaves=6,
)


def _shape(node: Any) -> Any:
    """``node`` with every string and number replaced by 0."""
    if isinstance(node, dict):
        return {key: _shape(child) for key, child in node.items()}
    if isinstance(node, list):
        return [_shape(child) for child in node]
    return 0


def _objects(node: Any, path: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    """The path of every object in ``node``."""
    if isinstance(node, dict):
        return [path, *(p for key, child in node.items() for p in _objects(child, (*path, key)))]
    if isinstance(node, list):
        return [p for i, child in enumerate(node) for p in _objects(child, (*path, i))]
    return []


def _leaves(node: Any, path: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    if isinstance(node, dict):
        return [p for key, child in node.items() for p in _leaves(child, (*path, key))]
    if isinstance(node, list):
        return [p for i, child in enumerate(node) for p in _leaves(child, (*path, i))]
    return [path]


def _at(node: Any, path: tuple[str | int, ...]) -> Any:
    for part in path:
        node = node[part]
    return node


def _bases() -> list[dict[str, Any]]:
    """Valid telemetry of every shape: the contract's examples and one of each of the
    simulator's shapes (schedule, flow, alarms present or not)."""
    docs = [FULL_TELEMETRY, MIN_TELEMETRY, json.loads(TELEMETRY_EXAMPLE)]
    shapes: set[str] = set()
    for raw in SIMULATED:
        if _outcome(contract._decode_slow, "telemetry", raw)[0] != "accepted":
            continue
        doc = msgspec.json.decode(raw)
        shape = json.dumps(_shape(doc))
        if shape not in shapes:
            shapes.add(shape)
            docs.append(doc)
    return docs


BASES = _bases()


@st.composite
def fooling(draw: st.DrawFn) -> bytes:
    """Valid telemetry, compact or spaced, with one to three changes that could fool the
    fast path: a repeated or unknown member anywhere, a number or string spelled otherwise, a
    different ``recorded_at``."""
    doc = copy.deepcopy(draw(st.sampled_from(BASES)))
    members: list[bytes] = []
    values: list[bytes] = []
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 3]))):
        action = draw(st.sampled_from(["repeat", "unknown", "value", "value", "stamp", "stamp"]))
        if action == "stamp":
            doc["recorded_at"] = draw(_STAMPS)
        elif action == "value":
            path = draw(st.sampled_from(_leaves(doc)))
            old = _at(doc, path)
            token = draw(_NUMBER_TOKENS if isinstance(old, int | float) else _STRING_TOKENS)
            _at(doc, path[:-1])[path[-1]] = f"\x03{len(values)}"
            values.append(token)
        else:
            where = _at(doc, draw(st.sampled_from(_objects(doc))))
            if action == "repeat" and where:
                key = draw(st.sampled_from(sorted(where)))
                value = where[key] if draw(st.booleans()) else draw(_unknown_values)
            else:
                key = draw(_FIELD_TEXT | st.sampled_from(_FIELDS))
                value = draw(_unknown_values)
            member = msgspec.json.encode({key: value})[1:-1]
            marker = f"\x02{len(members)}"
            members.append(member)
            if draw(st.booleans()):
                where[marker] = 0
            else:  # before the others
                items = list(where.items())
                where.clear()
                where.update({marker: 0, **dict(items)})
    raw = msgspec.json.encode(doc) if draw(st.booleans()) else json.dumps(doc).encode()
    raw = _MARK.sub(lambda m: members[int(m[1])], raw)
    return _VALUE.sub(lambda m: values[int(m[1])], raw)  # fmt: skip


_GENERATED = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@settings(_GENERATED, max_examples=1500)
@given(fooling())
def test_payloads_made_to_fool_the_proof_give_the_same_verdict(raw: bytes) -> None:
    assert_same("telemetry", raw)


@settings(_GENERATED, max_examples=400)
@given(mutated())
def test_mutated_messages_give_the_same_verdict(message: tuple[Kind, bytes]) -> None:
    kind, raw = message
    assert_same(kind, raw)
    assert_same(kind, _compact(raw))


@settings(_GENERATED, max_examples=300)
@given(corrupted())
def test_corrupted_bytes_give_the_same_verdict(message: tuple[Kind, bytes]) -> None:
    kind, raw = message
    assert_same(kind, raw)
    assert_same(kind, _compact(raw))
