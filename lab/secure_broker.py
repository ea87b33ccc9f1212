"""The production broker configuration (``deploy/mosquitto/secure``) run for real on spare ports of
127.0.0.1, for the tests of deploy/ and for ``pumpwatch bench faults``: certificates from
``gen-dev-certs.sh``, the password file from ``make-passwd.sh`` (plus an observer account), the
committed ACL (plus the observer), the committed configuration with its container paths and
ports swapped for ours. And a small MQTT client whose results are waited for.
"""

from __future__ import annotations

import getpass
import os
import secrets
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from lab.embedded import EmbeddedBroker, free_port, port_open

ROOT = Path(__file__).resolve().parents[1]
MOSQUITTO_DIR = ROOT / "deploy" / "mosquitto"
SECURE_DIR = MOSQUITTO_DIR / "secure"

ACCOUNT_SECRETS = {
    "pumpwatch-ingest": "MQTT_INGEST_PASSWORD",
    "pumpwatch-alerts": "MQTT_ALERTS_PASSWORD",
    "pumpwatch-health": "MQTT_HEALTH_PASSWORD",
    "NGPDEV0001": "MQTT_DEVICE_PASSWORD",  # a device account is named by its pump's serial
}
"""The accounts make-passwd.sh writes, and the variable each one's password comes from."""
DEVICE = "NGPDEV0001"
"""The development device account: named by its pump's serial, it speaks for that pump only."""
OBSERVER = "test-observer"
"""An account that only the lab's copy of the ACL has: it reads everything but $SYS, so a test
or a scenario can show where a message did (not) go."""


class BrokerError(RuntimeError):
    """The broker did not start, or the committed configuration changed under the swaps."""


def account_secrets_env() -> dict[str, str]:
    """A fresh URL-safe password for each account make-passwd.sh writes."""
    return {name: secrets.token_urlsafe(18) for name in ACCOUNT_SECRETS.values()}


