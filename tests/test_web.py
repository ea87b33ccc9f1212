"""The clinic dashboard in a real browser: Playwright driving Debian's Chromium (headless)
against ``pumpwatch api`` as a process on a seeded database. Screenshots of each page go to
``$PUMPWATCH_ARTIFACTS_DIR`` (default ``artifacts/``)."""

from __future__ import annotations

import asyncio
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright
from pypdf import PdfReader

from services.api import keys, passwords
from services.api.web.chart import Chart, Point, RefillMark, render
from services.storage.database import prepare_connection
from tests import alert_fixtures as fx
from tests.api_support import api_process, scratch_database

CHROMIUM = "/usr/bin/chromium"
PASSWORD = "teal bicycle meadow 58"
NURSE_A, NURSE_B = "nora@north.example", "sam@south.example"
ARTIFACTS = Path(os.environ.get("PUMPWATCH_ARTIFACTS_DIR", "artifacts")) / "screenshots"


@dataclass
class Seeded:
    base: str
    clinician_a: str
    clinician_b: str
    fleet: str
    soon: str
    """Clinic A's patient who runs low first (open high alert)."""
    later: str
    other: str
    """Clinic B's patient."""
    high_alert: str


async def _patient(
    conn: asyncpg.Connection,
    clinic: str,
    name: str,
    *,
    mrn: str,
    serial: str,
    start_ml: float,
    early_rate: float = 0.25,
) -> str:
    """A patient of the clinic with a pump refilled 60 days ago, read every 6 h since at
    0.25 mL/day x 2000 mcg/mL (500 mcg/day); ``early_rate`` over the first 30 days (a dose
    titrated up to 500 mcg/day)."""
    patient = str(
        await conn.fetchval(
            "INSERT INTO patients (clinic_id, mrn, display_name) VALUES ($1, $2, $3) RETURNING id",
            uuid.UUID(clinic),
            mrn,
            name,
        )
    )
    await fx.pump(conn, serial, patient_id=patient)
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    refill_at = now - timedelta(days=60)
    await fx.reading(conn, serial, refill_at - timedelta(hours=6), volume_ml=3.0)
    await fx.refill_event(conn, serial, refill_at, residual_ml=1.5, added_ml=start_ml)
    for hours in range(60 * 24 - 6, -1, -6):
        volume = start_ml - 0.25 * (60 * 24 - hours) / 24
        await fx.reading(
            conn,
            serial,
            now - timedelta(hours=hours),
            volume_ml=round(volume, 3),
            rate_ml_per_day=early_rate if hours > 30 * 24 else 0.25,
        )
    return patient


