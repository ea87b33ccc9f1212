"""What Mosquitto's persistence settings cost: one message stream through the broker under each.

``python -m lab.bench.persistence [--messages N] [--pumps P] [--scenario queued|flowing]``
publishes the same simulated QoS 1 stream to a fresh mosquitto per setting and per scenario, and
reports the publish rate, the broker's CPU per message (utime + stime from ``/proc``) and the
bytes it wrote (``wchar`` from ``/proc/<pid>/io``: sockets and files; the excess over the
``off`` setting in the same scenario is its persistence file, whatever the file system):

- settings: ``off`` (no persistence), ``deploy`` (the persistence lines of
  ``deploy/mosquitto/secure/mosquitto.conf``, read from the file), and tighter autosaves
  (``autosave_on_changes true`` with a count: the whole database is rewritten after that many
  changes) and shorter time-based ones;
- scenarios: ``queued`` (ingest's persistent session is offline, so every message stays queued,
  as during an ingest outage: what a broker crash would lose) and ``flowing`` (a subscriber
  acknowledges as the messages come, as in normal operation).

The broker is SIGKILLed after each run (a clean stop would save once more, which is not the cost
of running). Figures depend on the host: say how busy it was next to them.
"""

from __future__ import annotations

import argparse
import getpass
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from rich.console import Console
from rich.table import Table

from lab.embedded import MOSQUITTO_LIMITS_DIR, free_port, port_open
from lab.sim.fleet import Fleet
from lab.sim.outgoing import Outgoing
from lab.sim.publisher import publish_all
from services.settings import parse_mqtt_url

DEPLOY_CONFIG = Path(__file__).resolve().parents[2] / "deploy/mosquitto/secure/mosquitto.conf"
_PERSISTENCE_KEYS = ("persistence", "autosave_interval", "autosave_on_changes")
TIGHTER = (1000, 100)
"""``autosave_on_changes true`` with these counts."""
TIGHTER_INTERVALS_S = (5, 1)
"""``autosave_interval`` of these seconds (time-based, as deployed but shorter)."""


@dataclass(frozen=True)
class Result:
    setting: str
    scenario: str
    messages: int
    elapsed_s: float
    cpu_s: float
    written_bytes: int

    @property
    def rate(self) -> float:
        return self.messages / self.elapsed_s

    @property
    def cpu_us_per_msg(self) -> float:
        return self.cpu_s * 1e6 / self.messages


def deploy_settings(path: Path = DEPLOY_CONFIG) -> list[str]:
    """The persistence lines of the production broker's configuration."""
    lines = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line.split(" ", 1)[0] in _PERSISTENCE_KEYS:
            lines.append(line)
    return lines


def settings() -> dict[str, list[str]]:
    found = {"off": ["persistence false"], "deploy": deploy_settings()}
    for count in TIGHTER:
        found[f"on_changes {count}"] = [
            "persistence true",
            "autosave_on_changes true",
            f"autosave_interval {count}",
        ]
    for seconds in TIGHTER_INTERVALS_S:
        found[f"every {seconds} s"] = ["persistence true", f"autosave_interval {seconds}"]
    return found


def stream(messages: int, pumps: int) -> list[Outgoing]:
    fleet = Fleet(pumps=pumps, seed=1, start=datetime.now(UTC) - timedelta(days=60))
    return fleet.take(messages)


