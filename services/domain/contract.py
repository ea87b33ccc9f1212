"""The MQTT wire contract, version 1, as typed messages and a fast decoder.

The JSON Schema in ``schemas/mqtt-v1.schema.json`` is the published form of the same contract
(integrators validate against it). This module is the hot path: ``decode`` turns the bytes of one
MQTT payload into a typed message or raises :class:`Rejected` with the quarantine reason and a
detail naming the field. ``tests/test_contract.py`` proves the two accept and reject the same
corpus, for the same reason.

Pure code: no I/O, the clock is passed in.
"""

from __future__ import annotations

import functools
import json
import re
from datetime import UTC, datetime, timedelta
from decimal import Context, Decimal
from enum import StrEnum
from importlib import resources
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from services.domain import json_syntax

MAX_PAYLOAD_BYTES = 65536
MAX_DEPTH = 32
"""Containers nested deeper than this are refused; the top-level object is level 1."""
_INT_OVERFLOW = 2**1024 - 2**970
"""The smallest integer that rounds to infinity as a double (halfway above the largest double).

A number overflows a double when its nearest double is infinite: msgspec refuses such floats and
``float()`` of such an int raises ``OverflowError``; integers below this round to a finite double.
"""
DOSE_TOLERANCE = 0.01
"""``daily_dose_mcg`` must agree with rate x concentration within this fraction."""
_DOSE_TOLERANCE_EXACT = Decimal("0.01")
_DOSE_BAND = 1e-9
"""Relative distance from the 1 % limit within which doubles cannot be trusted to decide."""
_EXACT = Context(prec=80)
"""Enough digits for the exact product of two doubles' shortest decimal forms."""

# Each pattern ends in (?!\n)$, not just $: Python's re (used by msgspec and by the jsonschema
# package) lets $ match before a final newline, ECMA-262 (JSON Schema's dialect) does not. With the
# lookahead "ABCD\n" is refused in both.
SERIAL_PATTERN = r"^[A-Za-z0-9-]{4,32}(?!\n)$"
UUID_PATTERN = (
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}(?!\n)$"
)
TIMESTAMP_PATTERN = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-5][0-9](\.[0-9]{1,9})?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})(?!\n)$"
)
CLOCK_PATTERN = r"^([01][0-9]|2[0-3]):[0-5][0-9](?!\n)$"
_SERIAL_RE = re.compile(r"[A-Za-z0-9-]{4,32}")
_TIMESTAMP_RE = re.compile(TIMESTAMP_PATTERN)


class Reason(StrEnum):
    """Why a message was quarantined. Stable: used as a metric label and in the API."""

    TOO_LARGE = "too_large"
    INVALID_JSON = "invalid_json"
    SCHEMA = "schema"
    BAD_TOPIC = "bad_topic"
    SERIAL_MISMATCH = "serial_mismatch"
    CLOCK_SKEW = "clock_skew"
    TOO_OLD = "too_old"
    INCONSISTENT_DOSE = "inconsistent_dose"
    STORE_ERROR = "store_error"
    INTERNAL_ERROR = "internal_error"


