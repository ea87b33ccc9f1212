"""Coverage-guided fuzzing of the wire decoder and the ingest judge with atheris (libFuzzer).

    .venv/bin/python -m lab.bench.fuzz_decoder -runs=100000 [-max_len=70000] [corpus_dir]

Each input is one MQTT message: its first byte picks the topic (telemetry, events, a malformed
topic), the rest is the payload. The properties checked on every input:

- ``contract.decode`` returns a message or raises ``Rejected`` with a reason — nothing else;
- the ingest judge accepts or quarantines the message, exactly one of the two, and never raises;
- a quarantined message yields a row PostgreSQL can store (no NUL, no lone surrogate in text);
- an accepted message's payload is UTF-8 and its stored row names the topic's serial.

libFuzzer's flags apply (``-runs=N`` for a fixed number of iterations); it exits non-zero on the
first input that breaks a property, writing it to ``crash-<sha1>``. Seeds come from the
simulator's valid and malformed messages.
"""

from __future__ import annotations

import inspect
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import atheris

from services.domain import contract
from services.domain.contract import Message, Rejected
from services.ingest.backlog import Incoming
from services.ingest.judge import Rules, judge, quarantine_row

TOPICS = ("pumps/NGP204519H/telemetry", "pumps/NGP204519H/events", "pumps/x/telemetry")
RULES = Rules(
    topic_prefix="", max_future=timedelta(minutes=5), oldest=datetime(2000, 1, 1, tzinfo=UTC)
)
NOW = datetime(2026, 11, 24, 8, 0, tzinfo=UTC)


def check_one(data: bytes) -> None:
    """The properties for one input (also called by the tests, without atheris)."""
    if not data:
        return
    topic = TOPICS[data[0] % len(TOPICS)]
    payload = data[1:]
    kind: contract.Kind = "events" if topic.endswith("/events") else "telemetry"
    try:
        decoded: Message | Rejected = contract.decode(kind, payload)
    except Rejected as exc:
        decoded = exc
    if isinstance(decoded, Rejected):
        assert decoded.reason in contract.Reason, decoded.reason
        assert decoded.detail, "a rejection without a detail"
    judged = judge([Incoming(1, 1, topic, payload, NOW.timestamp(), 1)], RULES, NOW)
    assert len(judged.accepted) + len(judged.quarantined) == 1, judged
    for item in judged.quarantined:
        row = quarantine_row(item)
        for text in (row[1], row[4], row[5]):
            assert "\x00" not in text
            text.encode("utf-8")  # raises on a lone surrogate
    for accepted in judged.accepted:
        payload.decode("utf-8")
        assert accepted.row[1] == "NGP204519H"


def seeds() -> list[bytes]:
    """Inputs to start from: simulated messages, valid and broken, on each topic."""
    from lab.sim.fleet import Fault, Fleet

    fleet = Fleet(
        pumps=3, seed=1, start=NOW - timedelta(days=3), fault_rates={Fault.MALFORMED: 0.5}
    )
    found = []
    for message in fleet.take(60):
        doc = message.payload.replace(message.serial.encode(), b"NGP204519H")
        found.append(bytes([0 if message.kind == "telemetry" else 1]) + doc)
    return found


def _instrument() -> None:
    """Coverage feedback from the decoder's and the judge's own functions (instrumenting every
    loaded module costs half a minute at start)."""
    from services.domain import contract as module
    from services.ingest import judge as judging

    for namespace in (module, judging):
        for value in list(vars(namespace).values()):
            if inspect.isfunction(value) and value.__module__ == namespace.__name__:
                atheris.instrument_func(value)


def main(argv: list[str]) -> None:
    """Fuzz; without a corpus directory among the arguments, start from ``seeds()`` in a
    temporary one."""
    args = list(argv)
    if not any(arg and not arg.startswith("-") for arg in args[1:]):
        corpus = Path(tempfile.mkdtemp(prefix="pumpwatch-fuzz-"))
        for i, seed in enumerate(seeds()):
            (corpus / f"seed-{i:03d}").write_bytes(seed)
        args.append(str(corpus))
    if not any(arg.startswith("-max_len=") for arg in args):
        args.append(f"-max_len={contract.MAX_PAYLOAD_BYTES + 1024}")
    _instrument()
    atheris.Setup(args, check_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