def run_one(
    setting: str, lines: Sequence[str], scenario: str, messages: Sequence[Outgoing], work: Path
) -> Result:
    data = work / f"{setting.replace(' ', '-')}-{scenario}"
    data.mkdir(parents=True)
    port = free_port()
    config = data / "mosquitto.conf"
    config.write_text(
        "\n".join(
            [
                f"listener {port} 127.0.0.1",
                # Started as root, mosquitto would drop to the "mosquitto" user and fail to
                # write its persistence file here (silently, but for its log): stay who we are.
                f"user {getpass.getuser()}",
                "allow_anonymous true",
                *lines,
                f"persistence_location {data}/",
                "log_dest stderr",
                "log_type error",
                f"include_dir {MOSQUITTO_LIMITS_DIR}",
            ]
        )
        + "\n"
    )
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    broker = subprocess.Popen([binary, "-c", str(config)], stderr=(data / "log").open("wb"))
    try:
        deadline = time.monotonic() + 10
        while not port_open("127.0.0.1", port):
            if broker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mosquitto did not start: {(data / 'log').read_text()}")
            time.sleep(0.02)
        ingest = _Ingest(port)
        if scenario == "queued":
            ingest.leave()  # its session stays: the broker queues everything for it
        before_cpu, before_written = _cpu_s(broker.pid), _written(broker.pid)
        started = time.monotonic()
        publish_all(
            parse_mqtt_url(f"mqtt://127.0.0.1:{port}"),
            messages,
            client_id="persistence-bench",
            protocol="3.1.1",
        )
        if scenario == "flowing":
            ingest.wait_for(len(messages))
        elapsed = time.monotonic() - started
        result = Result(
            setting,
            scenario,
            len(messages),
            elapsed,
            _cpu_s(broker.pid) - before_cpu,
            _written(broker.pid) - before_written,
        )
        if scenario == "flowing":
            ingest.leave()
        return result
    finally:
        broker.send_signal(signal.SIGKILL)
        broker.wait()
        shutil.rmtree(data, ignore_errors=True)


class _Ingest:
    """A persistent QoS 1 session on the telemetry and events topics, as ingest has."""

    def __init__(self, port: int) -> None:
        self.received = 0
        self._lock = threading.Lock()
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id="persistence-bench-ingest",
            clean_session=False,
            protocol=paho.MQTTv311,
        )
        self._client.on_message = self._on_message
        subscribed = threading.Event()
        self._client.on_subscribe = lambda *args: subscribed.set()
        self._client.connect("127.0.0.1", port)
        self._client.loop_start()
        self._client.subscribe([("pumps/+/telemetry", 1), ("pumps/+/events", 1)])
        if not subscribed.wait(10):
            raise RuntimeError("the bench's ingest session could not subscribe")

    def _on_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.received += 1

    def wait_for(self, count: int, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.received < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.received} of {count} messages delivered")
            time.sleep(0.01)

    def leave(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _written(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    return 0


def run(messages: int, pumps: int, scenarios: Sequence[str], console: Console) -> list[Result]:
    stream_ = stream(messages, pumps)
    mean = sum(len(m.payload) for m in stream_) / len(stream_)
    console.print(
        f"{len(stream_):,} QoS 1 messages from {pumps:,} simulated pumps, {mean:.0f} bytes mean; "
        f"mosquitto {_version()}; deploy settings: {'; '.join(deploy_settings())}"
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="pumpwatch-persistence-") as tmp:
        for scenario in scenarios:
            for setting, lines in settings().items():
                results.append(run_one(setting, lines, scenario, stream_, Path(tmp)))
                console.print(_row_text(results[-1]))
    table = Table(
        "scenario", "setting", "msg/s", "broker CPU µs/msg", "written", "persistence writes"
    )
    off = {r.scenario: r.written_bytes for r in results if r.setting == "off"}
    for r in results:
        table.add_row(
            r.scenario,
            r.setting,
            f"{r.rate:,.0f}",
            f"{r.cpu_us_per_msg:.1f}",
            f"{r.written_bytes / 1e6:,.1f} MB",
            f"{(r.written_bytes - off.get(r.scenario, 0)) / 1e6:,.1f} MB",
        )
    console.print(table)
    return results


def _row_text(r: Result) -> str:
    return (
        f"  {r.scenario:<8} {r.setting:<16} {r.rate:>8,.0f} msg/s  "
        f"{r.cpu_us_per_msg:6.1f} µs/msg  {r.written_bytes / 1e6:8.1f} MB written"
    )


def _version() -> str:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    out = subprocess.run([binary, "-h"], capture_output=True, text=True, check=False).stdout
    return out.splitlines()[0].split()[-1] if out else "unknown"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--pumps", type=int, default=1_000)
    parser.add_argument(
        "--scenario", action="append", choices=("queued", "flowing"), help="default: both"
    )
    args = parser.parse_args(argv)
    run(args.messages, args.pumps, args.scenario or ("queued", "flowing"), Console())


if __name__ == "__main__":
    main()
