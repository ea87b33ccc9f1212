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
from typing import Any

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
    env: dict[str, str],
    data_dir: Path,
    log: Path,
    api_port: int | None = None,
    *extra: str,
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
                *extra,
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


def _printed(log: Path, pattern: str) -> str:
    found = re.search(pattern, log.read_text())
    assert found, log.read_text()
    return found.group(1)


def _stop(proc: subprocess.Popen[bytes], log: Path, sig: int = signal.SIGINT) -> None:
    proc.send_signal(sig)
    assert proc.wait(60) == 0, log.read_text()
    assert "demo stopped" in log.read_text()


def _nurse_token(api: str, log: Path) -> dict[str, str]:
    """The printed nurse signs in with her email and password."""
    email = _printed(log, r"nurse email\s+(\S+)")
    password = _printed(log, r"nurse password\s+(\S+)")
    signed = httpx.post(
        f"{api}/v1/auth/token", data={"username": email, "password": password}, timeout=30
    )
    assert signed.status_code == 200, signed.text
    return {"Authorization": f"Bearer {signed.json()['access_token']}"}


def _fleet(api: str, admin: dict[str, str]) -> tuple[list[str], list[dict[str, Any]]]:
    """Every clinic's name and every pump, as the administrator sees them."""
    clinics = httpx.get(f"{api}/v1/clinics", headers=admin, params={"limit": 200}, timeout=30)
    assert clinics.status_code == 200, clinics.text
    pumps: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = httpx.get(
            f"{api}/v1/pumps",
            headers=admin,
            params={"limit": 200} | ({"cursor": cursor} if cursor else {}),
            timeout=30,
        )
        assert page.status_code == 200, page.text
        pumps += page.json()["items"]
        cursor = page.json()["next_cursor"]
        if not cursor:
            break
    return sorted(c["name"] for c in clinics.json()["items"]), pumps


def _worklist_patient_links(api: str, log: Path, timeout_s: float = 120) -> set[str]:
    """The printed nurse signs in to the web dashboard; the patients her worklist links to
    (once the pumps' readings are there)."""
    email = _printed(log, r"nurse email\s+(\S+)")
    password = _printed(log, r"nurse password\s+(\S+)")
    with httpx.Client(base_url=api, timeout=30) as web:
        form = web.get("/login")
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
        assert csrf, form.text
        signed = web.post(
            "/login", data={"email": email, "password": password, "csrf_token": csrf[1]}
        )
        assert signed.status_code == 303, signed.text
        deadline = time.monotonic() + timeout_s
        while True:
            page = web.get("/", params={"within_days": 365})
            assert page.status_code == 200, page.text
            links = set(re.findall(r'href="/patients/([0-9a-f-]{36})"', page.text))
            if len(links) >= 2 or time.monotonic() > deadline:
                return links
            time.sleep(1)


_MQTT_DELIVERED = """
SELECT count(*) FROM deliveries d JOIN alerts a ON a.id = d.alert_id
WHERE d.channel = 'mqtt' AND d.status = 'delivered' AND a.rule = 'refill_discrepancy'
"""


