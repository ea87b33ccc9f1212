"""The patient report (`GET /v1/patients/{id}/report`, contract 1.1 "Exports"): HTML and PDF
(read back with pypdf), the period's checks, custody (a moved pump's earlier holder's period
is not in the new clinic's report), the fleet role refused, the read audited."""

from __future__ import annotations

import io
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from pypdf import PdfReader

from services.api.web.dose_chart import Dose, render
from tests import alert_fixtures as fx
from tests.api_support import ADMIN_TOKEN, Api, running_api

SERIAL = "NGPREP0001"


@dataclass
class Seeded:
    api: Api
    nurse_a: str
    nurse_b: str
    fleet: str
    rosa: str
    bea: str
    moved_at: datetime


async def _day(conn: object, days_ago: float, **values: float) -> None:
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    await fx.reading(conn, SERIAL, now - timedelta(days=days_ago), **values)  # type: ignore[arg-type]


@pytest.fixture
async def seeded(database_url: str) -> AsyncIterator[Seeded]:
    async with running_api(database_url) as api:
        conn = await api.conn()
        try:
            a = await fx.clinic(conn, name="North spinal unit", timezone="Europe/Berlin")
            b = await fx.clinic(conn, name="South pain clinic", timezone="America/New_York")
            rosa = str(
                await conn.fetchval(
                    "INSERT INTO patients (clinic_id, mrn, display_name) "
                    "VALUES ($1, 'MRN-REP-1', 'Rosa Report') RETURNING id",
                    uuid.UUID(a),
                )
            )
            bea = str(
                await conn.fetchval(
                    "INSERT INTO patients (clinic_id, mrn, display_name) "
                    "VALUES ($1, 'MRN-REP-2', 'Bea Other') RETURNING id",
                    uuid.UUID(b),
                )
            )
            await fx.pump(conn, SERIAL, patient_id=rosa)
            # Rosa's titration: 400, then 500 (+25 %), then 600 mcg/day (+20 %) on a new
            # concentration.
            for days in range(200, 150, -5):
                await _day(conn, days, rate_ml_per_day=0.2, volume_ml=30 - (200 - days) * 0.2)
            for days in range(150, 90, -5):
                await _day(conn, days, rate_ml_per_day=0.25, volume_ml=30 - (150 - days) * 0.25)
            for days in range(90, 10, -5):
                await _day(
                    conn,
                    days,
                    rate_ml_per_day=0.4,
                    concentration_mcg_per_ml=1500,
                    volume_ml=30 - (90 - days) * 0.3,
                )
            # From 40 days ago the same dose in periodic boluses: a change of mode alone.
            await conn.execute(
                "UPDATE readings SET infusion_mode = 'periodic_bolus' WHERE serial = $1 "
                "AND recorded_at > now() - interval '41 days'",
                SERIAL,
            )
            now = datetime.now(UTC)
            await fx.refill_event(conn, SERIAL, now - timedelta(days=120), residual_ml=5.0)
            # Far less left than expected: a discrepancy (over-delivery).
            await fx.refill_event(
                conn,
                SERIAL,
                now - timedelta(days=60),
                residual_ml=2.5,
                added_ml=21.0,
                expected_residual_ml=9.0,
            )
            alert = await conn.fetchval(
                """INSERT INTO alerts (serial, rule, priority, status, title, detail, opened_at,
                       updated_at, condition_at, resolved_at, resolution)
                   VALUES ($1, 'dose_escalation', 'low', 'resolved', 'Dose up 50 % in 180 days',
                       'detail', $2, $2, $2, $3, 'titration reviewed') RETURNING id""",
                SERIAL,
                now - timedelta(days=40),
                now - timedelta(days=30),
            )
            user = await conn.fetchval(
                "INSERT INTO users (email, display_name, role, clinic_id, created_by) "
                "VALUES ('nora@north.example', 'Nora Nurse', 'clinician', $1, 'test') "
                "RETURNING id",
                uuid.UUID(a),
            )
            await conn.execute(
                "INSERT INTO alert_history (alert_id, at, actor, action, from_status, to_status, "
                "from_priority, to_priority, reason) VALUES ($1, $2, $3, 'resolved', 'open', "
                "'resolved', 'low', 'low', 'titration reviewed')",
                alert,
                now - timedelta(days=30),
                f"user:{user}",
            )
            # The pump moves to clinic B's Bea ten days ago; her dose is 900 mcg/day.
            await conn.execute("UPDATE pumps SET patient_id = $2 WHERE serial = $1", SERIAL, bea)
            moved_at = now - timedelta(days=10)
            await conn.execute(
                "UPDATE pump_assignments SET until = $2 WHERE serial = $1 AND until IS NOT NULL",
                SERIAL,
                moved_at,
            )
            await conn.execute(
                "UPDATE pump_assignments SET since = $2 WHERE serial = $1 AND until IS NULL",
                SERIAL,
                moved_at,
            )
            for days in (8, 5, 2):
                await _day(conn, days, rate_ml_per_day=0.45, volume_ml=15 - (8 - days) * 0.45)
            await fx.refill_event(conn, SERIAL, now - timedelta(days=3), residual_ml=13.0)
        finally:
            await conn.close()
        yield Seeded(
            api,
            await api.key("clinician", a),
            await api.key("clinician", b),
            await api.key("fleet"),
            rosa,
            bea,
            moved_at,
        )