class Rejected(Exception):
    """A message that cannot be accepted: quarantine it with this reason and detail."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


NonNegative = Annotated[float, Meta(ge=0)]
Positive = Annotated[float, Meta(gt=0)]
Percent = Annotated[float, Meta(ge=0, le=100)]
Timestamp = Annotated[datetime, Meta(tz=True)]


class _Body(Struct, kw_only=True, frozen=True):
    """Unknown fields are ignored here and kept in the stored original payload."""


class Source(_Body, kw_only=True, frozen=True):
    kind: Literal["clinician_programmer", "patient_programmer", "home_hub"] | UnsetType = UNSET
    id: str | UnsetType = UNSET
    firmware: str | UnsetType = UNSET


class Reservoir(_Body, kw_only=True, frozen=True):
    volume_ml: NonNegative
    capacity_ml: Positive
    low_alarm_ml: NonNegative | UnsetType = UNSET
    basis: Literal["measured", "calculated"] | UnsetType = UNSET


class Drug(_Body, kw_only=True, frozen=True):
    name: str
    concentration_mcg_per_ml: Positive


class ScheduleStep(_Body, kw_only=True, frozen=True):
    start: Annotated[str, Meta(pattern=CLOCK_PATTERN)]
    rate_ml_per_day: NonNegative

    @property
    def start_minute(self) -> int:
        """Minutes after local midnight."""
        return int(self.start[:2]) * 60 + int(self.start[3:5])


class Infusion(_Body, kw_only=True, frozen=True):
    mode: Literal["continuous", "flex", "periodic_bolus"]
    rate_ml_per_day: NonNegative
    daily_dose_mcg: NonNegative | UnsetType = UNSET
    schedule: list[ScheduleStep] | UnsetType = UNSET


class Flow(_Body, kw_only=True, frozen=True):
    measured_ml_per_day: NonNegative | UnsetType = UNSET


class Battery(_Body, kw_only=True, frozen=True):
    remaining_pct: Percent | UnsetType = UNSET
    status: Literal["ok", "eri", "eos"] | UnsetType = UNSET


# JSON Schema counts 1.0 as an integer, so the decoder takes integral floats too.
_Version = Annotated[int, Meta(ge=1, le=1)] | Annotated[float, Meta(ge=1, le=1)]
_Seq = Annotated[int, Meta(ge=0, le=2**63 - 1)] | Annotated[float, Meta(ge=0, le=2**63 - 1)]


class _Common(_Body, kw_only=True, frozen=True):
    v: _Version
    msg_id: Annotated[str, Meta(pattern=UUID_PATTERN, max_length=36)]
    serial: Annotated[str, Meta(pattern=SERIAL_PATTERN)]
    recorded_at: Timestamp
    seq: _Seq | UnsetType = UNSET
    source: Source | UnsetType = UNSET

    def __post_init__(self) -> None:
        seq = self.seq
        # Compared exactly: 2.0**63 passes the float bound but does not fit a bigint.
        if isinstance(seq, float) and (not seq.is_integer() or seq > 2**63 - 1):
            raise ValueError("seq: must be an integer between 0 and 2**63 - 1")

    @property
    def sequence(self) -> int | None:
        return None if isinstance(self.seq, UnsetType) else int(self.seq)

    @property
    def source_kind(self) -> str | None:
        return (
            None if isinstance(self.source, UnsetType) or not self.source.kind else self.source.kind
        )

    @property
    def source_id(self) -> str | None:
        if isinstance(self.source, UnsetType) or isinstance(self.source.id, UnsetType):
            return None
        return self.source.id

    @property
    def source_firmware(self) -> str | None:
        if isinstance(self.source, UnsetType) or isinstance(self.source.firmware, UnsetType):
            return None
        return self.source.firmware


class Telemetry(_Common, kw_only=True, frozen=True):
    reservoir: Reservoir
    drug: Drug
    infusion: Infusion
    model: str | UnsetType = UNSET
    flow: Flow | UnsetType = UNSET
    battery: Battery | UnsetType = UNSET
    alarms: list[str] | UnsetType = UNSET


class Refill(_Body, kw_only=True, frozen=True):
    residual_ml: NonNegative
    added_ml: Positive
    drug: str
    concentration_mcg_per_ml: Positive
    expected_residual_ml: NonNegative | UnsetType = UNSET


class Bolus(_Body, kw_only=True, frozen=True):
    dose_mcg: Positive
    kind: Literal["clinician", "patient"]


CLAIM_CODE_PATTERN = r"^[A-Za-z0-9]{6,12}(?!\n)$"
CLAIM_LIFETIME = timedelta(hours=1)
"""A claim code expires at most this long after the programmer showed it."""


class Claim(_Body, kw_only=True, frozen=True):
    code: Annotated[str, Meta(pattern=CLAIM_CODE_PATTERN)]
    expires_at: Timestamp


class _Event(_Common, kw_only=True, frozen=True, tag_field="type"):
    pass


class RefillEvent(_Event, kw_only=True, frozen=True, tag="refill"):
    refill: Refill


class PrescriptionChangeEvent(_Event, kw_only=True, frozen=True, tag="prescription_change"):
    infusion: Infusion


class BolusEvent(_Event, kw_only=True, frozen=True, tag="bolus"):
    bolus: Bolus


class ClaimEvent(_Event, kw_only=True, frozen=True, tag="claim"):
    """The clinician programmer shows a code while it interrogates the pump; a clinic that
    enters it before it expires takes custody of a pump nobody holds (HTTP contract 1.1)."""

    claim: Claim


Event = RefillEvent | PrescriptionChangeEvent | BolusEvent | ClaimEvent
Message = Telemetry | RefillEvent | PrescriptionChangeEvent | BolusEvent | ClaimEvent
Kind = Literal["telemetry", "events"]

_generic_decoder = msgspec.json.Decoder()
_generic_encoder = msgspec.json.Encoder()
_telemetry_decoder = msgspec.json.Decoder(Telemetry)
_NOT_DIGITS = bytes(b for b in range(256) if not 0x30 <= b <= 0x39)
_OVERFLOW_DIGITS = 309  # 2**1024 - 2**970, the least integer that overflows, has 309 digits


def decode(kind: Kind, raw: bytes) -> Message:
    """Decode one payload of the given topic kind, or raise :class:`Rejected`.

    The common telemetry payload takes :func:`_decode_plain_telemetry`, which accepts only what
    it proves :func:`_decode_slow` accepts with an equal message; anything else, every rejection
    included, is judged by ``_decode_slow`` alone."""
    if kind == "telemetry" and b"\\" not in raw and len(raw) <= MAX_PAYLOAD_BYTES:
        message = _decode_plain_telemetry(raw)
        if message is not None:
            return message
    return _decode_slow(kind, raw)


def _decode_plain_telemetry(raw: bytes) -> Telemetry | None:
    """Telemetry decoded straight into the struct, or None when that is not proven to be what
    :func:`_decode_slow` gives (the caller then asks it).

    Called only for a payload of at most ``MAX_PAYLOAD_BYTES`` without a backslash. Accepted
    when the typed decode succeeds and two things hold on the raw text:

    1. It holds ``"recorded_at":`` and the name ``recorded_at`` only once, and the string after
       it matches ``_TIMESTAMP_RE``. Without a backslash every key is spelled literally, so
       that one occurrence is the top-level key the typed decode read (it read one: the field
       is required), and its value, which the datetime parser took (digits, ``-:.+TtZz ``
       only), runs to the next quote: exactly the string the slow path checks.
    2. Its colons, less one when that stamp's offset is ``±00:00``, are as many as in the
       struct re-encoded. Without a backslash a colon in the raw text is either a member's
       separator or a character of a string; in the re-encoded struct likewise (field names
       and numbers hold none; every optional field defaults to UNSET, which is not written, so
       each written member is one the payload had). Each string value is written back with
       the colons it had, and the stamp too, bar ``±00:00``, which comes back as ``Z`` (the
       regex of 1. admits only ``Z``/``z`` or ``±HH:MM`` after ``HH:MM:SS``; msgspec writes
       ``Z`` for a zero offset, ``±HH:MM`` otherwise). So the raw text has exactly the extra
       colons of the members the struct did not keep: a repeated key (msgspec keeps the last
       silently) or an unknown field, each at least its separator. Equal counts prove there
       were none.

    Then the slow path agrees: the whole text was parsed into typed fields, so it is valid JSON
    for the generic decoder too; its never-valid checks find nothing, by their counting
    shortcut or by the walk: no string holds NUL or a lone surrogate (no ``\\u``), the typed
    fields nest at most 4 deep, no integer overflows a double (each number sits in a float
    field, whose decode refuses exactly those, or in the bounded ``v``/``seq``), no key
    repeats; the stamp passes its regex; and ``convert`` of the tree runs the same parsers,
    constraints and ``__post_init__`` as the typed decode, to an equal message (``-0`` is
    ``0.0`` both ways, ``1.0`` stays a float). ``tests/test_decode_fast_path.py`` compares the
    two paths on generated payloads; it fails without the colon comparison, the stamp's regex,
    the zero-offset allowance or the backslash guard.

    Events are left to the slow path: they are rare, and ``claim.expires_at`` is not held to
    the regex, so an offset written without its colon (``+0100``, which comes back as
    ``+01:00``) could hide a repeated key from the count.
    """
    try:
        message = _telemetry_decoder.decode(raw)
    except Exception:  # any doubt: the slow path gives the verdict and its detail
        return None
    at = raw.find(b'"recorded_at":')
    if at < 0 or raw.count(b"recorded_at") != 1:
        return None
    start = raw.find(b'"', at + 14) + 1
    stamp = raw[start : raw.find(b'"', start)].decode("ascii", "replace")
    if not _TIMESTAMP_RE.search(stamp):
        return None
    zero_offset = stamp.endswith("00:00")  # "+00:00" or "-00:00": written back as "Z"
    if raw.count(b":") - zero_offset != _generic_encoder.encode(message).count(b":"):
        return None
    return message


def _decode_slow(kind: Kind, raw: bytes) -> Message:
    """The reference decode: the generic tree, checked, then converted to the typed message."""
    if len(raw) > MAX_PAYLOAD_BYTES:
        raise Rejected(Reason.TOO_LARGE, f"payload is {len(raw)} bytes, limit {MAX_PAYLOAD_BYTES}")
    try:
        tree = _generic_decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
        raise Rejected(Reason.INVALID_JSON, _not_json(raw)) from None
    except RecursionError:
        raise Rejected(Reason.INVALID_JSON, f"nesting deeper than {MAX_DEPTH} levels") from None
    # Never-valid values (invalid_json) are reported before the shape (schema), also when the
    # payload is not an object: '["\u0000"]' is invalid_json, '[1]' is schema.
    _check_tree(raw, tree)
    if type(tree) is not dict:
        raise Rejected(Reason.SCHEMA, f"payload is a JSON {_json_type(tree)}, not an object")
    stamp = tree.get("recorded_at")
    if isinstance(stamp, str) and not _TIMESTAMP_RE.search(stamp):
        raise Rejected(Reason.SCHEMA, "recorded_at: not an RFC 3339 date-time with an offset")
    try:
        if kind == "telemetry":
            return msgspec.convert(tree, Telemetry)
        event: Event = msgspec.convert(tree, Event)
        return event
    except msgspec.ValidationError as exc:
        raise Rejected(Reason.SCHEMA, _schema_error(exc)) from None


def check(
    message: Message,
    *,
    topic_serial: str,
    now: datetime,
    max_future: timedelta,
    oldest: datetime,
) -> None:
    """The contract's rules beyond the schema; raise :class:`Rejected` on the first broken one."""
    if message.serial != topic_serial:
        raise Rejected(
            Reason.SERIAL_MISMATCH,
            f"serial {message.serial!r} does not match the topic's serial {topic_serial!r}",
        )
    if message.recorded_at > now + max_future:
        raise Rejected(
            Reason.CLOCK_SKEW,
            f"recorded_at {message.recorded_at.isoformat()} is more than "
            f"{max_future.total_seconds():.0f} s ahead of the server clock ({now.isoformat()})",
        )
    if message.recorded_at < oldest:
        raise Rejected(
            Reason.TOO_OLD,
            f"recorded_at {message.recorded_at.isoformat()} is before the oldest accepted "
            f"({oldest.isoformat()})",
        )
    if isinstance(message, Telemetry):
        _check_dose(message.infusion, message.drug.concentration_mcg_per_ml)
    elif isinstance(message, ClaimEvent) and (
        message.claim.expires_at > message.recorded_at + CLAIM_LIFETIME
    ):
        raise Rejected(
            Reason.SCHEMA,
            f"claim.expires_at: more than {CLAIM_LIFETIME.total_seconds() / 3600:g} h after "
            "recorded_at",
        )