async def _seed(url: str) -> tuple[Seeded, dict[str, str]]:
    conn = await asyncpg.connect(url)
    await prepare_connection(conn)
    try:
        a = await fx.clinic(conn, name="North")
        b = await fx.clinic(conn, name="South")
        soon = await _patient(
            conn, a, "Ada Soon", mrn="MRN-A1", serial="NGPWEBA01", start_ml=18.5, early_rate=0.2
        )
        later = await _patient(
            conn, a, "Ben Later", mrn="MRN-A2", serial="NGPWEBA02", start_ml=22.0
        )
        other = await _patient(conn, b, "Cy Other", mrn="MRN-B1", serial="NGPWEBB01", start_ml=30.0)
        high = await conn.fetchval(
            """INSERT INTO alerts (serial, rule, priority, status, title, detail, opened_at,
                   updated_at, condition_at)
               VALUES ('NGPWEBA01', 'reservoir_low', 'high', 'open',
                   'Reservoir at low alarm', 'Refill today.', now(), now(), now()) RETURNING id"""
        )
        await conn.execute(
            """INSERT INTO alerts (serial, rule, priority, status, title, detail, opened_at,
                   updated_at, condition_at)
               VALUES ('NGPWEBA02', 'dose_escalation', 'low', 'open',
                   'Dose up 55 % in 180 days', 'Review the titration.', now(), now(), now())"""
        )
        # One gap backfill gave up on (the fleet page lists it) and one still being asked for.
        await conn.execute(
            "INSERT INTO sequence_gaps (serial, source_id, first_missing, last_missing, state, "
            "before_at, after_at, unrecoverable_at) VALUES "
            "('NGPWEBB01', 'HUB-1', 40, 43, 'unrecoverable', '2026-11-20 08:00Z', "
            "'2026-11-20 09:15Z', now()), "
            "('NGPWEBA02', 'HUB-1', 7, 7, 'open', NULL, NULL, NULL)"
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
        made = {}
        for name, role, clinic in (
            ("a", "clinician", a),
            ("b", "clinician", b),
            ("fleet", "fleet", None),
        ):
            _, made[name] = await keys.create(
                conn,
                role=role,  # type: ignore[arg-type]
                clinic_id=None if clinic is None else uuid.UUID(clinic),
                label=f"web test {name}",
                created_by="test",
            )
    finally:
        await conn.close()
    seeded = Seeded("", made["a"], made["b"], made["fleet"], soon, later, other, str(high))
    return seeded, made


@pytest.fixture(scope="module")
def server(
    pg_admin_url: str, template_database: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Seeded]:
    with scratch_database(pg_admin_url, template_database, "pw_web") as url:
        seeded, _ = asyncio.run(_seed(url))
        with api_process(url, tmp_path_factory.mktemp("web")) as api:
            seeded.base = api.base
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
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    found = context.new_page()
    yield found
    context.close()


def _shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def _sign_in(page: Page, base: str, email: str, password: str = PASSWORD) -> None:
    page.goto(f"{base}/login")
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in", exact=True).click()


def _sign_in_with_key(page: Page, base: str, key: str) -> None:
    """Machines' way in (the fleet page for device teams)."""
    page.goto(f"{base}/login")
    page.get_by_text("sign in with an API key").click()
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in with the key").click()


def test_a_clinician_works_through_the_dashboard(server: Seeded, page: Page) -> None:
    page.goto(f"{server.base}/")
    expect(page).to_have_url(re.compile(r"/login$"))  # no session: sign in first
    _shot(page, "login")
    _sign_in(page, server.base, NURSE_A)
    expect(page.get_by_role("heading", name="Worklist")).to_be_visible()
    expect(page.locator(".who")).to_contain_text("Nora Nurse")  # she is signed in as herself
    cookie = next(c for c in page.context.cookies() if c["name"] == "pw_session")
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Strict"

    # Alerts: high first, said in words, not colour alone.
    rows = page.locator("#alerts-table tbody tr")
    expect(rows).to_have_count(2)
    expect(rows.nth(0)).to_contain_text("▲ High")
    expect(rows.nth(0)).to_contain_text("Reservoir at low alarm")
    expect(rows.nth(1)).to_contain_text("○ Low")
    # Refills due: the one that runs low first first; clinic B's patient is not there.
    due = page.locator("#due-table tbody tr")
    expect(due).to_have_count(2)
    expect(due.nth(0)).to_contain_text("Ada Soon")
    expect(due.nth(1)).to_contain_text("Ben Later")
    expect(page.locator("#due-table")).not_to_contain_text("Cy Other")
    _shot(page, "worklist")

    page.get_by_role("link", name="Ada Soon").click()
    expect(page.get_by_role("heading", name=re.compile("Ada Soon"))).to_be_visible()
    expect(page.get_by_role("heading", name="Therapy")).to_be_visible()
    expect(page.locator(".facts")).to_contain_text(["500 mcg/day"])
    chart = page.locator("#reservoir-chart svg")
    expect(chart).to_be_visible()
    expect(chart.locator("path.readings")).to_have_count(1)
    expect(chart.locator("path.projection")).to_have_count(1)
    expect(chart.locator("line.low-alarm")).to_have_count(1)
    expect(chart.locator("g.refill")).to_have_count(1)
    expect(chart.locator("text.forecast-label").first).to_contain_text("low alarm")
    assert len(chart.locator("path.projection").get_attribute("d") or "") > 20
    _shot(page, "patient")

    # Therapy and titration: the dose chart marks the change and its percentage; the
    # dose-escalation rule's signal is said in words.
    doses = page.locator("#dose-chart svg")
    expect(doses).to_be_visible()
    expect(doses.locator("g.dose-change")).to_have_count(1)
    expect(doses.locator("g.dose-change")).to_contain_text("+25%")
    expect(page.locator("#tolerance")).to_contain_text("Now 500 mcg/day")
    expect(page.locator("#tolerance")).to_contain_text("400 mcg/day")
    expect(page.locator("#therapy-table")).to_contain_text("+25%")
    # Print the report: the page (the browser prints it with its print stylesheet), its PDF.
    page.get_by_role("link", name="Print report").click()
    expect(page.get_by_role("heading", name="Patient report: Ada Soon")).to_be_visible()
    expect(page.locator("#report-dose")).to_have_text("500 mcg/day")
    expect(page.get_by_role("button", name="Print")).to_be_visible()
    _shot(page, "report")
    with page.expect_download() as downloading:
        page.get_by_role("link", name="Download PDF").click()
    download = downloading.value
    assert download.suggested_filename.endswith(".pdf")
    reader = PdfReader(download.path())
    text = "\n".join(p.extract_text() for p in reader.pages)
    for expected in ("Ada Soon", "MRN-A1", "500 mcg/day", "+25%", "18.5 mL", "Reservoir at low"):
        assert expected in text, (expected, text)
    assert "Ben Later" not in text
    page.get_by_role("link", name=re.compile("Back to the patient")).click()
    expect(page.get_by_role("heading", name=re.compile("Ada Soon"))).to_be_visible()

    alert = page.locator(f'li[data-alert="{server.high_alert}"]')
    expect(alert.locator(".status")).to_have_text("open")
    alert.get_by_role("button", name="Acknowledge").click()
    alert = page.locator(f'li[data-alert="{server.high_alert}"]')
    expect(alert.locator(".status")).to_have_text("acknowledged")
    expect(alert).to_contain_text("acknowledged by Nora Nurse")
    page.reload()  # it persisted
    expect(page.locator(f'li[data-alert="{server.high_alert}"] .status')).to_have_text(
        "acknowledged"
    )
    # The reservoir is still running low: resolving is refused, and the page says why.
    alert = page.locator(f'li[data-alert="{server.high_alert}"]')
    alert.get_by_label("Note").fill("refilled on the ward")
    alert.get_by_role("button", name="Resolve").click()
    refused = page.locator(f'li[data-alert="{server.high_alert}"] .refused')
    expect(refused).to_contain_text("the condition still holds")
    expect(page.locator(f'li[data-alert="{server.high_alert}"] .status')).to_have_text(
        "acknowledged"
    )
    _shot(page, "patient-resolve-refused")
    # The refill is recorded (the path a programmer's refill event takes): the condition ends.
    recorded = httpx.post(
        f"{server.base}/v1/pumps/NGPWEBA01/refills",
        headers={"Authorization": f"Bearer {server.clinician_a}"},
        json={
            "refill": {
                "residual_ml": 3.4,
                "added_ml": 20.0,
                "drug": "baclofen",
                "concentration_mcg_per_ml": 2000,
            }
        },
        timeout=30,
    )
    assert recorded.status_code == 201, recorded.text
    page.goto(f"{server.base}/patients/{server.soon}")  # not a reload: that would post again
    alert = page.locator(f'li[data-alert="{server.high_alert}"]')
    alert.get_by_label("Note").fill("refilled on the ward")
    alert.get_by_role("button", name="Resolve").click()
    expect(page.locator(f'li[data-alert="{server.high_alert}"] .status')).to_have_text("resolved")
    expect(page.locator(f'li[data-alert="{server.high_alert}"]')).to_contain_text(
        "refilled on the ward"
    )
    expect(page.locator(f'li[data-alert="{server.high_alert}"]')).to_contain_text(
        "resolved by Nora Nurse"
    )
    _shot(page, "patient-after-resolve")

    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(re.compile(r"/login$"))
    page.goto(f"{server.base}/patients/{server.soon}")
    expect(page).to_have_url(re.compile(r"/login$"))  # the session is gone


def test_another_clinic_cannot_open_the_patient_page(server: Seeded, page: Page) -> None:
    _sign_in(page, server.base, NURSE_B)
    expect(page.get_by_role("heading", name="Worklist")).to_be_visible()
    expect(page.locator("main")).not_to_contain_text("Ada Soon")
    response = page.goto(f"{server.base}/patients/{server.soon}")
    assert response is not None
    assert response.status == 404
    expect(page.locator("main")).not_to_contain_text("Ada Soon")
    _shot(page, "other-clinic-denied")
    for path in ("report", "report.pdf"):
        denied = page.request.get(f"{server.base}/patients/{server.soon}/{path}")
        assert denied.status == 404
        assert "Ada Soon" not in denied.text()
    # Her own patient's pump lost messages for good: the patient page says so.
    page.goto(f"{server.base}/patients/{server.other}")
    expect(page.locator("#unrecovered-gaps")).to_contain_text("4 messages lost for good")


def test_a_form_post_without_the_csrf_token_is_refused(server: Seeded, page: Page) -> None:
    _sign_in(page, server.base, NURSE_A)
    expect(page.get_by_role("heading", name="Worklist")).to_be_visible()
    target = f"{server.base}/patients/{server.later}/alerts/{uuid.uuid4()}/acknowledge"
    refused = page.request.post(target, form={"note": "x"})  # the session cookie, no token
    assert refused.status == 403
    wrong = page.request.post(target, form={"note": "x", "csrf_token": "guess"})
    assert wrong.status == 403
    logout = page.request.post(f"{server.base}/logout", form={}, max_redirects=0)
    assert logout.status == 403  # signing someone out needs the token too


def test_a_wrong_password_or_key_does_not_sign_in(server: Seeded, page: Page) -> None:
    _sign_in(page, server.base, NURSE_A, "not her password at all")
    expect(page.get_by_role("alert")).to_contain_text("Unknown email or wrong password")
    expect(page.get_by_label("Password")).to_have_value("")  # never echoed back
    assert not [c for c in page.context.cookies() if c["name"] == "pw_session"]
    _sign_in_with_key(page, server.base, "pw_not-a-key")
    expect(page.get_by_role("alert")).to_contain_text("Unknown or revoked key")
    assert not [c for c in page.context.cookies() if c["name"] == "pw_session"]


def test_the_fleet_page_is_de_identified(server: Seeded, page: Page) -> None:
    _sign_in_with_key(page, server.base, server.fleet)
    expect(page.get_by_role("heading", name="Fleet")).to_be_visible()
    expect(page.locator("#fleet-table")).to_contain_text("SynchroMed II 8637-40")
    text = page.locator("main").inner_text()
    for private in ("Ada Soon", "Ben Later", "Cy Other", "MRN-"):
        assert private not in text
    assert "3 pumps" in text
    # Messages lost for good, by serial (the open gap may yet be filled: not listed).
    expect(page.locator("#gaps")).to_be_visible()
    gaps = page.locator("#gaps-table tbody tr")
    expect(gaps).to_have_count(1)
    expect(gaps.first).to_contain_text("NGPWEBB01")
    expect(gaps.first).to_contain_text("2026-11-20 08:00 \u2013 2026-11-20 09:15")
    assert gaps.first.locator("td").nth(2).inner_text() == "4"
    assert "1 pump with messages lost for good: 4 messages" in text
    assert "NGPWEBA02" not in text
    _shot(page, "fleet")


def test_the_chart_is_an_accessible_svg_with_what_it_shows_in_words() -> None:
    start = datetime(2026, 9, 1, tzinfo=UTC)
    chart = Chart(
        readings=[Point(start + timedelta(days=d), 30 - d * 0.25) for d in range(60)],
        projection=[Point(start + timedelta(days=60 + d), 15 - d * 0.25) for d in range(61)],
        low_alarm_ml=2.0,
        capacity_ml=40.0,
        refills=[RefillMark(start + timedelta(days=10), "refill <script>", True)],
        low_alarm_at=start + timedelta(days=112),
        empty_at=start + timedelta(days=120),
        start=start,
        end=start + timedelta(days=125),
    )
    svg = render(chart)
    assert 'role="img"' in svg
    assert "projected to reach the low alarm on 2026-12-22" in svg
    assert "<script>" not in svg  # labels are escaped
    assert svg.count('class="refill flagged"') == 1
    assert "low alarm 2 mL" in svg


def test_a_clinician_snoozes_an_alert_within_the_contracts_limits(
    server: Seeded, page: Page
) -> None:
    _sign_in(page, server.base, NURSE_A)
    expect(page.get_by_role("heading", name="Worklist")).to_be_visible()
    page.goto(f"{server.base}/patients/{server.later}")
    alert = page.locator("li.alert-item").filter(has_text="Dose up 55")
    hours = alert.get_by_label("Snooze reminders for")
    # A low priority alert: up to 24 h (a high one: 4 h).
    expect(hours.locator("option")).to_have_text(["1 h", "2 h", "4 h", "8 h", "12 h", "24 h"])
    hours.select_option("4")
    alert.get_by_label("Reason for snoozing").fill("titration review booked")
    alert.get_by_role("button", name="Snooze").click()
    alert = page.locator("li.alert-item").filter(has_text="Dose up 55")
    expect(alert).to_contain_text("reminders snoozed until")
    expect(alert).to_contain_text("by Nora Nurse (titration review booked)")
    expect(alert.locator(".status")).to_have_text("open")  # never silenced
    alert.locator("summary", has_text="History").click()
    expect(alert.locator(".alert-history")).to_contain_text("snoozed by Nora Nurse")
    _shot(page, "patient-snoozed")
    # Beyond the contract's limit (a form sent by hand): refused, in words, beside the alert.
    token = page.locator('input[name="csrf_token"]').first.get_attribute("value")
    alert_id = alert.get_attribute("data-alert")
    refused = page.request.post(
        f"{server.base}/patients/{server.later}/alerts/{alert_id}/snooze",
        form={"csrf_token": token or "", "hours": "30", "note": "longer"},
    )
    assert refused.status == 422
    assert "at most 24 h ahead for a low priority alert" in refused.text()
    nothing = page.request.post(
        f"{server.base}/patients/{server.later}/alerts/{alert_id}/snooze",
        form={"csrf_token": token or "", "hours": "2", "note": " "},
    )
    assert nothing.status == 422
    assert "write a note" in nothing.text()
    # Durations no clock can add (they were a 500): refused in words like any other.
    for given in ("nan", "inf", "1e9"):
        absurd = page.request.post(
            f"{server.base}/patients/{server.later}/alerts/{alert_id}/snooze",
            form={"csrf_token": token or "", "hours": given, "note": "why"},
        )
        assert absurd.status == 422, (given, absurd.status)
        assert "choose how long to snooze the reminders" in absurd.text()


DOCS_SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"


@pytest.mark.parametrize("width", [390, 1366])
def test_the_worklist_and_patient_page_fit_a_phone_and_a_desktop(
    server: Seeded, browser: Browser, width: int
) -> None:
    """No horizontal scrolling at 390 px (tables become cards, the discrepancy opens on a tap);
    the screenshots the README shows."""
    phone = width < 500
    context = browser.new_context(
        viewport={"width": width, "height": 844 if phone else 900},
        has_touch=phone,
        is_mobile=phone,
    )
    page = context.new_page()
    try:
        _sign_in(page, server.base, NURSE_A)
        expect(page.get_by_role("heading", name="Worklist")).to_be_visible()
        expect(page.locator("#due-table")).to_contain_text("Ben Later")
        wide = page.evaluate("document.documentElement.scrollWidth")
        assert wide <= width, f"the worklist is {wide} px wide at {width} px"
        DOCS_SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(DOCS_SCREENSHOTS / f"worklist-{width}.png"), full_page=True)
        page.goto(f"{server.base}/patients/{server.soon}")
        expect(page.locator("#dose-chart svg")).to_be_visible()
        wide = page.evaluate("document.documentElement.scrollWidth")
        assert wide <= width, f"the patient page is {wide} px wide at {width} px"
        discrepancy = page.locator("details.discrepancy").first
        expect(discrepancy.locator("p")).not_to_be_visible()
        if phone:
            discrepancy.locator("summary").tap()
        else:
            discrepancy.locator("summary").click()
        expect(discrepancy.locator("p")).to_be_visible()
        expect(discrepancy.locator("p")).to_contain_text("Limit")
        assert page.evaluate("document.documentElement.scrollWidth") <= width
        page.screenshot(path=str(DOCS_SCREENSHOTS / f"patient-{width}.png"), full_page=True)
    finally:
        context.close()