def _pdf_text(content: bytes) -> str:
    reader = PdfReader(io.BytesIO(content))
    return "\n".join(page.extract_text() for page in reader.pages)


async def test_the_report_as_a_printable_page(seeded: Seeded) -> None:
    s = seeded
    answer = await s.api.call("GET", f"/v1/patients/{s.rosa}/report", s.nurse_a)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/html")
    page = answer.text
    assert "Rosa Report" in page
    assert "@media print" in page
    assert 'id="report-dose">600 mcg/day' in page
    assert "+25%" in page
    assert "+20%; concentration changed" in page  # 2000 to 1500 mcg/mL with the dose
    assert "1500 mcg/mL" in page
    assert "mode changed" in page
    assert "periodic_bolus" in page
    assert "over delivery" in page
    assert "pocket fill" in page  # the verdict, in words
    assert "Europe/Berlin" in page
    assert "Nora Nurse" in page  # the alert's history names who resolved it
    assert "<svg" in page
    assert "dose-change" in page
    # Not Bea's (the pump's next holder, another clinic): her dose and refill.
    assert "900 mcg/day" not in page
    assert "Bea Other" not in page


async def test_the_report_as_pdf_by_format_or_accept(seeded: Seeded) -> None:
    s = seeded
    by_format = await s.api.call(
        "GET", f"/v1/patients/{s.rosa}/report", s.nurse_a, params={"format": "pdf"}
    )
    by_accept = await s.api.call(
        "GET",
        f"/v1/patients/{s.rosa}/report",
        s.nurse_a,
        headers={"Accept": "application/pdf"},
    )
    for answer in (by_format, by_accept):
        assert answer.status_code == 200, answer.text
        assert answer.headers["content-type"] == "application/pdf"
        assert answer.content.startswith(b"%PDF-")
        text = _pdf_text(answer.content)
        assert "Rosa Report" in text
        assert "600 mcg/day" in text
        assert "+25%" in text
        assert "over delivery" in text
        assert "21 mL" in text  # the refill's added volume
        assert "Nora Nurse" in text
        assert "900 mcg/day" not in text