def _check_dose(infusion: Infusion, concentration: float) -> None:
    dose = infusion.daily_dose_mcg
    if isinstance(dose, UnsetType):
        return
    rate = infusion.rate_ml_per_day
    expected = rate * concentration
    off = abs(dose - expected)
    limit = DOSE_TOLERANCE * expected
    if abs(off - limit) > _DOSE_BAND * limit:
        off_by_more = off > limit
    else:
        # Too close to call in binary floating point (0.1 x 700 is 70.00000000000001, so 70.7
        # would be "more than 1 %" off), or a product beyond the largest double (inf - inf is
        # NaN, never > anything): decide on the decimal numbers as sent, exactly.
        exact = _EXACT.multiply(Decimal(repr(rate)), Decimal(repr(concentration)))
        off_by_more = _EXACT.abs(_EXACT.subtract(Decimal(repr(dose)), exact)) > _EXACT.multiply(
            _DOSE_TOLERANCE_EXACT, exact
        )
    if off_by_more:
        raise Rejected(
            Reason.INCONSISTENT_DOSE,
            f"infusion.daily_dose_mcg {dose:.12g} disagrees with "
            f"rate_ml_per_day x concentration = {expected:.12g} mcg/day by more than "
            f"{DOSE_TOLERANCE:.0%}",
        )


