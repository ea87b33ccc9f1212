"""Clinic settings in a real browser: Playwright driving Debian's Chromium (headless) against
``pumpwatch api`` as a process. The clinic administrator signs in, invites a nurse, changes an
alert threshold and adds a webhook; then the settings pages and the clinic-day pages must fit a
390 px phone screen without sideways scrolling. A 1366 px screenshot of the settings page goes
to ``$PUMPWATCH_ARTIFACTS_DIR`` (default ``artifacts/``); the README shows a copy of it
(docs/screenshots/settings.png)."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import asyncpg
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from services.api import passwords
from services.storage.database import prepare_connection
from tests import alert_fixtures as fx
from tests.api_support import api_process, scratch_database
from tests.test_web import ARTIFACTS, CHROMIUM, _patient

PASSWORD = "meadow lantern harbour 29"
ANN = "ann@north.example"
SERIAL = "NGPSETA01"


@dataclass
class Seeded:
    base: str
    ada: str
    url: str = ""


async def _seed(url: str) -> Seeded:
    conn = await asyncpg.connect(url)
    await prepare_connection(conn)
    try:
        a = await fx.clinic(conn, name="North Spinal Unit", timezone="Europe/Berlin")
        ada = await _patient(conn, a, "Ada Soon", mrn="MRN-A1", serial=SERIAL, start_ml=18.5)
        await fx.rollup(conn)
        hashed = passwords.hash_password(PASSWORD)
        for email, name, role in (
            (ANN, "Ann Admin", "clinic_admin"),
            ("nora@north.example", "Nora Nurse", "clinician"),
        ):
            await conn.execute(
                "INSERT INTO users (email, display_name, role, clinic_id, password_hash, "
                "created_by) VALUES ($1, $2, $3, $4, $5, 'test')",
                email,
                name,
                role,
                uuid.UUID(a),
                hashed,
            )
    finally:
        await conn.close()
    return Seeded("", ada)


@pytest.fixture(scope="module")
def server(
    pg_admin_url: str, template_database: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Seeded]:
    logs = tmp_path_factory.mktemp("websettings")
    with scratch_database(pg_admin_url, template_database, "pw_websettings") as url:
        seeded = asyncio.run(_seed(url))
        with api_process(url, logs) as api:
            seeded.base, seeded.url = api.base, url
            yield seeded
    errors = api.unhandled_errors()
    assert not errors, "\n".join(errors)


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


def test_the_clinic_admin_invites_sets_a_threshold_and_adds_a_webhook(
    server: Seeded, page: Page
) -> None:
    page.goto(f"{server.base}/login")
    page.get_by_label("Email").fill(ANN)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in", exact=True).click()
    expect(page.get_by_role("heading", name="Worklist")).to_be_visible()

    page.get_by_role("navigation", name="Main").get_by_role("link", name="Clinic settings").click()
    expect(page.get_by_role("heading", name=re.compile("Clinic settings"))).to_be_visible()
    expect(page.locator("#people-table")).to_contain_text("Nora Nurse")
    invite = page.locator("#invite")
    invite.get_by_label("Name").fill("Nina Nurse")
    invite.get_by_label("Email").fill("nina@north.example")
    invite.get_by_label("Role").select_option("clinician")
    invite.get_by_role("button", name="Invite").click()
    expect(page.locator("#invitation-url")).to_contain_text("/set-password/")
    expect(page.locator("#people-table")).to_contain_text("nina@north.example")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "settings.png"), full_page=True)

    sections = page.get_by_role("navigation", name="Settings sections")
    sections.get_by_role("link", name="Alert thresholds").click()
    page.get_by_label("Refill due: low priority, days").fill("21")
    page.get_by_role("button", name="Save thresholds").click()
    expect(page.locator("#settings-notice")).to_have_text("The alert thresholds are saved.")
    expect(page.get_by_label("Refill due: low priority, days")).to_have_value("21")

    sections = page.get_by_role("navigation", name="Settings sections")
    sections.get_by_role("link", name="Webhooks").click()
    page.get_by_label("URL").fill("https://ehr.north.example/hooks/pumpwatch")
    page.get_by_label("refill.recorded").check()
    page.get_by_role("button", name="Add webhook").click()
    expect(page.locator("#secret-value")).to_contain_text("whsec_")
    expect(page.locator("#webhooks-table")).to_contain_text("refill.recorded")

    # A phone's width: nothing scrolls sideways (settings and the clinic's day).
    page.set_viewport_size({"width": 390, "height": 844})
    paths = [
        "/settings/users",
        "/settings/alerts",
        "/settings/notifications",
        "/settings/webhooks",
        "/patients",
        "/pumps/assign",
        f"/pumps/{SERIAL}/visit",
        f"/pumps/{SERIAL}/refill",
    ]
    wide = {}
    for path in paths:
        response = page.goto(f"{server.base}{path}")
        assert response is not None
        assert response.status == 200, path
        width = page.evaluate("document.documentElement.scrollWidth")
        if width > 390:
            wide[path] = width
    assert wide == {}, f"wider than a 390 px screen: {wide}"
