"""The published JSON Schema and the typed decoder judge every message the same way.

``contract.decode`` (msgspec, the hot path) is compared with a reference built only from the
standard library and the published schema:

1. more than 65536 bytes: ``too_large``;
2. ``bytes.decode("utf-8")``, then ``json.loads`` refusing duplicate keys (``object_pairs_hook``),
   ``NaN``/``Infinity`` (``parse_constant``) and numbers whose nearest double is infinite
   (``parse_int``/``parse_float``), then a walk refusing NUL and lone surrogates in keys and strings
   and nesting deeper than 32 levels: ``invalid_json``;
3. ``jsonschema.Draft202012Validator`` with a ``FormatChecker`` against ``#/$defs/telemetry`` or
   ``#/$defs/event`` of the published document: ``schema``.

Nesting is counted in containers: the top-level value is level 1 and every object or array inside
a container is one level deeper than it; strings, numbers, true/false/null add nothing. So
``{"x": [{}]}`` is 3 levels deep; 32 levels are accepted, 33 refused.

"date-time" in the reference is RFC 3339 section 5.6 checked here (``_rfc3339``), not the
``rfc3339-validator`` package: that one refuses a lowercase ``t``/``z`` (which RFC 3339 allows and
the schema's pattern spells out) and takes a trailing newline (its regex ends in ``$``).

Each corpus case states the verdict the contract requires; both sides must give it, with the same
reason, and the decoder's detail must name the field or the problem. A schema rejection's detail
starts with the field's path (``reservoir.volume_ml: ...``), which must be a path the reference also
reports an error at. ``check()`` and ``parse_topic()`` are tested at their boundaries at the end.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator, FormatChecker, ValidationError
from referencing import Registry, Resource

from services.domain import contract
from services.domain.contract import Kind, Reason, Rejected

LIMIT_BYTES = 64 * 1024
LIMIT_DEPTH = 32
SCHEMA = Reason.SCHEMA
INVALID = Reason.INVALID_JSON

# --------------------------------------------------------------------------------------------
# The reference: standard library JSON + jsonschema, nothing from the decoder.

DOCUMENT: dict[str, Any] = contract.schema_document()
_REGISTRY: Registry[Any] = Registry().with_resource(
    DOCUMENT["$id"], Resource.from_contents(DOCUMENT)
)
_FORMATS = FormatChecker()
_RFC3339 = re.compile(
    r"(?P<y>[0-9]{4})-(?P<mo>[0-9]{2})-(?P<d>[0-9]{2})[Tt]"
    r"(?P<h>[0-9]{2}):(?P<mi>[0-9]{2}):(?P<s>[0-9]{2})(\.[0-9]+)?"
    r"([Zz]|[+-](?P<oh>[0-9]{2}):(?P<om>[0-9]{2}))"
)


@_FORMATS.checks("date-time", raises=ValueError)
def _rfc3339(value: object) -> bool:
    """RFC 3339 date-time: full-date "T" full-time, T and Z in either case, any fraction.

    The second 60 (leap second) is refused: ``datetime`` cannot hold it and the schema says so.
    """
    if not isinstance(value, str):
        return True
    m = _RFC3339.fullmatch(value)
    if m is None:
        return False
    # Raises ValueError for Feb 30, month 13, hour 24, minute or second 60, year 0.
    year, month, day, hour, minute, second = (int(m[g]) for g in ("y", "mo", "d", "h", "mi", "s"))
    datetime(year, month, day, hour, minute, second, tzinfo=UTC)
    return m["oh"] is None or (int(m["oh"]) <= 23 and int(m["om"]) <= 59)


def _validator(name: str) -> Draft202012Validator:
    schema = {"$ref": f"{DOCUMENT['$id']}#/$defs/{name}"}
    return Draft202012Validator(schema, registry=_REGISTRY, format_checker=_FORMATS)


_VALIDATORS: dict[Kind, Draft202012Validator] = {
    "telemetry": _validator("telemetry"),
    "events": _validator("event"),
}


class _NeverValid(ValueError):
    """A value the contract lists under "Values that are never valid"."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _NeverValid(f"duplicate key {key!r}")
        result[key] = value
    return result


def _no_constant(name: str) -> Any:
    raise _NeverValid(f"{name} is not a JSON number")


def _finite_int(text: str) -> int:
    value = int(text)  # ValueError past Python's 4300-digit limit: never valid either
    try:
        float(value)  # rounds to nearest; raises when that is beyond the largest double
    except OverflowError:
        raise _NeverValid("an integer overflows a double") from None
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _NeverValid("a number overflows a double")
    return value


_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_text(text: str) -> None:
    if "\x00" in text:
        raise _NeverValid("a string contains NUL")
    if _SURROGATE.search(text):  # json.loads joins valid pairs, so any left is lone
        raise _NeverValid("a string contains a lone surrogate")


def _check_values(value: Any, level: int) -> None:
    if isinstance(value, str):
        _check_text(value)
        return
    if isinstance(value, dict):
        children: list[Any] = [*value, *value.values()]
    elif isinstance(value, list):
        children = value
    else:
        return
    if level > LIMIT_DEPTH:
        raise _NeverValid(f"nesting deeper than {LIMIT_DEPTH} levels")
    for child in children:
        _check_values(child, level + 1)


def _path(error: ValidationError) -> str:
    """``infusion.schedule[0].start``: the form of the decoder's details."""
    text = ""
    for part in error.absolute_path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text


@dataclass(frozen=True)
class Verdict:
    reason: Reason | None
    """None: accepted."""
    detail: str = ""
    paths: frozenset[str] = frozenset()
    """For ``schema``: the path of every error the validator reports ("" is the message)."""


ACCEPTED = Verdict(None)


def reference(kind: Kind, raw: bytes) -> Verdict:
    if len(raw) > LIMIT_BYTES:
        return Verdict(Reason.TOO_LARGE, f"{len(raw)} bytes")
    try:
        tree = json.loads(
            raw.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constant,
            parse_int=_finite_int,
            parse_float=_finite_float,
        )
        _check_values(tree, 1)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError, JSONDecodeError, ours
        return Verdict(INVALID, str(exc))
    errors = list(_VALIDATORS[kind].iter_errors(tree))
    if errors:
        return Verdict(SCHEMA, errors[0].message, frozenset(_path(e) for e in errors))
    return ACCEPTED


def decoder(kind: Kind, raw: bytes) -> Verdict:
    try:
        contract.decode(kind, raw)
    except Rejected as exc:
        return Verdict(exc.reason, exc.detail)
    return ACCEPTED


_DETAIL_PATH = re.compile(r"([a-z_]+(\.[a-z_]+|\[[0-9]+\])*): ")


def detail_path(detail: str) -> str:
    """The field a schema detail names first; "" when it is about the message as a whole."""
    m = _DETAIL_PATH.match(detail)
    return m[1] if m else ""


def assert_agree(kind: Kind, raw: bytes) -> Verdict:
    ref, dec = reference(kind, raw), decoder(kind, raw)
    assert dec.reason == ref.reason, (ref, dec)
    if dec.reason is SCHEMA:
        assert detail_path(dec.detail) in ref.paths, (ref, dec)
    return dec


# --------------------------------------------------------------------------------------------
# Messages.

# The example of mqtt.md, verbatim.
TELEMETRY_EXAMPLE = b"""\
{"v": 1, "msg_id": "3f0e8a52-5d4e-4c5b-9a57-0c7f1d2b9e11", "serial": "NGP204519H", "seq": 4182,
 "recorded_at": "2026-11-24T08:30:00+01:00",
 "source": {"kind": "home_hub", "id": "HUB-7731", "firmware": "2.4.1"},
 "model": "SynchroMed II 8637-40",
 "reservoir": {"volume_ml": 17.42, "capacity_ml": 40, "low_alarm_ml": 2.0, "basis": "calculated"},
 "drug": {"name": "baclofen", "concentration_mcg_per_ml": 2000},
 "infusion": {"mode": "continuous", "rate_ml_per_day": 0.25, "daily_dose_mcg": 500},
 "flow": {"measured_ml_per_day": 0.248},
 "battery": {"remaining_pct": 71, "status": "ok"},
 "alarms": []}"""