@functools.lru_cache(maxsize=1 << 16)
def parse_topic(topic: str, prefix: str = "") -> tuple[str, Kind]:
    """``[prefix/]pumps/{serial}/telemetry|events`` → (serial, kind), or raise ``bad_topic``.

    Pure, and every pump publishes on the same two topics: remembered for the last 65,536
    topics (a refused topic is not remembered; its exception is raised each time)."""
    rest = topic
    if prefix:
        if not topic.startswith(prefix + "/"):
            raise Rejected(Reason.BAD_TOPIC, f"topic {topic!r} lacks the prefix {prefix!r}")
        rest = topic[len(prefix) + 1 :]
    parts = rest.split("/")
    if len(parts) != 3 or parts[0] != "pumps" or parts[2] not in ("telemetry", "events"):
        raise Rejected(
            Reason.BAD_TOPIC, f"topic {topic!r} is not pumps/{{serial}}/telemetry|events"
        )
    if not _SERIAL_RE.fullmatch(parts[1]):
        raise Rejected(Reason.BAD_TOPIC, f"topic serial {parts[1]!r} is not [A-Za-z0-9-]{{4,32}}")
    return parts[1], "telemetry" if parts[2] == "telemetry" else "events"


def schema_document() -> dict[str, Any]:
    """The published JSON Schema of the contract."""
    text = resources.files(__package__).joinpath("schemas/mqtt-v1.schema.json").read_text("utf-8")
    document: dict[str, Any] = json.loads(text)
    return document


