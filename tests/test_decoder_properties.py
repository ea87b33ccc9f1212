"""Properties of the wire decoder and the ingest judge over generated input (hypothesis).

tests/test_contract.py proves the decoder agrees with the published JSON Schema on a corpus and
on mutations of valid messages. These properties are about robustness and the parts of the
contract a corpus cannot enumerate:

1. totality: any bytes on any topic are decoded or rejected with a reason, never anything else,
   and the judge accepts or quarantines each message exactly once, with a storable row;
2. unknown fields: a valid message with any extra JSON members (of any shape within the limits)
   is still accepted, keeps its msg_id and is stored with its payload unchanged;
3. never-valid values anywhere (NaN and Infinity, NUL, lone surrogates, too deep, overflowing
   numbers) make the whole message invalid_json, wherever they hide.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.domain import contract
from services.domain.contract import Reason, Rejected
from services.ingest.backlog import Incoming
from services.ingest.judge import Rules, judge, quarantine_row
from services.ingest.sql import STAGE_READING_COLUMNS
from tests.support import telemetry

NOW = datetime(2026, 11, 24, 8, 0, tzinfo=UTC)
RULES = Rules("", timedelta(minutes=5), datetime(2000, 1, 1, tzinfo=UTC))
SERIAL = "NGP204519H"
KNOWN = {
    "v",
    "msg_id",
    "serial",
    "recorded_at",
    "seq",
    "source",
    "model",
    "reservoir",
    "drug",
    "infusion",
    "flow",
    "battery",
    "alarms",
    "type",
}
PROPERTIES = settings(
    derandomize=True, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

topics = st.sampled_from(
    [
        f"pumps/{SERIAL}/telemetry",
        f"pumps/{SERIAL}/events",
        "pumps/ab/telemetry",
        f"pumps/{SERIAL}/status",
        "other/topic",
    ]
)
# Text PostgreSQL and JSON both take: no NUL, no lone surrogates.
clean_text = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | clean_text,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(clean_text, children, max_size=4)
    ),
    max_leaves=12,
)


def _judge_one(topic: str, payload: bytes) -> None:
    judged = judge([Incoming(1, 1, topic, payload, NOW.timestamp(), 1)], RULES, NOW)
    assert len(judged.accepted) + len(judged.quarantined) == 1
    for item in judged.quarantined:
        assert item.reason in Reason
        digest, topic_text, stored, size, reason, detail, _ = quarantine_row(item)
        assert len(digest) == 32
        assert size == len(payload)
        assert stored == payload[: contract.MAX_PAYLOAD_BYTES]
        for text in (topic_text, reason, detail):
            assert "\x00" not in text
            text.encode("utf-8")


@PROPERTIES
@given(topic=topics, payload=st.binary(max_size=2048))
def test_any_bytes_are_decoded_or_rejected_and_judged_exactly_once(
    topic: str, payload: bytes
) -> None:
    for kind in ("telemetry", "events"):
        try:
            outcome: object = contract.decode(kind, payload)
        except Rejected as exc:
            outcome = exc
        if isinstance(outcome, Rejected):
            assert outcome.reason in Reason
            assert outcome.detail
        else:
            assert isinstance(outcome, contract.Message)
    _judge_one(topic, payload)


@PROPERTIES
@given(topic=topics, tree=json_values)
def test_any_json_is_decoded_or_rejected_and_judged_exactly_once(topic: str, tree: Any) -> None:
    _judge_one(topic, json.dumps(tree).encode())
    _judge_one(topic, json.dumps(tree, ensure_ascii=False).encode("utf-8"))


@PROPERTIES
@given(extra=st.dictionaries(clean_text.filter(lambda k: k not in KNOWN), json_values, max_size=5))
def test_unknown_fields_of_any_shape_are_accepted_and_kept(extra: dict[str, Any]) -> None:
    # Added to the message, not passed as keywords: a key such as "volume_ml" is an unknown
    # top-level field here, not the helper's argument.
    message = telemetry(serial=SERIAL, recorded_at=NOW - timedelta(hours=1)) | extra
    payload = json.dumps(message, ensure_ascii=False).encode("utf-8")
    judged = judge(
        [Incoming(1, 1, f"pumps/{SERIAL}/telemetry", payload, NOW.timestamp(), 1)], RULES, NOW
    )
    assert [q.detail for q in judged.quarantined] == []
    (accepted,) = judged.accepted
    assert accepted.msg_id == message["msg_id"]
    stored = accepted.row[STAGE_READING_COLUMNS.index("payload")]
    assert stored == payload.decode("utf-8")  # the original, unknown fields included
    assert json.loads(stored) == message


NEVER_VALID = st.sampled_from(
    [
        b"NaN",
        b"Infinity",
        b"-Infinity",
        b"1e400",
        b"-" + b"9" * 400,
        b'"a\\u0000b"',
        b'"\\ud800"',
        b'"x\\udfff"',
        b"[" * 40 + b"]" * 40,
        b'{"k": ' * 40 + b"1" + b"}" * 40,
    ]
)


@PROPERTIES
@given(
    bad=NEVER_VALID,
    where=st.sampled_from(["top", "source", "reservoir", "alarms", "extra_list", "extra_deep"]),
)
def test_a_never_valid_value_anywhere_makes_the_message_invalid_json(
    bad: bytes, where: str
) -> None:
    marker = "\u2063marker\u2063"
    message = telemetry(serial=SERIAL, recorded_at=NOW - timedelta(hours=1))
    if where == "top":
        message["unknown"] = marker
    elif where == "source":
        message["source"]["firmware"] = marker
    elif where == "reservoir":
        message["reservoir"]["volume_ml"] = marker
    elif where == "alarms":
        message["alarms"] = ["low_reservoir", marker]
    elif where == "extra_list":
        message["extra"] = [1, {"a": [marker]}]
    else:
        message["extra"] = {"a": {"b": {"c": [marker]}}}
    payload = json.dumps(message).encode().replace(json.dumps(marker).encode(), bad)
    for kind in ("telemetry", "events"):
        with pytest.raises(Rejected) as refused:
            contract.decode(kind, payload)
        assert refused.value.reason == Reason.INVALID_JSON, refused.value.detail