def test_the_demo_runs_a_clinic_resumes_it_and_resets(tmp_path: Path) -> None:
    env = _clean_env()
    data = tmp_path / "data"
    log = tmp_path / "demo.log"
    api_port = _ports(1)[0]
    api = f"http://127.0.0.1:{api_port}"
    proc = _demo(env, data, log, api_port)
    try:
        _wait_for(log, "started embedded MQTT broker", proc, 120)
        _wait_for(log, "pumpwatch demo is running", proc, 60)
        _wait_for(log, "readings", proc, 60)  # the first status line, with stored readings
        key = _printed(log, r"admin key\s+(pw_\S+)")
        headers = {"Authorization": f"Bearer {key}"}
        assert httpx.get(f"{api}/v1/refills/due", headers=headers, timeout=10).status_code == 200
        pumps = httpx.get(f"{api}/v1/alerts", headers=headers, timeout=10)
        assert pumps.status_code == 200
        assert httpx.get(f"{api}/v1/alerts", timeout=10).status_code == 401
        nurse = _nurse_token(api, log)
        due = httpx.get(
            f"{api}/v1/refills/due", headers=nurse, params={"within_days": 365}, timeout=30
        )
        assert due.status_code == 200
        # The nurse's worklist links to her patients: the demo's pumps are assigned to them.
        assert len(_worklist_patient_links(api, log)) >= 2, log.read_text()
        # An unclaimed pump's programmer shows a claim code; the nurse claims the pump with it
        # for a patient she registers.
        _wait_for(log, "claim code ", proc, 120)
        serial = _printed(log, r"claim code\s+(\S+) shows")
        code = _printed(log, r"claim code\s+\S+ shows (\S+)")
        patient = httpx.post(
            f"{api}/v1/patients",
            headers=nurse,
            json={"mrn": "TEST-CLAIM-1", "display_name": "Claimed Patient"},
            timeout=30,
        )
        assert patient.status_code == 201, patient.text
        refused = httpx.put(
            f"{api}/v1/pumps/{serial}",
            headers=nurse,
            json={"patient_id": patient.json()["id"]},
            timeout=30,
        )
        assert refused.status_code == 403, refused.text  # not without the code
        claimed = httpx.put(
            f"{api}/v1/pumps/{serial}",
            headers=nurse,
            json={"patient_id": patient.json()["id"], "claim_code": code},
            timeout=30,
        )
        assert claimed.status_code == 200, claimed.text
        assert claimed.json()["patient_id"] == patient.json()["id"]
        # Once the history is in, the nurses have booked refill visits from their worklists.
        _wait_for(log, "visits booked ", proc, 120)
        due = httpx.get(
            f"{api}/v1/refills/due", headers=nurse, params={"within_days": 365}, timeout=30
        )
        assert any(i["refill_appointment_at"] for i in due.json()["items"]), due.text
        clinics, fleet = _fleet(api, headers)
        assert clinics == ["North spinal unit", "South pain clinic"]
        assert len(fleet) == 5
        held = sum(1 for p in fleet if p["patient_id"] is not None)
        assert held == 5  # four assigned by the demo, one claimed
        # Alert notifications go out on MQTT (clinics/{clinic_id}/alerts): the discrepancy
        # the demo's over-infusing pump shows at its refill is one of them.
        database = _printed(log, r"database\s+psql '([^']+)'")
        deadline = time.monotonic() + 120
        while not asyncio.run(fetchval(database, _MQTT_DELIVERED)):
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        # The readings one pump's hub lost on the way to the broker were asked for (resend),
        # resent by the simulated hub and stored: the gap was filled, not only flagged.
        _wait_for(log, "gap filled ", proc, 180)
        _stop(proc, log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    stored = [int(n.replace(",", "")) for n in re.findall(r"\] readings ([0-9,]+)", text)]
    assert stored
    assert stored[-1] > 0
    filled = re.search(r"gap filled\s+(\S+): hub readings seq (\d+) to (\d+)", text)
    assert filled, text
    assert int(filled.group(3)) - int(filled.group(2)) + 1 == 3
    state = data / "demo.json"
    assert state.stat().st_mode & 0o777 == 0o600

    # Started again on the same data directory: the same clinics, people, key and fleet.
    again = tmp_path / "again.log"
    proc = _demo(env, data, again, api_port)
    try:
        _wait_for(again, "pumpwatch demo is running", proc, 120)
        assert "resuming the demo" in again.read_text()
        for printed in (r"nurse email\s+(\S+)", r"nurse password\s+(\S+)", r"admin key\s+(\S+)"):
            assert _printed(again, printed) == _printed(log, printed)
        nurse = _nurse_token(api, again)
        clinics_again, fleet_again = _fleet(api, headers)
        assert clinics_again == clinics  # no second pair of clinics
        assert sorted(p["serial"] for p in fleet_again) == sorted(p["serial"] for p in fleet)
        patients = httpx.get(f"{api}/v1/patients", headers=nurse, params={"limit": 200})
        assert len(patients.json()["items"]) == 3  # two of the demo's and the one she added
        mine = httpx.get(f"{api}/v1/pumps/{serial}", headers=nurse, timeout=30)
        assert mine.status_code == 200, mine.text
        assert mine.json()["patient_id"] == patient.json()["id"]
        _stop(proc, again)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    # --reset starts afresh: a new fleet, new people's passwords, a new key.
    fresh = tmp_path / "fresh.log"
    proc = _demo(env, data, fresh, api_port, "--reset")
    try:
        _wait_for(fresh, "pumpwatch demo is running", proc, 120)
        text = fresh.read_text()
        assert "reset: removed" in text
        assert "resuming" not in text
        new_key = _printed(fresh, r"admin key\s+(pw_\S+)")
        assert new_key != key
        assert httpx.get(f"{api}/v1/alerts", headers=headers, timeout=10).status_code == 401
        admin = {"Authorization": f"Bearer {new_key}"}
        clinics_now, _ = _fleet(api, admin)
        assert clinics_now == clinics
        gone = httpx.get(f"{api}/v1/patients", headers=admin, params={"q": "TEST-CLAIM-1"})
        assert gone.status_code == 200
        assert gone.json()["items"] == []
        _nurse_token(api, fresh)
        _stop(proc, fresh)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


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
