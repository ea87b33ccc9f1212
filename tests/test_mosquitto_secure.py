"""The production broker configuration (deploy/mosquitto/secure) run by a real Mosquitto on spare
ports, with certificates from gen-dev-certs.sh and the password file from make-passwd.sh: who may
connect, publish and read, TLS, the payload limit, and the limits it shares with conf.d."""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import MQTTProtocolVersion

from tests.deploy_support import (
    MOSQUITTO_DIR,
    OBSERVER,
    ROOT,
    SECURE_DIR,
    ConnectionRefused,
    SecureBroker,
    generate_certs,
    start_secure_mosquitto,
)
from tests.support import IngestProcess, encode, fetch, refill_event, telemetry

DEVICE = "NGPDEV0001"
"""The development device account: named by its pump's serial, it speaks for that pump only."""


@pytest.fixture
def secure(tmp_path: Path) -> Iterator[SecureBroker]:
    broker = start_secure_mosquitto(tmp_path / "broker")
    try:
        yield broker
    finally:
        broker.stop()


def _directives(text: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            found.setdefault(key, value.strip())
    return found


def test_the_secure_config_keeps_the_shared_limits_and_states_its_queue_arithmetic() -> None:
    secure = (SECURE_DIR / "mosquitto.conf").read_text()
    ours = _directives(secure)
    shared = _directives((MOSQUITTO_DIR / "conf.d" / "pumpwatch.conf").read_text())
    for key, value in shared.items():
        if key != "max_queued_messages":
            assert ours.get(key) == value, key
    assert ours["allow_anonymous"] == "false"
    assert ours["persistence"] == "true"
    assert int(ours["autosave_interval"]) <= 60
    assert ours["message_size_limit"] == str(64 * 1024)  # the contract's payload limit
    # The queue is the product the comment states.
    arithmetic = re.search(
        r"([\d,]+) pumps \N{MULTIPLICATION SIGN} (\d+) messages/day "
        r"\N{MULTIPLICATION SIGN} (\d+) days \N{MULTIPLICATION SIGN} ([\d.]+) "
        r"= ([\d,]+) messages",
        secure,
    )
    assert arithmetic, "the max_queued_messages comment lost its arithmetic"
    pumps, per_day, days, headroom, total = arithmetic.groups()
    product = int(pumps.replace(",", "")) * int(per_day) * int(days) * float(headroom)
    assert product == int(total.replace(",", "")) == int(ours["max_queued_messages"])
    assert int(ours["max_queued_messages"]) >= int(shared["max_queued_messages"])


def test_anonymous_and_wrong_passwords_are_refused(secure: SecureBroker) -> None:
    for protocol in (paho.MQTTv5, paho.MQTTv311):
        with pytest.raises(ConnectionRefused, match="Not authorized"):
            secure.connect(None, protocol=protocol)
        with pytest.raises(ConnectionRefused, match="Not authorized"):
            secure.connect(DEVICE, protocol=protocol, password="not-the-password")
        with pytest.raises(ConnectionRefused, match="Not authorized"):
            secure.connect(None, protocol=protocol, tls=True)
    secure.connect(DEVICE).disconnect()


def test_a_device_publishes_over_tls_and_ingest_stores_it(
    secure: SecureBroker, database_url: str, tmp_path: Path
) -> None:
    """Ingest subscribes with its account over TLS (its shared subscription passes the ACL);
    a device account's telemetry and events, published over TLS, are stored."""
    ingest = IngestProcess(
        database_url,
        secure.as_embedded("pumpwatch-ingest", tls=True),
        tmp_path / "ingest.log",
        extra_env={"PUMPWATCH_MQTT_CA_FILE": str(secure.ca_file)},
    )
    try:
        ingest.start()  # /readyz: connected and subscribed
        device = secure.connect(DEVICE, tls=True)
        serial = DEVICE
        reading = telemetry(serial=serial, seq=0)
        refill = refill_event(serial=serial, seq=1)
        for topic, message in (
            (f"pumps/{serial}/telemetry", reading),
            (f"pumps/{serial}/events", refill),
        ):
            assert not device.publish(topic, encode(message)).is_failure
        ingest.wait_metric("pumpwatch_ingest_messages_stored_total", 1, kind="telemetry")
        ingest.wait_metric("pumpwatch_ingest_messages_stored_total", 1, kind="events")
    finally:
        ingest.stop_quietly()
    stored = asyncio.run(
        fetch(database_url, "SELECT msg_id::text FROM ingested_messages ORDER BY 1")
    )
    assert [r["msg_id"] for r in stored] == sorted([reading["msg_id"], refill["msg_id"]])


def test_messages_for_an_absent_ingest_survive_a_broker_restart(
    secure: SecureBroker, database_url: str, tmp_path: Path
) -> None:
    """Persistence as configured: ingest's persistent session queues while ingest is away, the
    broker restarts (saving its database on the way down), and ingest gets the message."""
    ingest = IngestProcess(
        database_url, secure.as_embedded("pumpwatch-ingest"), tmp_path / "ingest.log"
    )
    try:
        ingest.start()  # the session and its shared subscription exist
        assert ingest.terminate() == 0
        device = secure.connect(DEVICE)
        reading = telemetry(serial=DEVICE, seq=0)
        assert not device.publish(f"pumps/{DEVICE}/telemetry", encode(reading)).is_failure
        secure.stop()
        secure.start()
        ingest.start()
        ingest.wait_metric("pumpwatch_ingest_messages_stored_total", 1, kind="telemetry")
    finally:
        ingest.stop_quietly()
    assert list((secure.data_dir).glob("mosquitto.db"))


def test_a_device_reads_nothing_and_publishes_nowhere_else(secure: SecureBroker) -> None:
    observer = secure.connect(OBSERVER)
    assert not observer.subscribe("#")[0].is_failure
    snoop = secure.connect(DEVICE)
    snoop.subscribe("pumps/#")
    snoop.subscribe("clinics/#")
    device = secure.connect(DEVICE)

    # MQTT 5: the broker answers a forbidden publish with "Not authorized"…
    refused = device.publish("clinics/C1/alerts", b'{"forged": true}')
    assert refused.value == 0x87, refused  # Not authorized
    # …MQTT 3.1.1 has no such answer: the publish is acknowledged and dropped.
    legacy = secure.connect(DEVICE, protocol=paho.MQTTv311)
    legacy.publish("clinics/C1/alerts", b'{"forged": "3.1.1"}')
    legacy.publish(f"pumps/{DEVICE}/commands", b"{}")
    # Another pump's readings and events: a device speaks for its own pump only.
    assert device.publish("pumps/NGPOTHER01/telemetry", b'{"forged": true}').value == 0x87
    legacy.publish("pumps/NGPOTHER01/events", b'{"forged": "3.1.1"}')
    # Messages from one connection are routed in order: once the observer has this one, the
    # refused ones would have reached it before.
    control = uuid.uuid4().bytes.hex().encode()
    assert not legacy.publish(f"pumps/{DEVICE}/telemetry", control).is_failure
    assert observer.wait_messages(1) == [(f"pumps/{DEVICE}/telemetry", control)]

    # The snooping device account was routed nothing: its connection has answered a later
    # round trip, so anything queued for it before would have arrived first.
    assert not snoop.publish(f"pumps/{DEVICE}/events", b"{}").is_failure
    observer.wait_messages(2)
    assert snoop.messages == []


@pytest.mark.parametrize("protocol", [paho.MQTTv5, paho.MQTTv311])
def test_ingest_and_alert_accounts_are_kept_to_their_own_topics(
    secure: SecureBroker, protocol: MQTTProtocolVersion
) -> None:
    observer = secure.connect(OBSERVER)
    observer.subscribe("#")
    ingest = secure.connect("pumpwatch-ingest", protocol=protocol)
    ingest.subscribe("clinics/+/alerts")
    alerts = secure.connect("pumpwatch-alerts", protocol=protocol)
    alerts.subscribe("pumps/+/telemetry")
    ingest.publish("pumps/NGPY/telemetry", b"forged by ingest")
    alerts.publish("pumps/NGPY/telemetry", b"forged by alerts")
    assert not alerts.publish("clinics/C1/alerts", b"alert").is_failure
    device = secure.connect(DEVICE, protocol=protocol)
    assert not device.publish(f"pumps/{DEVICE}/telemetry", b"reading").is_failure
    assert observer.wait_messages(2) == [
        ("clinics/C1/alerts", b"alert"),
        (f"pumps/{DEVICE}/telemetry", b"reading"),
    ]
    # A round trip on each: nothing readable by them was routed to them.
    for client in (ingest, alerts):
        client.subscribe("unused/round-trip")
    assert ingest.messages == []
    assert alerts.messages == []


def test_tls_uses_the_generated_certificates(secure: SecureBroker, tmp_path: Path) -> None:
    client = secure.connect(DEVICE, tls=True)
    assert not client.publish(f"pumps/{DEVICE}/telemetry", b"{}").is_failure
    # The certificate is the script's: valid for 127.0.0.1 under its CA, and under no other CA
    # (the system's store, or another run of the script).
    other = generate_certs(tmp_path / "other")
    for ca_file, trusted in ((secure.ca_file, True), (other / "ca.crt", False), (None, False)):
        context = ssl.create_default_context(cafile=None if ca_file is None else str(ca_file))
        with socket.create_connection(("127.0.0.1", secure.tls_port), timeout=10) as raw:
            if trusted:
                with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                    assert tls.version() in ("TLSv1.2", "TLSv1.3")
            else:
                with pytest.raises(ssl.SSLCertVerificationError):
                    context.wrap_socket(raw, server_hostname="127.0.0.1").close()


def test_payloads_beyond_the_contracts_64_kib_are_refused(secure: SecureBroker) -> None:
    """The broker drops a payload over 64 KiB (MQTT 5 publishers get PUBACK 0x95, which paho
    2.1 cannot parse, so this one publishes at QoS 0) and passes one of exactly 64 KiB."""
    observer = secure.connect(OBSERVER)
    observer.subscribe("pumps/#")
    device = secure.connect(DEVICE)
    device.client.publish(f"pumps/{DEVICE}/telemetry", b"x" * (64 * 1024 + 1), qos=0)
    assert not device.publish(f"pumps/{DEVICE}/telemetry", b"y" * (64 * 1024)).is_failure
    # In order on one connection: had the first been passed on, it would have come first.
    assert [(len(p), p[:1]) for _, p in observer.wait_messages(1)] == [(64 * 1024, b"y")]


def test_no_private_key_is_in_the_repository() -> None:
    """gen-dev-certs.sh writes into deploy/mosquitto/certs/, which git ignores."""
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert "deploy/mosquitto/certs/" in ignored
    tracked = subprocess.run(
        ["git", "ls-files", "deploy"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert tracked, "not a git checkout"
    assert not [path for path in tracked if path.endswith((".key", ".pem", "passwd"))]


def test_a_device_reads_its_own_pumps_commands_and_no_others(secure: SecureBroker) -> None:
    """Backfill requests (``pumps/{serial}/commands``) reach the pump's own device only."""
    device = secure.connect(DEVICE)
    assert not device.subscribe("pumps/+/commands")[0].is_failure
    observer = secure.connect(OBSERVER)
    observer.subscribe("pumps/+/commands")
    ingest = secure.connect("pumpwatch-ingest")  # who asks devices to resend
    assert not ingest.publish("pumps/NGPOTHER01/commands", b"theirs").is_failure
    assert not ingest.publish(f"pumps/{DEVICE}/commands", b"mine").is_failure
    assert observer.wait_messages(2) == [
        ("pumps/NGPOTHER01/commands", b"theirs"),
        (f"pumps/{DEVICE}/commands", b"mine"),
    ]
    # In order on one connection: had "theirs" been routed to the device, it would be first.
    assert device.wait_messages(1) == [(f"pumps/{DEVICE}/commands", b"mine")]