def _check_tree(raw: bytes, tree: Any) -> None:
    """Rules msgspec does not enforce: depth, NUL, overflowing integers, duplicate keys."""
    if _plainly_fine(raw, tree):
        return
    nul = b"\\u0000" in raw
    container = type(tree) is dict or type(tree) is list
    # A bare scalar payload is wrapped, at level 0, so that the same checks apply to it.
    members = _walk(tree, 1, nul) if container else _walk([tree], 0, nul)
    # Every member's key ends in `":` when no key has whitespace before its colon; an escaped
    # quote followed by a colon inside a string only adds to the count. So a count equal to the
    # decoded members proves no key was repeated (a repeat leaves fewer decoded members).
    if raw.count(b'":') != members or _spaced_colon(raw):
        _check_duplicates_exactly(raw)


def _spaced_colon(raw: bytes) -> bool:
    return b" :" in raw or b"\t:" in raw or b"\n:" in raw or b"\r:" in raw


def _plainly_fine(raw: bytes, tree: Any) -> bool:
    """The common payload, proven free of the never-valid values without walking the tree.

    - No ``\\u`` escape: then no string holds NUL or a lone surrogate (raw control characters
      are already refused by the parser), and a colon is never escaped.
    - At most 32 brackets in all: no nesting deeper than 32.
    - Fewer than 309 digits in all: no integer can overflow a double.
    - As many colons in the raw text as in the decoded tree re-encoded: each decoded member adds
      one on both sides and each string the same on both sides, while a repeated key leaves the
      raw text with at least one more (its member's, and any in the value that was dropped)."""
    return (
        b"\\u" not in raw
        and raw.count(b"[") + raw.count(b"{") <= MAX_DEPTH
        and len(raw.translate(None, _NOT_DIGITS)) < _OVERFLOW_DIGITS
        and raw.count(b":") == _generic_encoder.encode(tree).count(b":")
    )


