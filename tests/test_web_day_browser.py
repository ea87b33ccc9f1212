"""The nurse's clinic day in a real browser: Playwright driving Debian's Chromium (headless)
against ``pumpwatch api`` as a process. She signs in with email and password, finds a patient,
claims a pump with the code its programmer shows and assigns it, books the refill visit, records
a refill with a discrepancy and reads the verdict, and signs out; a nurse of another clinic sees
none of it. The new pump's reading and the claim event its programmer sends arrive over MQTT
(a real Mosquitto) through ``pumpwatch ingest``. Screenshots at 1366 px go to
``$PUMPWATCH_ARTIFACTS_DIR`` (default ``artifacts/``); the README's clinic guide shows copies of
them (docs/screenshots/)."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import asyncpg
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from lab.embedded import EmbeddedBroker, start_mosquitto
from services.api import passwords
from services.storage.database import prepare_connection
from tests import alert_fixtures as fx
from tests.api_support import api_process, scratch_database
from tests.support import IngestProcess, encode, fetch, telemetry, wait_for_count
from tests.test_ingest import publish
from tests.test_web import ARTIFACTS, CHROMIUM, _patient

PASSWORD = "harbour lantern walnut 64"
NURSE_A, NURSE_B = "nora@north.example", "sam@south.example"
NEW_SERIAL, CODE = "NGPDAYNEW7", "Q4T8ZK"
BERLIN = ZoneInfo("Europe/Berlin")


@dataclass
class Seeded:
    base: str
    ada: str
    ben: str
    url: str = ""
    broker: EmbeddedBroker | None = None


async def _seed(url: str) -> Seeded:
    conn = await asyncpg.connect(url)
    await prepare_connection(conn)
    try:
        a = await fx.clinic(conn, name="North", timezone="Europe/Berlin")
        b = await fx.clinic(conn, name="South", timezone="America/New_York")
        ada = await _patient(conn, a, "Ada Soon", mrn="MRN-A1", serial="NGPDAYA01", start_ml=18.5)
        await _patient(conn, a, "Eva Early", mrn="MRN-A3", serial="NGPDAYA03", start_ml=28.0)
        await _patient(conn, b, "Cy Other", mrn="MRN-B1", serial="NGPDAYB01", start_ml=30.0)
        ben = await fx.patient(conn, a, mrn="MRN-A2")
        await conn.execute(
            "UPDATE patients SET display_name = 'Ben Later' WHERE id = $1", uuid.UUID(ben)
        )
        await fx.rollup(conn)
        hashed = passwords.hash_password(PASSWORD)
        for email, name, home in ((NURSE_A, "Nora Nurse", a), (NURSE_B, "Sam South", b)):
            await conn.execute(
                "INSERT INTO users (email, display_name, role, clinic_id, password_hash, "
                "created_by) VALUES ($1, $2, 'clinician', $3, $4, 'test')",
                email,
                name,
                uuid.UUID(home),
                hashed,
            )
    finally:
        await conn.close()
    return Seeded("", ada, ben)


@pytest.fixture(scope="module")
def server(
    pg_admin_url: str, template_database: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Seeded]:
    logs = tmp_path_factory.mktemp("webday")
    broker = start_mosquitto(logs / "mosquitto")
    ingest = None
    try:
        with scratch_database(pg_admin_url, template_database, "pw_webday") as url:
            seeded = asyncio.run(_seed(url))
            ingest = IngestProcess(url, broker, logs / "ingest.log")
            ingest.start()
            with api_process(url, logs) as api:
                seeded.base, seeded.url, seeded.broker = api.base, url, broker
                yield seeded
            ingest.stop()
    finally:
        if ingest is not None:
            ingest.stop_quietly()
        broker.stop()
    errors = api.unhandled_errors()
    assert not errors, "\n".join(errors)


def _programmer_interrogates(server: Seeded) -> None:
    """The new pump's programmer reads it and shows a claim code: its reading and the claim
    event go over MQTT; ingest stores them (the pump appears, held by nobody)."""
    assert server.broker is not None
    now = datetime.now(UTC)
    claim = {
        "v": 1,
        "msg_id": str(uuid.uuid4()),
        "serial": NEW_SERIAL,
        "recorded_at": now.isoformat(),
        "source": {"kind": "clinician_programmer", "id": "CP-12", "firmware": "5.1"},
        "type": "claim",
        "claim": {"code": CODE, "expires_at": (now + timedelta(minutes=30)).isoformat()},
    }
    reading = telemetry(serial=NEW_SERIAL, volume_ml=38.0, source_id="CP-12", seq=None)
    publish(
        server.broker,
        [
            (f"pumps/{NEW_SERIAL}/telemetry", encode(reading)),
            (f"pumps/{NEW_SERIAL}/events", encode(claim)),
        ],
    )
    query = "SELECT count(*) FROM events WHERE type = 'claim'"
    # Playwright's own event loop runs on this thread: wait on another.
    with ThreadPoolExecutor(1) as pool:
        stored = pool.submit(asyncio.run, wait_for_count(server.url, query, 1)).result()
    if stored != 1:
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(
                asyncio.run, fetch(server.url, "SELECT topic, reason, detail FROM quarantine")
            ).result()
        raise AssertionError(f"ingest did not store the claim event; quarantined: {held}")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        found = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield found
        found.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1366, "height": 900}, locale="en-GB")
    found = context.new_page()
    yield found
    context.close()


def _shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def _sign_in(page: Page, base: str, email: str) -> None:
    page.goto(f"{base}/login")
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in", exact=True).click()
    expect(page.get_by_role("heading", name="Worklist")).to_be_visible()


def test_the_nurses_clinic_day(server: Seeded, page: Page) -> None:
    _sign_in(page, server.base, NURSE_A)

    # Find the patient.
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Patients").click()
    expect(page.get_by_role("heading", name="Patients", exact=True)).to_be_visible()
    expect(page.locator("#patients-table")).not_to_contain_text("Cy Other")
    _shot(page, "patients")
    page.get_by_label("Name or MRN").fill("mrn-a2")
    page.get_by_role("button", name="Search").click()
    rows = page.locator("#patients-table tbody tr")
    expect(rows).to_have_count(1)
    rows.get_by_role("link", name="Ben Later").click()
    expect(page.get_by_role("heading", name=re.compile("Ben Later"))).to_be_visible()
    expect(page.locator("main")).to_contain_text("No pump is registered")

    # Claim the new pump with its code and assign it to him: a wrong code first.
    _programmer_interrogates(server)
    page.get_by_role("link", name="Assign a pump").click()
    claim = page.locator("#claim-form")
    expect(claim.get_by_label("Patient")).to_have_value(server.ben)
    claim.get_by_label("Serial number").fill(NEW_SERIAL)
    claim.get_by_label("Claim code shown by the programmer").fill("AAAAAA")
    claim.get_by_role("button", name="Claim and assign").click()
    expect(page.locator("#assign-error")).to_contain_text("Claim code refused")
    claim = page.locator("#claim-form")
    claim.get_by_label("Claim code shown by the programmer").fill(CODE.lower())
    _shot(page, "assign")
    claim.get_by_role("button", name="Claim and assign").click()
    expect(page.get_by_role("heading", name=re.compile("Ben Later"))).to_be_visible()
    expect(page.get_by_role("heading", name=f"Pump {NEW_SERIAL}")).to_be_visible()

    # Book his visit on his page, in the clinic's zone.
    when = (datetime.now(BERLIN) + timedelta(days=5)).replace(hour=9, minute=30)
    booking = page.locator("#booking")
    expect(booking).to_contain_text("Date and time (Europe/Berlin)")
    booking.get_by_label(re.compile("Date and time")).fill(f"{when:%Y-%m-%dT%H:%M}")
    booking.get_by_role("button", name="Book visit").click()
    expect(page.locator("#booked-visit")).to_have_text(re.compile(f"{when:%Y-%m-%d} 09:30 CES?T"))
    _shot(page, "patient-booked")

    # From the worklist: Ada's visit, then her refill.
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Worklist").click()
    row = page.locator('#due-table tr[data-serial="NGPDAYA01"]')
    expect(row).to_contain_text("not booked")
    row.get_by_role("link", name="Book the visit for NGPDAYA01").click()
    expect(page.get_by_role("heading", name=re.compile("Refill visit"))).to_be_visible()
    expect(page.locator("#visit-deadline")).to_have_text(re.compile(r"CES?T \((worst case|low)"))
    tomorrow = (datetime.now(BERLIN) + timedelta(days=1)).replace(hour=14, minute=0)
    page.get_by_label(re.compile("Date and time")).fill(f"{tomorrow:%Y-%m-%dT%H:%M}")
    _shot(page, "visit")
    page.get_by_role("button", name="Book visit").click()
    row = page.locator('#due-table tr[data-serial="NGPDAYA01"]')
    expect(row).to_contain_text(f"{tomorrow:%Y-%m-%d} 14:00 CE")
    row.get_by_role("link", name="Record the refill for NGPDAYA01").click()

    # The guided refill: what should be left, what was withdrawn, what went in.
    expect(page.get_by_role("heading", name=re.compile("Refill — Ada Soon"))).to_be_visible()
    expect(page.locator("#expected-residual")).to_contain_text(re.compile(r"3\.\d mL"))
    expect(page.locator("#refill-deadline")).to_be_visible()
    page.get_by_label("Measured residual, mL").fill("0.5")
    expect(page.get_by_label("Drug")).to_have_value("baclofen")
    expect(page.get_by_label("Concentration, mcg/mL")).to_have_value("2000")
    page.get_by_label("Volume added, mL").fill("20")
    _shot(page, "refill")
    page.get_by_role("button", name="Record refill").click()
    verdict = page.locator("#verdict")
    expect(verdict.get_by_role("heading")).to_have_text("⚠ Discrepancy: less left than expected")
    expect(verdict).to_contain_text("pocket fill")
    expect(page.locator("#verdict-limits")).to_contain_text("2 mL for a 40 mL pump")
    expect(page.locator("#verdict-action")).to_contain_text("Action: check the patient")
    expect(page.locator("#new-low-alarm")).to_contain_text(re.compile(r"\d{4}-\d\d-\d\d"))
    _shot(page, "refill-verdict")
    page.get_by_role("link", name="Back to Ada Soon").click()
    expect(page.locator("#reservoir-chart g.refill.flagged")).to_have_count(1)

    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(re.compile(r"/login$"))


def test_a_nurse_of_another_clinic_sees_none_of_it(server: Seeded, page: Page) -> None:
    _sign_in(page, server.base, NURSE_B)
    expect(page.locator("main")).not_to_contain_text("Ada Soon")
    page.goto(f"{server.base}/patients?q=Ada")
    expect(page.locator("#no-patients")).to_be_visible()
    page.goto(f"{server.base}/patients")
    text = page.locator("main").inner_text()
    for private in ("Ada Soon", "Ben Later", "Eva Early", "NGPDAYA01", NEW_SERIAL):
        assert private not in text
    expect(page.locator("#patients-table")).to_contain_text("Cy Other")
    page.goto(f"{server.base}/pumps/assign")
    assert "NGPDAYA01" not in page.locator("main").inner_text()
    for path in ("/pumps/NGPDAYA01/visit", "/pumps/NGPDAYA01/refill", f"/patients/{server.ada}"):
        response = page.goto(f"{server.base}{path}")
        assert response is not None
        assert response.status == 404, path
        assert "Ada Soon" not in page.locator("main").inner_text()