@dataclass
class SecureBroker:
    """deploy/mosquitto/secure/mosquitto.conf running on spare ports of 127.0.0.1."""

    plain_port: int
    tls_port: int
    ca_file: Path
    passwords: dict[str, str]
    data_dir: Path
    config: Path
    proc: subprocess.Popen[bytes] | None = None
    clients: list[paho.Client] = field(default_factory=list)

    def start(self) -> SecureBroker:
        log = (self.data_dir / "mosquitto.log").open("ab")
        self.proc = subprocess.Popen(
            ["mosquitto", "-c", str(self.config)], stdout=log, stderr=log, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + 10
        while not (
            port_open("127.0.0.1", self.plain_port) and port_open("127.0.0.1", self.tls_port)
        ):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise BrokerError(f"mosquitto did not start:\n{self.log()}")
            time.sleep(0.02)
        return self

    def url(self, account: str, *, tls: bool = False) -> str:
        scheme, port = ("mqtts", self.tls_port) if tls else ("mqtt", self.plain_port)
        return f"{scheme}://{account}:{self.passwords[account]}@127.0.0.1:{port}"

    def as_embedded(self, account: str, *, tls: bool = False) -> EmbeddedBroker:
        """What IngestProcess takes: this broker's URL with the account's credentials."""
        port = self.tls_port if tls else self.plain_port
        return EmbeddedBroker(self.url(account, tls=tls), "mosquitto", port, lambda: None)

    def connect(
        self,
        account: str | None,
        *,
        tls: bool = False,
        protocol: MQTTProtocolVersion = paho.MQTTv5,
        password: str | None = None,
        ca_file: Path | None = None,
    ) -> MqttClient:
        """A connected client (raises ConnectionRefused with the broker's reason)."""
        client = MqttClient(protocol)
        self.clients.append(client.client)
        if account is not None:
            client.client.username_pw_set(
                account, password if password is not None else self.passwords[account]
            )
        if tls:
            client.client.tls_set(ca_certs=str(ca_file or self.ca_file))
        client.connect("127.0.0.1", self.tls_port if tls else self.plain_port)
        return client

    def log(self) -> str:
        path = self.data_dir / "mosquitto.log"
        return path.read_text(errors="replace")[-6000:] if path.exists() else ""

    def stop(self) -> None:
        """Disconnect the clients it made and stop the broker (SIGTERM: it saves its
        database)."""
        for client in self.clients:
            client.disconnect()
            client.loop_stop()
        self.clients.clear()
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def generate_certs(directory: Path) -> Path:
    subprocess.run(
        ["sh", str(MOSQUITTO_DIR / "gen-dev-certs.sh"), str(directory)],
        check=True,
        capture_output=True,
    )
    return directory


def make_password_file(path: Path, env: dict[str, str]) -> None:
    subprocess.run(
        ["sh", str(SECURE_DIR / "make-passwd.sh"), str(path)],
        env={"PATH": os.environ.get("PATH", ""), **env},
        check=True,
        capture_output=True,
    )


def secure_config(
    *, plain_port: int, tls_port: int, certs: Path, passwd: Path, acl: Path, data: Path
) -> str:
    """The committed configuration with its container paths and ports swapped for ours; every
    swap must find its text, so that what runs follows the committed file."""
    text = (SECURE_DIR / "mosquitto.conf").read_text()
    swaps = [
        ("listener 8883\n", f"listener {tls_port} 127.0.0.1\n"),
        ("listener 1883\n", f"listener {plain_port} 127.0.0.1\n"),
        ("/mosquitto/certs/", f"{certs}/"),
        ("/mosquitto/auth/passwd", str(passwd)),
        ("/mosquitto/config/acl", str(acl)),
        ("/mosquitto/data/", f"{data}/"),
    ]
    for old, new in swaps:
        if old not in text:
            raise BrokerError(f"{old!r} is no longer in secure/mosquitto.conf")
        text = text.replace(old, new)
    # Started as root, mosquitto would drop to the "mosquitto" user: stay who we are.
    return text + f"\nuser {getpass.getuser()}\n"


def start_secure_mosquitto(
    tmp: Path, env: dict[str, str] | None = None, *, more_devices: Sequence[str] = ()
) -> SecureBroker:
    """Certificates from gen-dev-certs.sh, the password file from make-passwd.sh (plus the
    observer), the committed ACL (plus the observer), the committed configuration. ``env``: the
    accounts' passwords by variable (fresh ones by default). ``more_devices``: further device
    accounts (pump serials) in the password file, as a deployment adds them; the committed ACL
    covers them without a line of their own."""
    env = env or account_secrets_env()
    tmp.mkdir(parents=True, exist_ok=True)
    certs = generate_certs(tmp / "certs")
    passwd = tmp / "auth" / "passwd"
    make_password_file(passwd, env)
    passwords = {account: env[name] for account, name in ACCOUNT_SECRETS.items()}
    for account in (OBSERVER, *more_devices):
        passwords[account] = secrets.token_urlsafe(12)
        subprocess.run(
            ["mosquitto_passwd", "-b", str(passwd), account, passwords[account]],
            check=True,
            capture_output=True,
        )
    acl = tmp / "acl"
    acl.write_text(
        (SECURE_DIR / "acl").read_text() + f"\n# observer only\nuser {OBSERVER}\ntopic read #\n"
    )
    data = tmp / "data"
    data.mkdir(exist_ok=True)
    plain_port, tls_port = free_port(), free_port()
    config = tmp / "mosquitto.conf"
    config.write_text(
        secure_config(
            plain_port=plain_port, tls_port=tls_port, certs=certs, passwd=passwd, acl=acl, data=data
        )
    )
    return SecureBroker(plain_port, tls_port, certs / "ca.crt", passwords, data, config).start()


class ConnectionRefused(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class MqttClient:
    """A paho client whose results are waited for: connect, subscribe (SUBACK reason codes),
    publish (PUBACK), and the messages received."""

    def __init__(self, protocol: MQTTProtocolVersion) -> None:
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"lab-{uuid.uuid4().hex[:10]}",
            protocol=protocol,
        )
        self.protocol = protocol
        self.messages: list[tuple[str, bytes]] = []
        self.suback: dict[int, list[ReasonCode]] = {}
        self.puback: dict[int, ReasonCode] = {}
        self._changed = threading.Condition()
        self._connack: ReasonCode | None = None
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message

    def connect(self, host: str, port: int) -> None:
        try:
            self.client.connect(host, port, keepalive=30)
        except (OSError, ssl.SSLError) as exc:
            raise ConnectionRefused(f"{type(exc).__name__}: {exc}") from exc
        self.client.loop_start()
        reason = self._wait(lambda: self._connack, "CONNACK")
        if reason.is_failure:
            self.disconnect()
            raise ConnectionRefused(str(reason))

    def subscribe(self, topic: str, qos: int = 1) -> list[ReasonCode]:
        _, mid = self.client.subscribe(topic, qos)
        if mid is None:
            raise ConnectionRefused(f"SUBSCRIBE {topic} was not sent")
        reasons: list[ReasonCode] = self._wait(lambda: self.suback.get(mid), f"SUBACK {topic}")
        return reasons

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> ReasonCode:
        info = self.client.publish(topic, payload, qos=qos)
        reason: ReasonCode = self._wait(lambda: self.puback.get(info.mid), f"PUBACK {topic}")
        return reason

    def publish_many(
        self, messages: Sequence[tuple[str, bytes]], qos: int = 1, timeout_s: float = 60.0
    ) -> list[ReasonCode]:
        """Publish in order, a thousand at a time without waiting for each PUBACK (paho keeps
        its window in flight); every PUBACK's reason code, in the same order."""
        reasons: list[ReasonCode] = []
        for start in range(0, len(messages), 1000):
            chunk = messages[start : start + 1000]
            mids = [self.client.publish(topic, payload, qos=qos).mid for topic, payload in chunk]
            self._wait(
                lambda mids=mids: True if all(mid in self.puback for mid in mids) else None,
                f"{len(mids)} PUBACKs",
                timeout_s,
            )
            reasons += [self.puback.pop(mid) for mid in mids]
        return reasons

    def wait_messages(self, count: int, timeout_s: float = 15.0) -> list[tuple[str, bytes]]:
        self._wait(lambda: len(self.messages) >= count or None, f"{count} messages", timeout_s)
        return list(self.messages)

    def disconnect(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _wait(self, value: Any, what: str, timeout_s: float = 15.0) -> Any:
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while (found := value()) is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no {what} within {timeout_s} s")
                self._changed.wait(remaining)
        return found

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._connack = reason
        self._notify()

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        self.suback[mid] = reasons
        self._notify()

    def _on_publish(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self.puback[mid] = reason
        self._notify()

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        with self._changed:
            self.messages.append((message.topic, bytes(message.payload)))
            self._changed.notify_all()