def _walk(node: dict[str, Any] | list[Any], depth: int, nul: bool) -> int:
    if depth > MAX_DEPTH:
        raise Rejected(Reason.INVALID_JSON, f"nesting deeper than {MAX_DEPTH} levels")
    members = 0
    if type(node) is dict:
        members = len(node)
        if nul:
            for key in node:
                _check_string(key)
        values: Any = node.values()
    else:
        values = node
    for value in values:
        kind = type(value)
        if kind is dict or kind is list:
            members += _walk(value, depth + 1, nul)
        elif kind is int:
            if value >= _INT_OVERFLOW or value <= -_INT_OVERFLOW:
                raise Rejected(Reason.INVALID_JSON, "a number overflows a double")
        elif nul and kind is str:
            _check_string(value)
    return members


def _check_string(value: str) -> None:
    if "\x00" in value:
        raise Rejected(Reason.INVALID_JSON, "a string contains NUL (\\u0000)")


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise Rejected(Reason.INVALID_JSON, f"duplicate key {key!r}")
        seen[key] = value
    return seen


def _check_duplicates_exactly(raw: bytes) -> None:
    json.loads(raw, object_pairs_hook=_reject_duplicates)


def _not_json(raw: bytes) -> str:
    """Why the parser refused ``raw``, in our words (never the parser's, which change between
    its releases)."""
    return json_syntax.diagnose(raw) or "JSON is malformed"


def _schema_error(exc: msgspec.ValidationError) -> str:
    text = str(exc)
    message, sep, path = text.rpartition(" - at `")
    if not sep:
        return text
    field = path.rstrip("`").removeprefix("$").removeprefix(".") or "(message)"
    return f"{field}: {message}"


def _json_type(value: object) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


# -- commands to devices (contract 1.1: backfill) --------------------------------------------


class Resend(Struct, kw_only=True, frozen=True, forbid_unknown_fields=False):
    """``pumps/{serial}/commands``: ask a source to re-publish the messages ``from_seq`` to
    ``to_seq`` (inclusive) that it still holds, unchanged (same ``msg_id``, same ``seq``)."""

    v: Literal[1] = 1
    type: Literal["resend"] = "resend"
    source_id: str
    from_seq: Annotated[int, Meta(ge=0)]
    to_seq: Annotated[int, Meta(ge=0)]
    request_id: str
    requested_at: str
    """RFC 3339, UTC (``Z``)."""


def encode_resend(
    source_id: str, from_seq: int, to_seq: int, request_id: str, requested_at: datetime
) -> bytes:
    """The payload of one ``resend`` command."""
    stamp = requested_at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    command = Resend(
        source_id=source_id,
        from_seq=from_seq,
        to_seq=to_seq,
        request_id=request_id,
        requested_at=stamp,
    )
    return msgspec.json.encode(command)


def decode_resend(raw: bytes) -> Resend:
    """A ``resend`` command (devices' side); raises ``msgspec.ValidationError`` or
    ``msgspec.DecodeError`` for anything else."""
    command = msgspec.json.decode(raw, type=Resend)
    if command.to_seq < command.from_seq:
        raise msgspec.ValidationError("to_seq is below from_seq")
    return command
