"""Servers started on demand for ``pumpwatch demo`` and the tests: PostgreSQL and an MQTT broker.

PostgreSQL comes from the ``pgserver`` package (real PostgreSQL binaries in a wheel). The broker
is ``mosquitto`` when it is on PATH, run with the project's limits
(``deploy/mosquitto/conf.d``); otherwise ``amqtt`` runs in this process — it speaks MQTT 3.1.1
only, so clients must then use protocol 3.1.1 without shared subscriptions.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from services.logs import get

log = get(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
MOSQUITTO_LIMITS_DIR = REPO_ROOT / "deploy" / "mosquitto" / "conf.d"


_HANDED_OUT: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port() -> int:
    """A port nothing listens on, for a server about to start. Chosen outside the kernel's
    ephemeral range: a port the kernel picks (binding to 0) can be taken by any process's
    outgoing connection between this check and the server's own bind ("address already in
    use"); below the range no connection takes it. Never the same port twice in a process."""
    low, _ = _ephemeral_range()
    candidates = range(10_000, max(low, 10_001))
    for _ in range(500):
        port = random.choice(candidates)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    with socket.socket() as sock:  # the range is crowded: let the kernel choose
        sock.bind(("127.0.0.1", 0))
        found: int = sock.getsockname()[1]
        return found


def port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


@dataclass
class EmbeddedPostgres:
    """A private PostgreSQL server, reachable through a Unix socket in its data directory."""

    data_dir: Path
    url: str
    _server: Any = field(repr=False)

    def stop(self) -> None:
        self._server.cleanup()


def start_postgres(data_dir: Path, database: str = "pumpwatch") -> EmbeddedPostgres:
    """Start (or reuse) the server in ``data_dir`` and make sure ``database`` exists."""
    logging.getLogger("pgserver").setLevel(logging.WARNING)  # initdb's chatter
    data_dir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI): harmless here.
        warnings.simplefilter("ignore")
        import pgserver

        server = pgserver.get_server(data_dir, cleanup_mode="stop")  # type: ignore[attr-defined]
    exists = server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{database}';")
    if "(1 row)" not in exists:
        server.psql(f"CREATE DATABASE {database} ENCODING 'UTF8' TEMPLATE template0;")
    url = server.get_uri(database)
    log.info("embedded_postgres_started", data_dir=str(data_dir))
    return EmbeddedPostgres(data_dir, url, server)


@dataclass
class EmbeddedBroker:
    url: str
    kind: Literal["mosquitto", "amqtt"]
    port: int
    _stop: Any = field(repr=False)
    pid: int = field(default_factory=os.getpid)
    """The broker's process (this one for amqtt)."""

    @property
    def supports_mqtt5(self) -> bool:
        return self.kind == "mosquitto"

    def stop(self) -> None:
        self._stop()


def mosquitto_config(port: int, data_dir: Path, *, persistence: bool = True) -> str:
    lines = [
        f"listener {port} 127.0.0.1",
        # Started as root, mosquitto drops to the "mosquitto" user, which could not write its
        # persistence file in our data directory: stay who we are.
        f"user {getpass.getuser()}",
        "allow_anonymous true",
        f"persistence {'true' if persistence else 'false'}",
        f"persistence_location {data_dir}/",
        "autosave_interval 60",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        f"include_dir {MOSQUITTO_LIMITS_DIR}",
    ]
    return "\n".join(lines) + "\n"


def start_mosquitto(data_dir: Path, port: int | None = None) -> EmbeddedBroker:
    """Run ``mosquitto`` as a child process on a free port with the project's limits."""
    binary = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    if binary is None:
        raise FileNotFoundError("mosquitto is not installed")
    if not MOSQUITTO_LIMITS_DIR.is_dir():
        raise FileNotFoundError(f"{MOSQUITTO_LIMITS_DIR} is missing: run from a pumpwatch checkout")
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    config = data_dir / "mosquitto.conf"
    config.write_text(mosquitto_config(port, data_dir))
    log_file = (data_dir / "mosquitto.log").open("ab")
    # Its own session: Ctrl-C in a terminal must not stop the broker before ingest has drained
    # and acknowledged; the owner stops it last.
    proc = subprocess.Popen(
        [binary, "-c", str(config)], stdout=log_file, stderr=log_file, start_new_session=True
    )
    deadline = time.monotonic() + 10
    while not port_open("127.0.0.1", port):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"mosquitto did not start; see {data_dir / 'mosquitto.log'}")
        time.sleep(0.02)

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log_file.close()

    return EmbeddedBroker(f"mqtt://127.0.0.1:{port}", "mosquitto", port, stop, proc.pid)


async def start_amqtt(port: int | None = None) -> EmbeddedBroker:
    """An in-process MQTT 3.1.1 broker on the running event loop."""
    from amqtt.broker import Broker

    port = port or free_port()
    broker = Broker(
        {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
    )
    await broker.start()
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task[None]] = []

    def stop() -> None:
        with contextlib.suppress(RuntimeError):
            stopping.append(loop.create_task(broker.shutdown()))

    return EmbeddedBroker(f"mqtt://127.0.0.1:{port}", "amqtt", port, stop)


def scratch_dir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))