async def test_the_new_holder_sees_only_its_own_period(seeded: Seeded) -> None:
    s = seeded
    answer = await s.api.call(
        "GET", f"/v1/patients/{s.bea}/report", s.nurse_b, params={"format": "pdf"}
    )
    assert answer.status_code == 200, answer.text
    text = _pdf_text(answer.content)
    assert "Bea Other" in text
    assert "900 mcg/day" in text
    for earlier in ("600 mcg/day", "500 mcg/day", "over delivery", "Rosa", "Dose up 50"):
        assert earlier not in text
    html = await s.api.call("GET", f"/v1/patients/{s.bea}/report", s.nurse_b)
    assert "America/New_York" in html.text
    assert "600 mcg/day" not in html.text
    # Clinic A still has Rosa's period, up to the move.
    rosa = await s.api.call("GET", f"/v1/patients/{s.rosa}/report", s.nurse_a)
    assert "NGPREP0001" in rosa.text


async def test_who_may_read_it(seeded: Seeded) -> None:
    s = seeded
    fleet = await s.api.call("GET", f"/v1/patients/{s.rosa}/report", s.fleet)
    assert fleet.status_code == 403
    assert "Rosa" not in fleet.text
    other = await s.api.call("GET", f"/v1/patients/{s.rosa}/report", s.nurse_b)
    assert other.status_code == 404
    admin = await s.api.call("GET", f"/v1/patients/{s.rosa}/report", ADMIN_TOKEN)
    assert admin.status_code == 200
    conn = await s.api.conn()
    try:
        audited = await conn.fetch(
            "SELECT action, resource_type, resource_id, outcome FROM audit_log "
            "WHERE action LIKE '%patient_report%' ORDER BY id"
        )
    finally:
        await conn.close()
    assert [(r["resource_id"], r["outcome"]) for r in audited] == [
        (s.rosa, "denied"),
        (s.rosa, "denied"),
        (s.rosa, "ok"),
    ]


@pytest.mark.parametrize(
    ("params", "field", "words"),
    [
        ({"from": "2026-06-01", "until": "2026-05-01"}, "query.from", "before until"),
        ({"from": "2026-06-01", "until": "2026-06-01"}, "query.from", "before until"),
        ({"from": "2020-01-01", "until": "2026-01-01"}, "query.until", "at most"),
        ({"from": "yesterday"}, "query.from", "a date"),
        ({"until": "1999-12-31"}, "query.until", "between"),
        ({"format": "docx"}, "query.format", ""),
    ],
)
async def test_a_period_that_is_not_one_is_a_problem(
    seeded: Seeded, params: dict[str, str], field: str, words: str
) -> None:
    s = seeded
    answer = await s.api.call("GET", f"/v1/patients/{s.rosa}/report", s.nurse_a, params=params)
    assert answer.status_code == 422, answer.text
    problem = answer.json()
    assert answer.headers["content-type"].startswith("application/problem+json")
    assert words in problem["detail"]
    assert field in [e["field"] for e in problem["errors"]]


async def test_a_chosen_period_limits_what_is_shown(seeded: Seeded) -> None:
    s = seeded
    now = datetime.now(UTC)
    answer = await s.api.call(
        "GET",
        f"/v1/patients/{s.rosa}/report",
        s.nurse_a,
        params={"from": (now - timedelta(days=100)).date().isoformat()},
    )
    assert answer.status_code == 200
    page = answer.text
    assert "+20%" in page  # the change 90 days ago
    assert "+25%" not in page  # 150 days ago: before the period (500 mcg/day was in force)
    assert "500 mcg/day" in page


def test_the_dose_chart_marks_each_change_with_its_percentage() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    doses = [
        Dose(start - timedelta(days=30), 400.0, None),
        Dose(start + timedelta(days=40), 500.0, 0.25),
        Dose(start + timedelta(days=100), 450.0, -0.1),
    ]
    svg = render(doses, start, start + timedelta(days=180), UTC)
    assert svg.count('class="dose-change"') == 2
    assert "+25%" in svg
    assert "-10%" in svg
    assert 'role="img"' in svg
    assert "now 450 mcg/day" in svg