COMMON: dict[str, Any] = {
    "v": 1,
    "msg_id": "3f0e8a52-5d4e-4c5b-9a57-0c7f1d2b9e11",
    "serial": "NGP204519H",
    "recorded_at": "2026-11-24T08:30:00+01:00",
}
MIN_TELEMETRY: dict[str, Any] = {
    **COMMON,
    "reservoir": {"volume_ml": 17.42, "capacity_ml": 40},
    "drug": {"name": "baclofen", "concentration_mcg_per_ml": 2000},
    "infusion": {"mode": "continuous", "rate_ml_per_day": 0.25},
}
FULL_TELEMETRY: dict[str, Any] = {
    **COMMON,
    "seq": 4182,
    "source": {"kind": "clinician_programmer", "id": "PRG-1", "firmware": "1.0"},
    "model": "Prometra II",
    "reservoir": {"volume_ml": 17.42, "capacity_ml": 40, "low_alarm_ml": 2.0, "basis": "measured"},
    "drug": {"name": "baclofen", "concentration_mcg_per_ml": 2000},
    "infusion": {
        "mode": "flex",
        "rate_ml_per_day": 0.25,
        "daily_dose_mcg": 500,
        "schedule": [
            {"start": "00:00", "rate_ml_per_day": 0.2},
            {"start": "08:00", "rate_ml_per_day": 0.3},
            {"start": "23:59", "rate_ml_per_day": 0.25},
        ],
    },
    "flow": {"measured_ml_per_day": 0.248},
    "battery": {"remaining_pct": 71, "status": "eri"},
    "alarms": ["low_reservoir", "eri"],
}
REFILL: dict[str, Any] = {
    **COMMON,
    "seq": 12,
    "source": {"kind": "clinician_programmer", "id": "PRG-1", "firmware": "3.1"},
    "type": "refill",
    "refill": {
        "residual_ml": 2.1,
        "added_ml": 38,
        "drug": "baclofen",
        "concentration_mcg_per_ml": 2000,
        "expected_residual_ml": 2.4,
    },
}
MIN_REFILL: dict[str, Any] = {
    **COMMON,
    "type": "refill",
    "refill": {
        "residual_ml": 2.1,
        "added_ml": 38,
        "drug": "baclofen",
        "concentration_mcg_per_ml": 2000,
    },
}
PRESCRIPTION: dict[str, Any] = {
    **COMMON,
    "seq": 13,
    "source": {"kind": "clinician_programmer", "id": "PRG-1", "firmware": "3.1"},
    "type": "prescription_change",
    "infusion": {
        "mode": "flex",
        "rate_ml_per_day": 0.3,
        "daily_dose_mcg": 600,
        "schedule": [
            {"start": "07:00", "rate_ml_per_day": 0.4},
            {"start": "22:00", "rate_ml_per_day": 0.2},
        ],
    },
}
MIN_PRESCRIPTION: dict[str, Any] = {
    **COMMON,
    "type": "prescription_change",
    "infusion": {"mode": "continuous", "rate_ml_per_day": 0.3},
}
BOLUS: dict[str, Any] = {
    **COMMON,
    "seq": 14,
    "source": {"kind": "patient_programmer", "id": "PTM-9", "firmware": "1.2"},
    "type": "bolus",
    "bolus": {"dose_mcg": 50, "kind": "patient"},
}
MIN_BOLUS: dict[str, Any] = {
    **COMMON,
    "type": "bolus",
    "bolus": {"dose_mcg": 50, "kind": "clinician"},
}

CLAIM: dict[str, Any] = {
    **COMMON,
    "seq": 15,
    "source": {"kind": "clinician_programmer", "id": "PRG-1", "firmware": "3.1"},
    "type": "claim",
    "claim": {"code": "K7Q2M9", "expires_at": "2026-11-24T09:00:00+01:00"},
}

EVENTS: dict[str, dict[str, Any]] = {
    "refill": REFILL,
    "prescription_change": PRESCRIPTION,
    "bolus": BOLUS,
    "claim": CLAIM,
}
BODY: dict[str, str] = {
    "refill": "refill",
    "prescription_change": "infusion",
    "bolus": "bolus",
    "claim": "claim",
}

_DELETE = object()
_RAW = "\x01raw\x01"


def encode(doc: Any) -> bytes:
    return json.dumps(doc).encode()


Path = tuple[str | int, ...]


