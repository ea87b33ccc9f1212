"""``pumpwatch demo``, README's first command: on embedded servers and on configured ones."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from lab.embedded import EmbeddedBroker, free_port
from tests.support import fetchval


def _ports(count: int) -> list[int]:
    found: list[int] = []
    while len(found) < count:
        port = free_port()
        if port not in found:
            found.append(port)
    return found


def _demo(
    env: dict[str, str], data_dir: Path, log: Path, api_port: int | None = None
) -> subprocess.Popen[bytes]:
    ingest_port, alerts_port, free_api_port = _ports(3)
    with log.open("wb") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "services",
                "demo",
                "--pumps",
                "5",
                "--backfill-days",
                "3",
                "--metrics-port",
                str(ingest_port),
                "--alerts-metrics-port",
                str(alerts_port),
                "--port",
                str(api_port or free_api_port),
                "--data-dir",
                str(data_dir),
            ],
            env=env,
            stdout=out,
            stderr=out,
        )


def _wait_for(log: Path, text: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise AssertionError(f"demo exited with {proc.returncode}:\n{log.read_text()}")
        time.sleep(0.2)
    raise AssertionError(f"no {text!r} after {timeout_s} s:\n{log.read_text()[-3000:]}")


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PUMPWATCH_")}


def test_the_demo_runs_on_embedded_servers_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    log = tmp_path / "demo.log"
    api_port = _ports(1)[0]
    proc = _demo(_clean_env(), tmp_path / "data", log, api_port)
    try:
        _wait_for(log, "started embedded MQTT broker", proc, 120)
        _wait_for(log, "pumpwatch demo is running", proc, 60)
        _wait_for(log, "readings", proc, 60)  # the first status line, with stored readings
        key = re.search(r"admin key\s+(pw_\S+)", log.read_text())
        assert key, log.read_text()
        headers = {"Authorization": f"Bearer {key.group(1)}"}
        api = f"http://127.0.0.1:{api_port}"
        assert httpx.get(f"{api}/v1/refills/due", headers=headers, timeout=10).status_code == 200
        pumps = httpx.get(f"{api}/v1/alerts", headers=headers, timeout=10)
        assert pumps.status_code == 200
        assert httpx.get(f"{api}/v1/alerts", timeout=10).status_code == 401
        # The printed nurse signs in with her email and password.
        email = re.search(r"nurse email\s+(\S+)", log.read_text())
        password = re.search(r"nurse password\s+(\S+)", log.read_text())
        assert email, log.read_text()
        assert password, log.read_text()
        signed = httpx.post(
            f"{api}/v1/auth/token",
            data={"username": email.group(1), "password": password.group(1)},
            timeout=30,
        )
        assert signed.status_code == 200, signed.text
        nurse = {"Authorization": f"Bearer {signed.json()['access_token']}"}
        assert httpx.get(f"{api}/v1/refills/due", headers=nurse, timeout=30).status_code == 200
        # The readings one pump's hub lost on the way to the broker were asked for (resend),
        # resent by the simulated hub and stored: the gap was filled, not only flagged.
        _wait_for(log, "gap filled ", proc, 180)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "demo stopped" in text
    stored = [int(n.replace(",", "")) for n in re.findall(r"\] readings ([0-9,]+)", text)]
    assert stored
    assert stored[-1] > 0
    filled = re.search(r"gap filled\s+(\S+): hub readings seq (\d+) to (\d+)", text)
    assert filled, text
    assert int(filled.group(3)) - int(filled.group(2)) + 1 == 3


def test_the_demo_uses_the_configured_servers(
    database_url: str, broker: EmbeddedBroker, tmp_path: Path
) -> None:
    env = _clean_env() | {"PUMPWATCH_DATABASE_URL": database_url, "PUMPWATCH_MQTT_URL": broker.url}
    if not broker.supports_mqtt5:
        env |= {"PUMPWATCH_MQTT_PROTOCOL": "3.1.1", "PUMPWATCH_MQTT_SHARE_GROUP": ""}
    log = tmp_path / "demo.log"
    proc = _demo(env, tmp_path / "data", log)
    try:
        _wait_for(log, "pumpwatch demo is running", proc, 60)
        deadline = time.monotonic() + 60
        while asyncio.run(fetchval(database_url, "SELECT count(*) FROM readings")) == 0:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "embedded" not in text  # neither server was started
    assert not (tmp_path / "data").exists()