def parse_path(path: str) -> Path:
    """``"a.b[0].c"`` -> ``("a", "b", 0, "c")``."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"\.|\[|\]\.?", path) if p)


def changed(doc: dict[str, Any], path: str | Path, value: Any) -> dict[str, Any]:
    """A deep copy of ``doc`` with the field at ``path`` (``a.b[0].c``) set, or deleted."""
    parts = parse_path(path) if isinstance(path, str) else path
    result = copy.deepcopy(doc)
    node: Any = result
    for part in parts[:-1]:
        node = node[part]
    if value is _DELETE:
        del node[parts[-1]]
    else:
        node[parts[-1]] = value
    return result


def with_raw(doc: dict[str, Any], path: str, text: str | bytes) -> bytes:
    """``doc`` encoded, with ``text`` spliced in verbatim as the value at ``path``.

    For what ``json.dumps`` cannot write: NaN as the bare word, escapes of lone surrogates, huge
    numbers, bytes that are not UTF-8, broken JSON.
    """
    raw = encode(changed(doc, path, _RAW))
    marker = json.dumps(_RAW).encode()
    assert raw.count(marker) == 1
    return raw.replace(marker, text.encode() if isinstance(text, str) else text)


def nested(levels: int, opener: str = "[") -> str:
    """A JSON value of exactly ``levels`` nested containers, e.g. 2 -> [[]] or {"a":{}}."""
    if opener == "[":
        return "[" * levels + "]" * levels
    if opener == "{":
        return '{"a":' * (levels - 1) + "{}" + "}" * (levels - 1)
    # alternate: [{"a":[{"a":...}]}]
    text = "{}" if levels % 2 == 0 else "[]"
    for level in range(levels - 1, 0, -1):
        text = f'{{"a":{text}}}' if level % 2 == 0 else f"[{text}]"
    return text


def padded_to(size: int) -> bytes:
    """The minimal telemetry, padded with an unknown field to exactly ``size`` bytes."""
    base = encode({**MIN_TELEMETRY, "pad": ""})
    raw = base.replace(b'"pad": ""', b'"pad": "' + b"x" * (size - len(base)) + b'"')
    assert len(raw) == size
    return raw


# --------------------------------------------------------------------------------------------
# The corpus.


@dataclass(frozen=True)
class Case:
    id: str
    kind: Kind
    raw: bytes
    expect: Reason | None
    """The verdict the contract requires; None: accepted."""
    names: str = ""
    """What a rejection's detail must contain: the field's path or the problem."""


def _ok(id: str, doc: dict[str, Any], kind: Kind = "telemetry") -> Case:
    return Case(id, kind, encode(doc), None)


def _bad(
    id: str,
    doc: dict[str, Any] | bytes,
    names: str,
    kind: Kind = "telemetry",
    reason: Reason = SCHEMA,
) -> Case:
    return Case(id, kind, doc if isinstance(doc, bytes) else encode(doc), reason, names)


def _field_cases(
    prefix: str,
    kind: Kind,
    doc: dict[str, Any],
    path: str,
    *,
    good: list[tuple[str, Any]],
    bad: list[tuple[str, Any]],
) -> Iterator[Case]:
    for label, value in good:
        yield Case(f"{prefix}{path}={label}", kind, encode(changed(doc, path, value)), None)
    for label, value in bad:
        yield Case(f"{prefix}{path}={label}", kind, encode(changed(doc, path, value)), SCHEMA, path)


def _required(doc: dict[str, Any], kind: Kind, prefix: str, paths: list[str]) -> Iterator[Case]:
    for path in paths:
        field = path.rpartition(".")[2]
        yield _bad(f"{prefix}missing-{path}", changed(doc, path, _DELETE), field, kind)


NUMBER_WRONG_TYPES: list[tuple[str, Any]] = [
    ("string", "17.42"),
    ("true", True),
    ("false", False),
    ("null", None),
    ("array", [1]),
    ("object", {"value": 1}),
]
STRING_WRONG_TYPES: list[tuple[str, Any]] = [
    ("number", 1234),
    ("float", 1.5),
    ("true", True),
    ("null", None),
    ("array", ["a"]),
    ("object", {}),
]
OBJECT_WRONG_TYPES: list[tuple[str, Any]] = [
    ("number", 5),
    ("string", "x"),
    ("array", []),
    ("null", None),
    ("true", True),
]

NON_NEGATIVE_GOOD: list[tuple[str, Any]] = [
    ("0", 0),
    ("0.0", 0.0),
    ("-0.0", -0.0),
    ("tiny", 5e-324),
    ("int", 17),
    ("huge", 1e308),
    ("bigint", 10**30),
]
NON_NEGATIVE_BAD: list[tuple[str, Any]] = [
    ("-1", -1),
    ("-0.0001", -0.0001),
    ("-tiny", -5e-324),
    *NUMBER_WRONG_TYPES,
]
POSITIVE_GOOD: list[tuple[str, Any]] = [
    ("tiny", 5e-324),
    ("1", 1),
    ("40.5", 40.5),
    ("bigint", 10**30),
]
POSITIVE_BAD: list[tuple[str, Any]] = [
    ("0", 0),
    ("0.0", 0.0),
    ("-0.0", -0.0),
    ("-1", -1),
    *NUMBER_WRONG_TYPES,
]


def common_cases(prefix: str, kind: Kind, doc: dict[str, Any]) -> Iterator[Case]:
    """Fields every message has, on the given message."""
    yield from _required(doc, kind, prefix, ["v", "msg_id", "serial", "recorded_at"])
    yield from _field_cases(
        prefix,
        kind,
        doc,
        "v",
        good=[("1", 1), ("1.0", 1.0)],
        bad=[
            ("2", 2),
            ("0", 0),
            ("1.5", 1.5),
            ("string", "1"),
            ("true", True),
            ("null", None),
            ("bigint", 10**30),
        ],
    )
    yield from _field_cases(
        prefix,
        kind,
        doc,
        "seq",
        good=[("0", 0), ("5.0", 5.0), ("-0.0", -0.0), ("max", 2**63 - 1), ("1e18", 1e18)],
        bad=[
            ("5.5", 5.5),
            ("-1", -1),
            ("2**63", 2**63),
            ("2.0**63", 2.0**63),
            ("string", "5"),
            ("true", True),
            ("null", None),
            ("array", [5]),
        ],
    )
    yield from _field_cases(
        prefix,
        kind,
        doc,
        "msg_id",
        good=[
            ("lower", "3f0e8a52-5d4e-4c5b-9a57-0c7f1d2b9e11"),
            ("upper", "3F0E8A52-5D4E-4C5B-9A57-0C7F1D2B9E11"),
            ("nil", "00000000-0000-0000-0000-000000000000"),
        ],
        bad=[
            ("no-hyphens", "3f0e8a525d4e4c5b9a570c7f1d2b9e11"),
            ("braces", "{3f0e8a52-5d4e-4c5b-9a57-0c7f1d2b9e11}"),
            ("urn", "urn:uuid:3f0e8a52-5d4e-4c5b-9a57-0c7f1d2b9e11"),
            ("trailing-newline", "3f0e8a52-5d4e-4c5b-9a57-0c7f1d2b9e11\n"),
            ("leading-space", " 3f0e8a52-5d4e-4c5b-9a57-0c7f1d2b9e11"),
            ("short", "3f0e8a52-5d4e-4c5b-9a57-0c7f1d2b9e1"),
            ("non-hex", "3f0e8a52-5d4e-4c5b-9a57-0c7f1d2b9e1g"),
            ("arabic-digits", "3f0e8a52-5d4e-4c5b-9a57-0c7f1d2b9\u0661\u0661\u0661"),
            ("empty", ""),
            *STRING_WRONG_TYPES,
        ],
    )
    yield from _field_cases(
        prefix,
        kind,
        doc,
        "serial",
        good=[
            ("4-chars", "AB12"),
            ("32-chars", "A" * 32),
            ("hyphen", "NGP-2045"),
            ("digits", "1234"),
        ],
        bad=[
            ("3-chars", "AB1"),
            ("33-chars", "A" * 33),
            ("underscore", "NGP_2045"),
            ("arabic-digits", "\u0661\u0662\u0663\u0664"),
            ("fullwidth", "\uff2e\uff27\uff30\uff12\uff10\uff14\uff15"),
            ("space", "NGP 2045"),
            ("trailing-newline", "NGP2045\n"),
            ("empty", ""),
            *STRING_WRONG_TYPES,
        ],
    )
    yield from _field_cases(
        prefix,
        kind,
        doc,
        "recorded_at",
        good=[
            ("Z", "2026-11-24T08:30:00Z"),
            ("z", "2026-11-24T08:30:00z"),
            ("lowercase-t", "2026-11-24t08:30:00+01:00"),
            ("+01:00", "2026-11-24T08:30:00+01:00"),
            ("-00:00", "2026-11-24T08:30:00-00:00"),
            ("+23:59", "2026-11-24T08:30:00+23:59"),
            ("-23:59", "2026-11-24T08:30:00-23:59"),
            *((f"frac{n}", f"2026-11-24T08:30:00.{'123456789'[:n]}Z") for n in range(1, 10)),
            ("leap-day", "2024-02-29T12:00:00Z"),
            ("old", "1970-01-01T00:00:00Z"),
            ("year-1", "0001-01-01T00:00:00Z"),
            ("year-9999", "9999-12-31T23:59:59Z"),
        ],
        bad=[
            ("frac10", "2026-11-24T08:30:00.1234567891Z"),
            ("empty-frac", "2026-11-24T08:30:00.Z"),
            ("no-seconds", "2026-11-24T08:30Z"),
            ("no-offset", "2026-11-24T08:30:00"),
            ("space", "2026-11-24 08:30:00Z"),
            ("+0100", "2026-11-24T08:30:00+0100"),
            ("+01", "2026-11-24T08:30:00+01"),
            ("+24:00", "2026-11-24T08:30:00+24:00"),
            ("+01:60", "2026-11-24T08:30:00+01:60"),
            ("feb-30", "2026-02-30T08:30:00Z"),
            ("feb-29-non-leap", "2026-02-29T08:30:00Z"),
            ("apr-31", "2026-04-31T08:30:00Z"),
            ("month-13", "2026-13-01T08:30:00Z"),
            ("month-0", "2026-00-01T08:30:00Z"),
            ("day-0", "2026-11-00T08:30:00Z"),
            ("hour-24", "2026-11-24T24:00:00Z"),
            ("minute-60", "2026-11-24T08:60:00Z"),
            ("leap-second", "2016-12-31T23:59:60Z"),
            ("trailing-newline", "2026-11-24T08:30:00Z\n"),
            ("leading-space", " 2026-11-24T08:30:00Z"),
            ("year-0", "0000-01-01T00:00:00Z"),
            ("date-only", "2026-11-24"),
            ("unix-seconds", 1795505400),
            ("arabic-digits", "\u0662\u0660\u0662\u0666-11-24T08:30:00Z"),
            ("two-digit-year", "26-11-24T08:30:00Z"),
            ("empty", ""),
            *STRING_WRONG_TYPES,
        ],
    )
    yield from _field_cases(
        prefix,
        kind,
        doc,
        "source",
        good=[
            ("empty", {}),
            ("only-id", {"id": "X"}),
            ("unknown-field", {"kind": "home_hub", "colour": "red"}),
            *((k, {"kind": k}) for k in ("clinician_programmer", "patient_programmer", "home_hub")),
        ],
        bad=OBJECT_WRONG_TYPES,
    )
    if "source" in doc:
        yield from _field_cases(
            prefix,
            kind,
            doc,
            "source.kind",
            good=[],
            bad=[("hub", "hub"), ("HOME_HUB", "HOME_HUB"), ("null", None), ("number", 1)],
        )
        yield from _field_cases(
            prefix, kind, doc, "source.id", good=[("empty", "")], bad=STRING_WRONG_TYPES
        )
        yield from _field_cases(
            prefix, kind, doc, "source.firmware", good=[], bad=STRING_WRONG_TYPES
        )
    yield _ok(
        f"{prefix}unknown-top-level-fields", {**doc, "zz": {"a": [1, None, True]}, "n": None}, kind
    )


def infusion_cases(prefix: str, kind: Kind, doc: dict[str, Any]) -> Iterator[Case]:
    """``infusion`` as in telemetry and in prescription_change."""
    yield from _required(doc, kind, prefix, ["infusion.mode", "infusion.rate_ml_per_day"])
    yield from _field_cases(prefix, kind, doc, "infusion", good=[], bad=OBJECT_WRONG_TYPES)
    yield from _field_cases(
        prefix,
        kind,
        doc,
        "infusion.mode",
        good=[(m, m) for m in ("continuous", "flex", "periodic_bolus")],
        bad=[
            ("bolus", "bolus"),
            ("Continuous", "Continuous"),
            ("empty", ""),
            ("null", None),
            ("number", 1),
        ],
    )
    for field in ("rate_ml_per_day", "daily_dose_mcg"):
        yield from _field_cases(
            prefix, kind, doc, f"infusion.{field}", good=NON_NEGATIVE_GOOD, bad=NON_NEGATIVE_BAD
        )
    flex = changed(doc, "infusion.mode", "flex")
    steps = [{"start": "08:00", "rate_ml_per_day": 0.3}, {"start": "20:00", "rate_ml_per_day": 0.2}]
    flex = changed(flex, "infusion.schedule", steps)
    yield _ok(f"{prefix}schedule", flex, kind)
    yield from _field_cases(
        prefix,
        kind,
        flex,
        "infusion.schedule",
        good=[
            ("empty", []),
            ("unknown-step-field", [{"start": "08:00", "rate_ml_per_day": 0.3, "note": "x"}]),
        ],
        bad=[
            ("object", {"start": "08:00", "rate_ml_per_day": 0.3}),
            ("null", None),
            ("string", "08:00"),
            ("step-number", [1]),
            ("step-null", [None]),
        ],
    )
    yield from _field_cases(
        prefix,
        kind,
        flex,
        "infusion.schedule[1].start",
        good=[("00:00", "00:00"), ("23:59", "23:59"), ("19:09", "19:09")],
        bad=[
            ("8:00", "8:00"),
            ("24:00", "24:00"),
            ("08:60", "08:60"),
            ("08:00:00", "08:00:00"),
            ("0800", "0800"),
            ("trailing-newline", "08:00\n"),
            ("arabic-digits", "\u0660\u0668:\u0660\u0660"),
            ("empty", ""),
            *STRING_WRONG_TYPES,
        ],
    )
    yield from _field_cases(
        prefix,
        kind,
        flex,
        "infusion.schedule[1].rate_ml_per_day",
        good=NON_NEGATIVE_GOOD,
        bad=NON_NEGATIVE_BAD,
    )
    yield from _required(
        flex, kind, prefix, ["infusion.schedule[0].start", "infusion.schedule[1].rate_ml_per_day"]
    )
    yield _ok(f"{prefix}infusion-unknown-field", changed(doc, "infusion.pattern", "daytime"), kind)


def telemetry_cases() -> Iterator[Case]:
    t: Kind = "telemetry"
    yield Case("telemetry-contract-example", t, TELEMETRY_EXAMPLE, None)
    yield _ok("telemetry-minimal", MIN_TELEMETRY)
    yield _ok("telemetry-every-optional-field", FULL_TELEMETRY)
    yield _ok(
        "telemetry-unknown-fields-everywhere",
        {
            **FULL_TELEMETRY,
            "firmware_build": "x",
            "ext": {"deep": [[{"k": "v"}]]},
            "reservoir": {**FULL_TELEMETRY["reservoir"], "temperature_c": 37.1},
            "drug": {**FULL_TELEMETRY["drug"], "lot": "A1"},
            "battery": {**FULL_TELEMETRY["battery"], "voltage": 3.1},
            "flow": {**FULL_TELEMETRY["flow"], "window_h": 24},
        },
    )
    yield _ok("telemetry-is-also-an-event-with-type", {**MIN_TELEMETRY, "type": "refill"})
    yield from common_cases("telemetry:", t, FULL_TELEMETRY)
    yield from common_cases("telemetry-minimal:", t, MIN_TELEMETRY)
    yield from _required(
        MIN_TELEMETRY,
        t,
        "telemetry-minimal:",
        [
            "reservoir",
            "drug",
            "infusion",
            "reservoir.volume_ml",
            "reservoir.capacity_ml",
            "drug.name",
            "drug.concentration_mcg_per_ml",
        ],
    )
    for path in ("reservoir", "drug", "flow", "battery"):
        yield from _field_cases(
            "telemetry:",
            t,
            FULL_TELEMETRY,
            path,
            good=[("empty", {})] if path in ("flow", "battery") else [],
            bad=OBJECT_WRONG_TYPES,
        )
    for path in ("reservoir.volume_ml", "reservoir.low_alarm_ml", "flow.measured_ml_per_day"):
        yield from _field_cases(
            "telemetry:", t, FULL_TELEMETRY, path, good=NON_NEGATIVE_GOOD, bad=NON_NEGATIVE_BAD
        )
    for path in ("reservoir.capacity_ml", "drug.concentration_mcg_per_ml"):
        yield from _field_cases(
            "telemetry:", t, FULL_TELEMETRY, path, good=POSITIVE_GOOD, bad=POSITIVE_BAD
        )
    yield from _field_cases(
        "telemetry:",
        t,
        FULL_TELEMETRY,
        "battery.remaining_pct",
        good=[("0", 0), ("100", 100), ("100.0", 100.0), ("99.9999", 99.9999), ("-0.0", -0.0)],
        bad=[("100.0001", 100.0001), ("101", 101), ("-0.0001", -0.0001), *NUMBER_WRONG_TYPES],
    )
    yield from _field_cases(
        "telemetry:",
        t,
        FULL_TELEMETRY,
        "battery.status",
        good=[(s, s) for s in ("ok", "eri", "eos")],
        bad=[("OK", "OK"), ("low", "low"), ("null", None), ("number", 1)],
    )
    yield from _field_cases(
        "telemetry:",
        t,
        FULL_TELEMETRY,
        "reservoir.basis",
        good=[(b, b) for b in ("measured", "calculated")],
        bad=[("estimated", "estimated"), ("Measured", "Measured"), ("null", None), ("true", True)],
    )
    for path in ("drug.name", "model"):
        yield from _field_cases(
            "telemetry:",
            t,
            FULL_TELEMETRY,
            path,
            good=[
                ("empty", ""),
                ("unicode", "baclofène µg"),
                ("emoji", "💊"),
                ("nonchar", "\uffff"),
            ],
            bad=STRING_WRONG_TYPES,
        )
    known = [
        "low_reservoir",
        "empty_reservoir",
        "motor_stall",
        "motor_stall_recovered",
        "eri",
        "eos",
        "pump_memory_error",
        "critical_memory_error",
        "catheter_occlusion",
        "valve_closed",
        "critical_pump_fault",
    ]
    yield from _field_cases(
        "telemetry:",
        t,
        FULL_TELEMETRY,
        "alarms",
        good=[
            ("empty", []),
            ("all-known", known),
            ("unknown-code", ["flux_capacitor_low"]),
            ("empty-code", [""]),
            ("repeated", ["eri", "eri"]),
        ],
        bad=[
            ("string", "low_reservoir"),
            ("number-item", [1]),
            ("null-item", [None]),
            ("object-item", [{"code": "eri"}]),
            ("null", None),
            ("object", {}),
        ],
    )
    yield from infusion_cases("telemetry:", t, FULL_TELEMETRY)
    # Pretty-printed, surrounded by whitespace: still the same message.
    yield Case(
        "telemetry-whitespace",
        t,
        b" \t\r\n" + json.dumps(FULL_TELEMETRY, indent=2).encode() + b"\n",
        None,
    )
    yield Case(
        "telemetry-non-ascii-unescaped",
        t,
        json.dumps({**MIN_TELEMETRY, "model": "Präzision 🙂"}, ensure_ascii=False).encode(),
        None,
    )
    yield Case(
        "telemetry-surrogate-pair-escape",
        t,
        with_raw(MIN_TELEMETRY, "model", r'"\ud83d\ude00"'),
        None,
    )
    yield Case(
        "telemetry-numbers-with-exponents",
        t,
        with_raw(MIN_TELEMETRY, "reservoir.volume_ml", "1.742E1"),
        None,
    )
    yield Case("telemetry-seq-1e2", t, with_raw(MIN_TELEMETRY, "seq", "1e2"), None)
    yield Case("telemetry-v-10e-1", t, with_raw(MIN_TELEMETRY, "v", "10e-1"), None)
    # 1e-400 is read as the double 0.0 on both sides: fine for a volume, not for a capacity.
    yield Case(
        "telemetry-volume-1e-400", t, with_raw(MIN_TELEMETRY, "reservoir.volume_ml", "1e-400"), None
    )
    yield Case(
        "telemetry-capacity-1e-400",
        t,
        with_raw(MIN_TELEMETRY, "reservoir.capacity_ml", "1e-400"),
        SCHEMA,
        "reservoir.capacity_ml",
    )
    yield Case(
        "telemetry-null-required-volume",
        t,
        encode(changed(MIN_TELEMETRY, "reservoir.volume_ml", None)),
        SCHEMA,
        "reservoir.volume_ml",
    )
    # Keys that look alike but differ are not duplicates.
    yield Case(
        "telemetry-similar-keys",
        t,
        encode({**MIN_TELEMETRY, "a": 1, "A": 2, "a ": 3, "a\\": 4}),
        None,
    )
    yield Case(
        "telemetry-tricky-strings",
        t,
        encode({**MIN_TELEMETRY, "model": 'a\\": "b', 'k\\"': '":', "x": "\\"}),
        None,
    )


def event_cases() -> Iterator[Case]:
    e: Kind = "events"
    for name, doc in EVENTS.items():
        yield _ok(f"{name}-example", doc, e)
        yield from common_cases(f"{name}:", e, doc)
        yield _bad(f"{name}-missing-body", changed(doc, BODY[name], _DELETE), BODY[name], e)
        yield _bad(f"{name}-missing-type", changed(doc, "type", _DELETE), "type", e)
        yield _ok(
            f"{name}-with-other-bodies-too",
            {**REFILL, **BOLUS, **PRESCRIPTION, **CLAIM, "type": name},
            e,
        )
        yield _ok(f"{name}-with-telemetry-fields", {**FULL_TELEMETRY, **doc}, e)
        yield _bad(f"{name}-on-the-telemetry-topic", doc, "reservoir")
    for name, doc in (
        ("refill", MIN_REFILL),
        ("prescription_change", MIN_PRESCRIPTION),
        ("bolus", MIN_BOLUS),
    ):
        yield _ok(f"{name}-minimal", doc, e)
    yield from _field_cases(
        "event:",
        e,
        REFILL,
        "type",
        good=[],
        bad=[
            ("unknown", "calibration"),
            ("Refill", "Refill"),
            ("empty", ""),
            ("null", None),
            ("number", 1),
            ("array", ["refill"]),
        ],
    )
    yield _bad(
        "event-only-other-body", {**COMMON, "type": "bolus", "refill": REFILL["refill"]}, "bolus", e
    )
    yield _bad("telemetry-on-the-events-topic", FULL_TELEMETRY, "type", e)
    # refill
    yield from _required(
        REFILL,
        e,
        "refill:",
        ["refill.residual_ml", "refill.added_ml", "refill.drug", "refill.concentration_mcg_per_ml"],
    )
    yield from _field_cases(
        "refill:",
        e,
        REFILL,
        "refill",
        good=[("unknown-field", {**REFILL["refill"], "lot": "A1"})],
        bad=OBJECT_WRONG_TYPES,
    )
    for path in ("refill.residual_ml", "refill.expected_residual_ml"):
        yield from _field_cases(
            "refill:", e, REFILL, path, good=NON_NEGATIVE_GOOD, bad=NON_NEGATIVE_BAD
        )
    for path in ("refill.added_ml", "refill.concentration_mcg_per_ml"):
        yield from _field_cases("refill:", e, REFILL, path, good=POSITIVE_GOOD, bad=POSITIVE_BAD)
    yield from _field_cases(
        "refill:", e, REFILL, "refill.drug", good=[("empty", "")], bad=STRING_WRONG_TYPES
    )
    # prescription_change
    yield from infusion_cases("prescription_change:", e, PRESCRIPTION)
    # claim
    yield from _required(CLAIM, e, "claim:", ["claim.code", "claim.expires_at"])
    yield from _field_cases(
        "claim:",
        e,
        CLAIM,
        "claim",
        good=[("unknown-field", {**CLAIM["claim"], "screen": "interrogation"})],
        bad=OBJECT_WRONG_TYPES,
    )
    yield from _field_cases(
        "claim:",
        e,
        CLAIM,
        "claim.code",
        good=[("6", "A1B2C3"), ("12", "ABCDEF123456"), ("lower", "k7q2m9")],
        bad=[
            ("5", "A1B2C"),
            ("13", "ABCDEF1234567"),
            ("dash", "K7Q-2M9"),
            ("space", "K7Q 2M9"),
            ("newline", "K7Q2M9\n"),
            ("non-ascii-digit", "K7Q2M\u0669"),
            *STRING_WRONG_TYPES,
        ],
    )
    yield from _field_cases(
        "claim:",
        e,
        CLAIM,
        "claim.expires_at",
        good=[("utc", "2026-11-24T08:00:00Z")],
        bad=[("no-offset", "2026-11-24T09:00:00"), ("date", "2026-11-24"), *STRING_WRONG_TYPES],
    )
    # bolus
    yield from _required(BOLUS, e, "bolus:", ["bolus.dose_mcg", "bolus.kind"])
    yield from _field_cases(
        "bolus:",
        e,
        BOLUS,
        "bolus",
        good=[("unknown-field", {**BOLUS["bolus"], "lockout_min": 60})],
        bad=OBJECT_WRONG_TYPES,
    )
    yield from _field_cases(
        "bolus:", e, BOLUS, "bolus.dose_mcg", good=POSITIVE_GOOD, bad=POSITIVE_BAD
    )
    yield from _field_cases(
        "bolus:",
        e,
        BOLUS,
        "bolus.kind",
        good=[("clinician", "clinician"), ("patient", "patient")],
        bad=[("nurse", "nurse"), ("Patient", "Patient"), ("null", None), ("number", 1)],
    )


_HALFWAY = str(2**1024 - 2**970)
"""Exactly halfway between the largest double and 2**1024: rounds (to even) to infinity."""


def never_valid_cases() -> Iterator[Case]:
    """The contract's "Values that are never valid"."""
    t: Kind = "telemetry"
    doc = MIN_TELEMETRY
    for label, text, names in [
        ("NaN", "NaN", "NaN is not a JSON number (byte "),
        ("Infinity", "Infinity", "Infinity is not a JSON number (byte "),
        ("-Infinity", "-Infinity", "Infinity is not a JSON number (byte "),
        ("1e400", "1e400", "overflows a double"),
        ("-1e400", "-1e400", "overflows a double"),
        ("1.8e308", "1.7976931348623159e308", "overflows a double"),
        ("halfway-float", _HALFWAY + ".0", "overflows a double"),
        ("halfway-int", _HALFWAY, "overflows a double"),
        ("-halfway-int", "-" + _HALFWAY, "overflows a double"),
        ("400-digit-int", "9" * 400, "overflows a double"),
        ("-400-digit-int", "-" + "9" * 400, "overflows a double"),
        ("5000-digit-int", "1" * 5000, "overflows a double"),
    ]:
        for path in ("reservoir.volume_ml", "unknown", "seq"):
            yield Case(f"{label}-in-{path}", t, with_raw(doc, path, text), INVALID, names)
    # The largest values that still round to a finite double are numbers like any other.
    yield Case(
        "max-double", t, with_raw(doc, "reservoir.volume_ml", "1.7976931348623157e308"), None
    )
    yield Case(
        "rounds-to-max-double",
        t,
        with_raw(doc, "reservoir.volume_ml", "1.7976931348623158e308"),
        None,
    )
    yield Case(
        "int-below-halfway",
        t,
        with_raw(doc, "reservoir.volume_ml", str(2**1024 - 2**970 - 1)),
        None,
    )
    yield Case("int-above-max-double", t, with_raw(doc, "unknown", str(2**1024 - 2**971 + 1)), None)
    for label, text, names in [
        ("nul-in-value", r'"a\u0000b"', "NUL"),
        ("nul-alone", r'"\u0000"', "NUL"),
        ("lone-high-surrogate", r'"\ud800"', "surrogate"),
        ("lone-high-surrogate-uppercase", r'"\uD800x"', "surrogate"),
        ("lone-low-surrogate", r'"\udc00"', "surrogate"),
        ("reversed-pair", r'"\ude00\ud83d"', "surrogate"),
        ("high-then-bmp-escape", r'"\ud800\u0041"', "surrogate"),
        ("high-then-high", r'"\ud800\ud800"', "surrogate"),
        ("nul-in-array", r'["eri", "\u0000"]', "NUL"),
        ("surrogate-in-array", r'["eri", "\udfff"]', "surrogate"),
    ]:
        for path in ("model", "unknown", "serial", "alarms"):
            yield Case(f"{label}-in-{path}", t, with_raw(doc, path, text), INVALID, names)
    for label, key, names in [
        ("nul-in-key", r'"a\u0000"', "NUL"),
        ("surrogate-in-key", r'"\ud800"', "surrogate"),
        ("low-surrogate-in-key", r'"k\udc00"', "surrogate"),
    ]:
        raw = encode({**doc, "placeholder": 1}).replace(b'"placeholder"', key.encode())
        yield Case(f"{label}-top-level", t, raw, INVALID, names)
        nested_raw = encode(changed(doc, "reservoir.placeholder", 1)).replace(
            b'"placeholder"', key.encode()
        )
        yield Case(f"{label}-nested", t, nested_raw, INVALID, names)
    # Nesting: the top-level object is level 1, so a value inside it starts at level 2.
    for opener, label in (("[", "arrays"), ("{", "objects"), ("mixed", "mixed")):
        yield Case(
            f"depth-32-{label}", t, with_raw(doc, "unknown", nested(LIMIT_DEPTH - 1, opener)), None
        )
        yield Case(
            f"depth-33-{label}",
            t,
            with_raw(doc, "unknown", nested(LIMIT_DEPTH, opener)),
            INVALID,
            "nesting deeper than 32",
        )
        yield Case(
            f"depth-33-{label}-in-reservoir",
            t,
            with_raw(doc, "reservoir.unknown", nested(LIMIT_DEPTH - 1, opener)),
            INVALID,
            "nesting deeper than 32",
        )
        yield Case(
            f"depth-32-{label}-in-reservoir",
            t,
            with_raw(doc, "reservoir.unknown", nested(LIMIT_DEPTH - 2, opener)),
            None,
        )
    yield Case(
        "depth-30000",
        t,
        with_raw(doc, "unknown", nested(30_000)),
        INVALID,
        "nesting deeper than 32",
    )
    yield Case(
        "depth-33-top-level-array",
        t,
        nested(LIMIT_DEPTH + 1).encode(),
        INVALID,
        "nesting deeper than 32",
    )
    yield Case("depth-32-top-level-array", t, nested(LIMIT_DEPTH).encode(), SCHEMA, "not an object")
    # Duplicate keys.
    top = encode(doc)[:-1]
    yield Case(
        "duplicate-top-level-same-value",
        t,
        top + b', "serial": "NGP204519H"}',
        INVALID,
        "duplicate key 'serial'",
    )
    yield Case(
        "duplicate-top-level-other-value", t, top + b', "v": 2}', INVALID, "duplicate key 'v'"
    )
    yield Case("duplicate-unknown-key", t, top + b', "x": 1, "x": 1}', INVALID, "duplicate key 'x'")
    yield Case(
        "duplicate-escaped-spelling",
        t,
        top + b', "x": 1, "\\u0078": 1}',
        INVALID,
        "duplicate key 'x'",
    )
    yield Case(
        "duplicate-key-ending-in-backslash",
        t,
        top + b', "x\\\\": 1, "x\\\\": 1}',
        INVALID,
        "duplicate key",
    )
    yield Case(
        "duplicate-spaced-colon", t, top + b', "x" \n : 1, "x"\t:1}', INVALID, "duplicate key 'x'"
    )
    yield Case(
        "duplicate-nested",
        t,
        encode(doc).replace(b'"volume_ml": 17.42', b'"volume_ml": 17.42, "volume_ml": 1'),
        INVALID,
        "duplicate key 'volume_ml'",
    )
    yield Case(
        "duplicate-in-schedule-step",
        t,
        with_raw(
            doc, "infusion.schedule", '[{"start": "08:00", "start": "09:00", "rate_ml_per_day": 1}]'
        ),
        INVALID,
        "duplicate key 'start'",
    )
    yield Case(
        "duplicate-deep-in-unknown",
        t,
        with_raw(doc, "unknown", '[[{"a": {"b": 1, "b": 1}}]]'),
        INVALID,
        "duplicate key 'b'",
    )
    # Not an object: well-formed JSON of the wrong shape is a schema matter ...
    for label, text in [
        ("array", "[]"),
        ("array-of-message", "[" + encode(doc).decode() + "]"),
        ("string", '"x"'),
        ("number", "1"),
        ("float", "-1.5"),
        ("null", "null"),
        ("true", "true"),
        ("false", "false"),
        ("json-in-a-string", json.dumps(encode(doc).decode())),
    ]:
        yield Case(f"not-an-object-{label}", t, text.encode(), SCHEMA, "not an object")
        yield Case(f"not-an-object-{label}-event", "events", text.encode(), SCHEMA, "not an object")
    # ... unless it holds a never-valid value, which is reported first, as for an object.
    for label, text, names in [
        ("nul-string", r'"\u0000"', "NUL"),
        ("nul-in-array", r'["\u0000"]', "NUL"),
        ("lone-surrogate", r'"\ud800"', "surrogate"),
        ("overflowing-int", "9" * 400, "overflows a double"),
        ("overflowing-float", "1e400", "overflows a double"),
        ("NaN", "NaN", "NaN is not a JSON number (byte 0)"),
        ("duplicate-in-array", '[{"a": 1, "a": 2}]', "duplicate key 'a'"),
    ]:
        yield Case(f"not-an-object-{label}", t, text.encode(), INVALID, names)
    # The same on the events topic, inside the bodies.
    e: Kind = "events"
    for label, event, path, text, names in [
        ("NaN-in-refill", REFILL, "refill.added_ml", "NaN", "NaN is not a JSON number"),
        ("1e400-in-bolus", BOLUS, "bolus.dose_mcg", "1e400", "overflows a double"),
        ("nul-in-bolus-kind", BOLUS, "bolus.kind", r'"patient\u0000"', "NUL"),
        ("surrogate-in-refill-drug", REFILL, "refill.drug", r'"\udbff"', "surrogate"),
        ("depth-33-in-infusion", PRESCRIPTION, "infusion.x", nested(31), "nesting deeper"),
        ("duplicate-in-refill", REFILL, "refill", '{"drug": "a", "drug": "a"}', "'drug'"),
    ]:
        yield Case(f"event-{label}", e, with_raw(event, path, text), INVALID, names)
    yield Case(
        "event-depth-32-in-infusion", e, with_raw(PRESCRIPTION, "infusion.x", nested(30)), None
    )


def not_json_cases() -> Iterator[Case]:
    """Bytes that are not UTF-8, not JSON, or too many."""
    t: Kind = "telemetry"
    doc = MIN_TELEMETRY
    good = encode(doc)
    for label, bad_bytes in [
        ("ff", b"\xff"),
        ("overlong-slash", b"\xc0\xaf"),
        ("encoded-surrogate", b"\xed\xa0\x80"),
        ("truncated-sequence", b"\xe2\x82"),
        ("lone-continuation", b"\x80"),
        ("beyond-u10ffff", b"\xf4\x90\x80\x80"),
        ("five-byte", b"\xf8\x88\x80\x80\x80"),
        ("latin-1-e-acute", b"\xe9"),
    ]:
        in_string = with_raw(doc, "model", b'"a' + bad_bytes + b'"')
        in_key = good[:-1] + b', "k' + bad_bytes + b'": 1}'
        for where, raw in (("string", in_string), ("key", in_key)):
            at = raw.index(bad_bytes)
            yield Case(f"utf8-{label}-in-{where}", t, raw, INVALID, f"UTF-8 (byte {at})")
    yield Case("utf8-bom", t, b"\xef\xbb\xbf" + good, INVALID, "malformed")
    yield Case("utf16", t, json.dumps(doc).encode("utf-16"), INVALID, "malformed")
    yield Case("utf16-le-no-bom", t, json.dumps(doc).encode("utf-16-le"), INVALID, "malformed")
    # Truncated, empty, and otherwise not JSON.
    yield Case("empty", t, b"", INVALID, "empty")
    yield Case("whitespace-only", t, b" \r\n\t", INVALID, "empty")
    for cut in (1, 2, 10, 40, len(good) // 2, len(good) - 2, len(good) - 1):
        yield Case(f"truncated-at-{cut}", t, good[:cut], INVALID, "truncated")
    yield Case("truncated-in-escape", t, b'{"model": "\\u00', INVALID, "truncated")
    yield Case("truncated-after-high-surrogate", t, b'{"model": "\\ud83d', INVALID, "truncated")
    for label, raw in [
        ("single-quotes", good.replace(b'"', b"'")),
        ("trailing-comma", good[:-1] + b",}"),
        ("comment", good[:-1] + b" /* x */}"),
        ("unquoted-key", good[:-1] + b", x: 1}"),
        ("leading-zero", with_raw(doc, "seq", "01")),
        ("plus-sign", with_raw(doc, "seq", "+1")),
        ("bare-fraction", with_raw(doc, "reservoir.volume_ml", ".5")),
        ("trailing-dot", with_raw(doc, "reservoir.volume_ml", "1.")),
        ("hex", with_raw(doc, "seq", "0x10")),
        ("lowercase-nan", with_raw(doc, "unknown", "nan")),
        ("raw-tab-in-string", with_raw(doc, "model", '"a\tb"')),
        ("raw-newline-in-string", with_raw(doc, "model", '"a\nb"')),
        ("raw-nul-byte-in-string", with_raw(doc, "model", '"a\x00b"')),
        ("bad-escape", with_raw(doc, "model", r'"\x41"')),
        ("two-objects", good + good),
        ("trailing-garbage", good + b"x"),
        ("nul-byte-after", good + b"\x00"),
    ]:
        yield Case(f"not-json-{label}", t, raw, INVALID, "JSON is malformed")
    # Size: at most 65536 bytes, judged before anything else.
    yield Case("size-65536", t, padded_to(LIMIT_BYTES), None)
    yield Case("size-65537", t, padded_to(LIMIT_BYTES + 1), Reason.TOO_LARGE, "limit 65536")
    yield Case(
        "size-65537-garbage", t, b"\xff" * (LIMIT_BYTES + 1), Reason.TOO_LARGE, "65537 bytes"
    )
    yield Case("size-1MiB-deep", t, b"[" * (1 << 20), Reason.TOO_LARGE, "limit 65536")


CORPUS: list[Case] = [
    *telemetry_cases(),
    *event_cases(),
    *never_valid_cases(),
    *not_json_cases(),
]


def test_corpus_ids_are_unique_and_every_verdict_is_represented() -> None:
    ids = [case.id for case in CORPUS]
    assert len(ids) == len(set(ids)), {i for i in ids if ids.count(i) > 1}
    verdicts = {case.expect for case in CORPUS}
    assert verdicts == {None, SCHEMA, INVALID, Reason.TOO_LARGE}


@pytest.mark.parametrize("case", CORPUS, ids=[case.id for case in CORPUS])
def test_schema_and_decoder_give_the_contracts_verdict(case: Case) -> None:
    ref = reference(case.kind, case.raw)
    dec = decoder(case.kind, case.raw)
    assert ref.reason == case.expect, f"reference: {ref}"
    assert dec.reason == case.expect, f"decoder: {dec}"
    if case.expect is None:
        return
    assert case.names in dec.detail
    assert dec.detail.strip()
    if case.expect is SCHEMA:
        # The decoder names a field the schema also objects to.
        assert detail_path(dec.detail) in ref.paths, (dec.detail, ref.paths)


def test_the_schema_document_is_valid_and_spells_the_decoders_patterns() -> None:
    Draft202012Validator.check_schema(DOCUMENT)
    defs = DOCUMENT["$defs"]
    assert defs["serial"]["pattern"] == contract.SERIAL_PATTERN
    assert defs["msg_id"]["pattern"] == contract.UUID_PATTERN
    assert defs["timestamp"]["pattern"] == contract.TIMESTAMP_PATTERN
    step = defs["infusion"]["properties"]["schedule"]["items"]["properties"]["start"]
    assert step["pattern"] == contract.CLOCK_PATTERN
    assert (contract.MAX_PAYLOAD_BYTES, contract.MAX_DEPTH) == (LIMIT_BYTES, LIMIT_DEPTH)


def test_the_top_level_anyof_takes_every_kind_of_message() -> None:
    whole = Draft202012Validator(DOCUMENT, format_checker=_FORMATS)
    for doc in (MIN_TELEMETRY, FULL_TELEMETRY, *EVENTS.values()):
        assert whole.is_valid(doc)
    assert not whole.is_valid(changed(MIN_TELEMETRY, "reservoir", _DELETE))


def test_integral_floats_are_integers_and_the_sequence_an_int() -> None:
    message = contract.decode("telemetry", encode({**MIN_TELEMETRY, "v": 1.0, "seq": 5.0}))
    assert message.sequence == 5
    assert type(message.sequence) is int
    assert contract.decode("telemetry", encode(MIN_TELEMETRY)).sequence is None


def test_decoded_events_have_their_type_and_source() -> None:
    refill = contract.decode("events", encode(REFILL))
    assert isinstance(refill, contract.RefillEvent)
    assert refill.refill.expected_residual_ml == 2.4
    assert (refill.source_kind, refill.source_id) == ("clinician_programmer", "PRG-1")
    assert isinstance(
        contract.decode("events", encode(PRESCRIPTION)), contract.PrescriptionChangeEvent
    )
    bolus = contract.decode("events", encode(MIN_BOLUS))
    assert isinstance(bolus, contract.BolusEvent)
    assert (bolus.source_kind, bolus.source_id, bolus.sequence) == (None, None, None)


# --------------------------------------------------------------------------------------------
# Generated: mutations of valid messages, judged the same way by both sides.

_ENUMS = [
    "clinician_programmer",
    "patient_programmer",
    "home_hub",
    "measured",
    "calculated",
    "continuous",
    "flex",
    "periodic_bolus",
    "ok",
    "eri",
    "eos",
    "refill",
    "prescription_change",
    "bolus",
    "clinician",
    "patient",
    "low_reservoir",
]
_NUMBERS = [0, -0.0, 0.0, 1, 1.0, -1, 5.5, 100, 100.0001, 2**63 - 1, 2**63, 2.0**63, 5e-324, 1e308]
_STRINGS = ["", "\x00", "\ud800", "\udc00", "a\x00", "08:00", "24:00", "NGP204519H", "ABC"]

timestamps = st.from_regex(
    r"[0-9]{4}-[01][0-9]-[0-3][0-9][Tt ][0-2][0-9]:[0-6][0-9](:[0-6][0-9](\.[0-9]{0,10})?)?"
    r"([Zz]|[+-][0-2][0-9]:?[0-6][0-9]|[+-][0-9]{2})?\n?",
    fullmatch=True,
)
serials = st.from_regex(r"[A-Za-z0-9_\- \n\u0660-\u0669]{0,34}", fullmatch=True)
uuids = st.from_regex(
    r"\{?[0-9a-fA-Fg]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}\}?\n?",
    fullmatch=True,
)
clocks = st.from_regex(r"[0-9]{1,3}:[0-9]{1,3}(:[0-9]{2})?\n?", fullmatch=True)
_plain_text = st.text(st.characters(exclude_characters="\x00"), max_size=12)
numbers: st.SearchStrategy[Any] = st.one_of(
    st.integers(min_value=-10, max_value=10**6),
    st.floats(min_value=-1, max_value=1e6),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(_NUMBERS),
)
plain: st.SearchStrategy[Any] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**64), max_value=2**64),
    numbers,
    _plain_text,
    st.sampled_from(_ENUMS),
)
never_valid_ish: st.SearchStrategy[Any] = st.one_of(
    st.integers(min_value=-(2**1030), max_value=2**1030),
    st.floats(),  # NaN and infinities included: json.dumps writes them, both sides refuse them
    st.text(max_size=12),  # NUL included
    st.sampled_from(_STRINGS),
)
json_values: st.SearchStrategy[Any] = st.recursive(
    st.one_of(plain, plain, plain, never_valid_ish),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


def _like(value: Any) -> st.SearchStrategy[Any]:
    """Values of the same JSON type as ``value``, near the interesting boundaries."""
    if isinstance(value, bool) or value is None:
        return st.booleans()
    if isinstance(value, int | float):
        return numbers
    if isinstance(value, str):
        return st.sampled_from(_ENUMS) | _plain_text
    return json_values


_BY_FIELD: dict[str, st.SearchStrategy[Any]] = {
    "recorded_at": timestamps,
    "serial": serials,
    "msg_id": uuids,
    "start": clocks,
}


def _paths(node: Any, prefix: Path = ()) -> Iterator[Path]:
    """Every field and array item below ``node``."""
    if isinstance(node, dict):
        items: list[tuple[str | int, Any]] = list(node.items())
    elif isinstance(node, list):
        items = list(enumerate(node))
    else:
        items = []
    for key, child in items:
        yield (*prefix, key)
        yield from _paths(child, (*prefix, key))


def _get(node: Any, path: Path) -> Any:
    for part in path:
        node = node[part]
    return node


@st.composite
def mutated(draw: st.DrawFn) -> tuple[Kind, bytes]:
    """A valid message with 1 to 3 fields set to other values, deleted or added."""
    kind: Kind = draw(st.sampled_from(["telemetry", "events"]))
    if kind == "telemetry":
        base = draw(st.sampled_from([FULL_TELEMETRY, MIN_TELEMETRY]))
    else:
        base = draw(st.sampled_from([*EVENTS.values(), MIN_REFILL, MIN_PRESCRIPTION, MIN_BOLUS]))
    doc = copy.deepcopy(base)
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        action = draw(st.sampled_from(["set", "set", "set", "delete", "add"]))
        paths = sorted(_paths(doc), key=repr)
        if action == "add" or not paths:
            objects = [(), *(p for p in paths if isinstance(_get(doc, p), dict))]
            where = draw(st.sampled_from(objects))
            key = draw(st.text(max_size=8) | st.sampled_from(["type", "seq", "refill", "bolus"]))
            doc = changed(doc, (*where, key), draw(json_values))
            continue
        path = draw(st.sampled_from(paths))
        if action == "delete":
            doc = changed(doc, path, _DELETE)
            continue
        special = _BY_FIELD.get(str(path[-1]), _like(_get(doc, path)))
        value = draw(special | json_values)
        doc = changed(doc, path, value)
    raw = json.dumps(doc, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    if doc and draw(st.sampled_from(range(12))) == 5:
        # Repeat one top-level member: a duplicate key.
        key = draw(st.sampled_from(sorted(doc)))
        raw = raw[:-1] + b", " + json.dumps({key: doc[key]}).encode()[1:]
    return kind, raw


_GENERATED = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@settings(_GENERATED, max_examples=600)
@given(mutated())
def test_schema_and_decoder_agree_on_mutated_messages(message: tuple[Kind, bytes]) -> None:
    assert_agree(*message)


_JSON_BYTES = [*b'{}[]",:\\0123456789.-+eEtrufalsn ', 0x00, 0x0A, 0x80, 0xC3, 0xED, 0xFF]


@st.composite
def corrupted(draw: st.DrawFn) -> tuple[Kind, bytes]:
    """A valid message with 1 to 3 bytes replaced, inserted or deleted."""
    kind: Kind = draw(st.sampled_from(["telemetry", "events"]))
    doc = FULL_TELEMETRY if kind == "telemetry" else draw(st.sampled_from(list(EVENTS.values())))
    raw = bytearray(encode(doc))
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        at = draw(st.integers(min_value=0, max_value=len(raw) - 1))
        byte = draw(st.sampled_from(_JSON_BYTES) | st.integers(min_value=0, max_value=255))
        action = draw(st.sampled_from(["replace", "insert", "delete"]))
        if action == "replace":
            raw[at] = byte
        elif action == "insert":
            raw.insert(at, byte)
        else:
            del raw[at]
    return kind, bytes(raw)


@settings(_GENERATED, max_examples=300)
@given(corrupted())
def test_schema_and_decoder_agree_on_corrupted_bytes(message: tuple[Kind, bytes]) -> None:
    assert_agree(*message)


# --------------------------------------------------------------------------------------------
# check(): the rules beyond the schema, at their boundaries.

NOW = datetime(2026, 11, 24, 7, 30, tzinfo=UTC)
MAX_FUTURE = timedelta(minutes=5)
OLDEST = datetime(2000, 1, 1, tzinfo=UTC)


def _check(
    doc: dict[str, Any], *, kind: Kind = "telemetry", topic_serial: str = "NGP204519H"
) -> None:
    message = contract.decode(kind, encode(doc))
    contract.check(
        message, topic_serial=topic_serial, now=NOW, max_future=MAX_FUTURE, oldest=OLDEST
    )


def _check_reason(doc: dict[str, Any], **kwargs: Any) -> Rejected:
    with pytest.raises(Rejected) as caught:
        _check(doc, **kwargs)
    return caught.value


def _dosed(rate: float, concentration: float, dose: float) -> dict[str, Any]:
    doc = changed(MIN_TELEMETRY, "infusion.rate_ml_per_day", rate)
    doc = changed(doc, "drug.concentration_mcg_per_ml", concentration)
    return changed(doc, "infusion.daily_dose_mcg", dose)


@pytest.mark.parametrize(
    ("rate", "concentration", "dose"),
    [
        (0.25, 2000, 500),
        (0.25, 2000, 505),  # exactly +1 %
        (0.25, 2000, 495),  # exactly -1 %
        (0.1, 700, 70.7),  # exactly +1 %, though 0.1 x 700 is 70.00000000000001 in doubles
        (0.1, 700, 69.3),  # exactly -1 %
        (0.7, 100, 70.7),
        (0.35, 500, 176.75),
        (0.35, 500, 173.25),
        (0.3, 1000, 303),
        (0.0, 2000, 0),
        (1e300, 1e8, 1e308),
        (1.79e305, 1005, 1.797e308),  # the product overflows a double, the dose agrees
    ],
)
def test_dose_within_exactly_one_percent_is_accepted(
    rate: float, concentration: float, dose: float
) -> None:
    _check(_dosed(rate, concentration, dose))


@pytest.mark.parametrize(
    ("rate", "concentration", "dose"),
    [
        (0.25, 2000, 505.0001),
        (0.25, 2000, 494.9999),
        (0.1, 700, 70.70000001),
        (0.1, 700, 69.29999999),
        (0.35, 500, 176.7501),
        (0.0, 2000, 0.001),
        (0.25, 2000, 0),
        (1e308, 2000, 5),  # the product overflows a double
    ],
)
def test_dose_just_over_one_percent_off_is_inconsistent(
    rate: float, concentration: float, dose: float
) -> None:
    rejected = _check_reason(_dosed(rate, concentration, dose))
    assert rejected.reason is Reason.INCONSISTENT_DOSE
    assert "infusion.daily_dose_mcg" in rejected.detail
    assert f"{dose:.12g}" in rejected.detail


@pytest.mark.parametrize(
    ("expires_at", "refused"),
    [
        ("2026-11-24T08:30:00Z", False),  # recorded 07:30Z: exactly 1 h later
        ("2026-11-24T09:30:00+01:00", False),  # the same instant in another offset
        ("2026-11-24T07:00:00Z", False),  # already expired: stored, and no use to anyone
        ("2026-11-24T08:30:00.000001Z", True),
        ("2026-11-25T07:30:00Z", True),
    ],
)
def test_a_claim_code_lives_at_most_an_hour(expires_at: str, refused: bool) -> None:
    doc = changed(
        changed(CLAIM, "recorded_at", "2026-11-24T07:30:00Z"), "claim.expires_at", expires_at
    )
    if refused:
        rejected = _check_reason(doc, kind="events")
        assert rejected.reason is SCHEMA
        assert "claim.expires_at" in rejected.detail
        assert "1 h" in rejected.detail
    else:
        _check(doc, kind="events")


def test_dose_is_not_checked_without_daily_dose_nor_on_events() -> None:
    _check(MIN_TELEMETRY)
    _check(changed(PRESCRIPTION, "infusion.daily_dose_mcg", 1e6), kind="events")


@pytest.mark.parametrize(
    "recorded_at",
    [
        "2026-11-24T07:35:00Z",  # exactly 5 minutes ahead
        "2026-11-24T08:35:00+01:00",  # the same instant in another offset
        "2026-11-24T07:34:59.999999Z",
        "2026-11-24T07:30:00Z",
        "2000-01-01T00:00:00Z",  # exactly the oldest accepted
        "2000-01-01T01:00:00+01:00",
    ],
)
def test_recorded_at_within_bounds_is_accepted(recorded_at: str) -> None:
    _check({**MIN_TELEMETRY, "recorded_at": recorded_at})
    _check({**BOLUS, "recorded_at": recorded_at}, kind="events")


@pytest.mark.parametrize(
    ("recorded_at", "reason"),
    [
        ("2026-11-24T07:35:01Z", Reason.CLOCK_SKEW),  # 5 min + 1 s
        ("2026-11-24T08:35:01+01:00", Reason.CLOCK_SKEW),
        ("2026-11-24T07:35:00.000001Z", Reason.CLOCK_SKEW),
        ("2026-11-25T07:35:00Z", Reason.CLOCK_SKEW),
        ("1999-12-31T23:59:59Z", Reason.TOO_OLD),  # 1 s before the oldest
        ("2000-01-01T00:59:59+01:00", Reason.TOO_OLD),
        ("9999-12-31T23:59:59-01:00", Reason.CLOCK_SKEW),  # after 9999 in UTC
        ("0001-01-01T00:00:00+01:00", Reason.TOO_OLD),  # before year 1 in UTC
    ],
)
def test_recorded_at_out_of_bounds_is_refused(recorded_at: str, reason: Reason) -> None:
    telemetry = _check_reason({**MIN_TELEMETRY, "recorded_at": recorded_at})
    event = _check_reason({**BOLUS, "recorded_at": recorded_at}, kind="events")
    for rejected in (telemetry, event):
        assert rejected.reason is reason
        assert "recorded_at" in rejected.detail


def test_serial_must_equal_the_topics() -> None:
    _check(MIN_TELEMETRY, topic_serial="NGP204519H")
    _check(REFILL, kind="events", topic_serial="NGP204519H")
    for topic_serial in ("NGP204519J", "ngp204519h", "NGP204519H-2"):
        rejected = _check_reason(MIN_TELEMETRY, topic_serial=topic_serial)
        assert rejected.reason is Reason.SERIAL_MISMATCH
        assert "NGP204519H" in rejected.detail
        assert topic_serial in rejected.detail


def test_serial_mismatch_is_reported_before_the_other_rules() -> None:
    doc = _dosed(0.25, 2000, 900)
    doc["recorded_at"] = "2030-01-01T00:00:00Z"
    assert _check_reason(doc, topic_serial="OTHER-1").reason is Reason.SERIAL_MISMATCH
    assert _check_reason(doc).reason is Reason.CLOCK_SKEW


# --------------------------------------------------------------------------------------------
# parse_topic


@pytest.mark.parametrize(
    ("topic", "prefix", "expected"),
    [
        ("pumps/NGP204519H/telemetry", "", ("NGP204519H", "telemetry")),
        ("pumps/NGP204519H/events", "", ("NGP204519H", "events")),
        ("pumps/ab-1/events", "", ("ab-1", "events")),
        ("pumps/" + "A" * 32 + "/telemetry", "", ("A" * 32, "telemetry")),
        ("site-a/pumps/NGP204519H/telemetry", "site-a", ("NGP204519H", "telemetry")),
        ("org/site-a/pumps/NGP204519H/events", "org/site-a", ("NGP204519H", "events")),
    ],
)
def test_parse_topic(topic: str, prefix: str, expected: tuple[str, str]) -> None:
    assert contract.parse_topic(topic, prefix) == expected


@pytest.mark.parametrize(
    ("topic", "prefix", "names"),
    [
        ("site-a/pumps/NGP204519H/telemetry", "", "is not pumps/"),  # a prefix nobody configured
        ("pumps/NGP204519H/telemetry", "site-a", "lacks the prefix 'site-a'"),
        ("site-b/pumps/NGP204519H/telemetry", "site-a", "lacks the prefix 'site-a'"),
        ("site-a-pumps/NGP204519H/telemetry", "site-a", "lacks the prefix 'site-a'"),
        ("pumps/NGP204519H/status", "", "is not pumps/"),
        ("pumps/NGP204519H/telemetry/extra", "", "is not pumps/"),
        ("pumps/NGP204519H", "", "is not pumps/"),
        ("pump/NGP204519H/telemetry", "", "is not pumps/"),
        ("pumps//telemetry", "", "topic serial ''"),
        ("pumps/ABC/telemetry", "", "topic serial 'ABC'"),
        ("pumps/" + "A" * 33 + "/telemetry", "", "topic serial 'AAAA"),
        ("pumps/NGP_2045/telemetry", "", "topic serial 'NGP_2045'"),
        ("pumps/\u0661\u0662\u0663\u0664/telemetry", "", "topic serial"),
        ("pumps/NGP2045\n/telemetry", "", "topic serial 'NGP2045\\n'"),
        ("", "", "is not pumps/"),
    ],
)
def test_parse_topic_refuses(topic: str, prefix: str, names: str) -> None:
    with pytest.raises(Rejected) as caught:
        contract.parse_topic(topic, prefix)
    assert caught.value.reason is Reason.BAD_TOPIC
    assert names in caught.value.detail


# The decoder proves most payloads free of repeated keys by counting `":` instead of walking the
# tree; these try to fool that count (a repeat compensated by a string, an escape or a space).
_EXAMPLE_TAIL = (
    b'"msg_id": "3f0e8a52-5d4e-4c5b-9a57-0c7f1d2b9e11", "serial": "NGP204519H", '
    b'"recorded_at": "2026-11-24T08:30:00+01:00", "reservoir": {"volume_ml": 17.42, '
    b'"capacity_ml": 40}, "drug": {"name": "baclofen", "concentration_mcg_per_ml": 2000}, '
    b'"infusion": {"mode": "continuous", "rate_ml_per_day": 0.25}'
)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"v": 1, "v": 1, ' + _EXAMPLE_TAIL + b"}",
        b'{"v": 1, "v": 1, "note": "\\":", ' + _EXAMPLE_TAIL + b"}",
        b'{"v": 1, "v": 1, "note": "\\u0022:", ' + _EXAMPLE_TAIL + b"}",
        b'{"v": 1, "v" : 1, ' + _EXAMPLE_TAIL + b"}",
        b'{"v": 1, "x": "a\\":", "x": "b", ' + _EXAMPLE_TAIL + b"}",
        b'{"v": 1, "model": "\\\\u", "model": "y", ' + _EXAMPLE_TAIL + b"}",
    ],
    ids=[
        "plain",
        "quote-colon-string",
        "escaped-quote",
        "spaced-colon",
        "dropped-string",
        "escaped-backslash-u",
    ],
)
def test_repeated_keys_are_found_whatever_hides_them(raw: bytes) -> None:
    assert reference("telemetry", raw).reason is INVALID
    verdict = decoder("telemetry", raw)
    assert verdict.reason is INVALID, verdict
    assert "duplicate key" in verdict.detail


def test_the_counting_shortcut_accepts_strings_full_of_quotes_and_colons() -> None:
    raw = b'{"v": 1, "note": "\\":\\": : \\" :", ' + _EXAMPLE_TAIL + b"}"
    assert reference("telemetry", raw) == ACCEPTED
    assert decoder("telemetry", raw).reason is None
