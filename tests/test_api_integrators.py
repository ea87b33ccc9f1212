"""What integrators meet first (HTTP contract 1.1, "Integrators"): the clinic and pump listings,
the CSV exports, problem documents that say plainly what is wrong, and metrics per route for
every page the API serves. In-process over the whole ASGI stack, on a real database."""

from __future__ import annotations

import asyncio
import csv
import io
import re
import uuid
from collections import Counter
from collections.abc import MutableMapping
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest

from services.api import problems
from services.api.app import create_app
from services.api.settings import ApiSettings
from tests import alert_fixtures as fx
from tests.api_support import Api, World


def problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json", response.text
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    return body


# --- problem documents ---------------------------------------------------------------------------


async def test_a_json_syntax_error_is_named_by_line_and_column(api: Api, w: World) -> None:
    body = b'{\n  "mrn": "MRN-9",\n  "display_name": \n}'
    answer = await api.call(
        "POST",
        "/v1/patients",
        w.a.clinician,
        content=body,
        headers={"content-type": "application/json"},
    )
    found = problem(answer, 422)
    assert found["title"] == "Request validation failed"
    assert found["errors"] == [
        {
            "field": "body",
            "message": "is not valid JSON: malformed at line 4, column 1: expected a value, "
            "found '}'",
        }
    ]
    assert "decode error" not in answer.text
    cut = await api.call(
        "POST",
        "/v1/patients",
        w.a.clinician,
        content='{"display_name": "Zoë'.encode(),
        headers={"content-type": "application/json"},
    )
    assert problem(cut, 422)["detail"] == (
        "body: is not valid JSON: truncated: the payload ends (at line 1, column 22) inside a value"
    )


async def test_one_kind_of_problem_has_one_title(api: Api, w: World) -> None:
    """422s from FastAPI's validation, from a route's own checks and from the database all read
    the same; so do 404s of a route and of a path no route has."""
    by_validation = await api.call("GET", "/v1/patients", w.a.clinician, params={"limit": 0})
    by_route = await api.call(
        "GET",
        f"/v1/pumps/{w.a.serial}/telemetry",
        w.a.clinician,
        params={"since": "2026-01-02T00:00:00Z", "until": "2026-01-01T00:00:00Z"},
    )
    by_database = await api.call(
        "POST",
        "/v1/patients",
        w.a.clinician,
        json={"mrn": "MRN-NUL", "display_name": "a\u0000b"},
    )
    titles = {problem(r, 422)["title"] for r in (by_validation, by_route, by_database)}
    assert titles == {"Request validation failed"}
    routed = await api.call("GET", f"/v1/patients/{uuid.uuid4()}", w.a.clinician)
    unrouted = await api.call("GET", "/v1/nothing-here", w.a.clinician)
    assert {problem(r, 404)["title"] for r in (routed, unrouted)} == {"Not found"}
    assert {problem(r, 404)["type"] for r in (routed, unrouted)} == {
        "https://pumpwatch.dev/problems/not-found"
    }


def test_every_problem_kind_raised_in_the_api_has_its_title() -> None:
    from pathlib import Path

    source = "\n".join(p.read_text() for p in Path("services/api").rglob("*.py"))
    kinds = set(re.findall(r'kind="([a-z-]+)"', source))
    assert kinds <= set(problems.TITLES), kinds - set(problems.TITLES)
    assert len(set(problems.TITLES.values())) == len(problems.TITLES)  # no two kinds alike


# --- metrics -------------------------------------------------------------------------------------


async def test_every_page_is_counted_under_its_route_template(api: Api, w: World) -> None:
    # Signed out: the pages send people to sign in (303), counted under their templates all
    # the same.
    paths = [
        "/login",
        "/",
        f"/patients/{w.a.patient_id}",
        "/static/app.css",
        "/docs",
        "/redoc",
        "/docs-assets/swagger-ui.css",
        "/openapi.json",
    ]
    for path in paths:
        answer = await api.client.get(path)
        assert answer.status_code in (200, 303), (path, answer.status_code)
    await api.client.get("/no/such/page")
    too_big = await api.call("POST", "/v1/patients", w.a.clinician, content=b"x" * 70_000)
    assert too_big.status_code == 413  # refused before routing, counted under its route
    text = (await api.call("GET", "/metrics", None)).text
    routes = Counter(re.findall(r'pumpwatch_api_requests_total\{[^}]*route="([^"]*)"', text))
    for template in (
        "/login",
        "/",
        "/patients/{patient_id}",
        "/static/{path}",
        "/docs",
        "/redoc",
        "/docs-assets/{path}",
        "/openapi.json",
    ):
        assert routes[template], (template, routes)
    # A path no route has is the only unmatched one, and no path itself is ever a label.
    assert 'route="unmatched",status="404"' in text
    assert 'method="POST",route="/v1/patients",status="413"' in text
    assert routes["unmatched"] == 1
    assert w.a.patient_id not in text


def test_the_app_serves_no_cdn_pages() -> None:
    app = create_app(ApiSettings(database_url="postgresql://unused/unused"))
    assert app.docs_url is None
    assert app.redoc_url is None


# --- listings ------------------------------------------------------------------------------------


async def _all_pages(api: Api, path: str, key: str, **params: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    for _ in range(20):
        answer = await api.call(
            "GET", path, key, params={**params, **({"cursor": cursor} if cursor else {})}
        )
        assert answer.status_code == 200, answer.text
        page = answer.json()
        items.extend(page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            return items
    raise AssertionError("paging did not end")


async def test_clinics_are_listed_all_for_admins_and_its_own_for_a_clinic(
    api: Api, w: World
) -> None:
    every = await _all_pages(api, "/v1/clinics", w.admin, limit=1)
    assert [c["id"] for c in every] == [w.a.id, w.b.id]  # by name, one a page
    assert [c["name"] for c in every] == ["Clinic A", "Clinic B"]
    for key in (w.a.clinician, w.a.integrator):
        assert [c["id"] for c in await _all_pages(api, "/v1/clinics", key)] == [w.a.id]
    assert await _all_pages(api, "/v1/clinics", w.fleet) == []
    assert (await api.call("GET", "/v1/clinics", None)).status_code == 401


async def test_pumps_are_listed_with_their_state_scoped_and_de_identified(
    api: Api, w: World
) -> None:
    mine = await _all_pages(api, "/v1/pumps", w.a.integrator)
    assert [p["serial"] for p in mine] == [w.a.serial]
    single = (await api.call("GET", f"/v1/pumps/{w.a.serial}", w.a.integrator)).json()
    assert mine[0]["patient_id"] == w.a.patient_id
    assert mine[0]["forecast"] is not None
    assert {k: v for k, v in mine[0].items() if k != "forecast"} == {
        k: v for k, v in single.items() if k != "forecast"
    }
    every = await _all_pages(api, "/v1/pumps", w.admin, limit=1)
    assert [p["serial"] for p in every] == sorted([w.a.serial, w.b.serial, w.unassigned])
    fleet = await _all_pages(api, "/v1/pumps", w.fleet, limit=2)
    assert [p["serial"] for p in fleet] == [p["serial"] for p in every]
    assert all(p["patient_id"] is None for p in fleet)
    assert w.a.patient_id not in str(fleet)
    by_patient = await _all_pages(api, "/v1/pumps", w.a.clinician, patient_id=w.a.patient_id)
    assert [p["serial"] for p in by_patient] == [w.a.serial]
    # Another clinic's patient is nobody's here.
    assert await _all_pages(api, "/v1/pumps", w.a.clinician, patient_id=w.b.patient_id) == []
    refused = await api.call("GET", "/v1/pumps", w.fleet, params={"patient_id": w.a.patient_id})
    assert problem(refused, 403)["title"] == "Not allowed for this role"
    bad = await api.call("GET", "/v1/pumps", w.admin, params={"cursor": "bm90IGEgY3Vyc29y"})
    assert problem(bad, 400)["type"].endswith("/bad-cursor")


# --- exports -------------------------------------------------------------------------------------


def _csv(answer: httpx.Response) -> list[dict[str, str]]:
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "text/csv; charset=utf-8"
    assert answer.headers["content-disposition"].startswith("attachment; filename=")
    return list(csv.DictReader(io.StringIO(answer.text)))


async def test_telemetry_csv_is_every_reading_oldest_first_as_the_json_says(
    api: Api, w: World
) -> None:
    rows = _csv(await api.call("GET", f"/v1/pumps/{w.a.serial}/telemetry.csv", w.a.integrator))
    readings = await _all_pages(api, f"/v1/pumps/{w.a.serial}/telemetry", w.a.integrator)
    assert len(rows) == len(readings) == 9
    assert [r["msg_id"] for r in rows] == [r["msg_id"] for r in reversed(readings)]
    for row, reading in zip(rows, reversed(readings), strict=True):
        assert float(row["volume_ml"]) == reading["volume_ml"]
        assert float(row["rate_ml_per_day"]) == reading["rate_ml_per_day"]
        assert datetime.fromisoformat(row["recorded_at"]) == datetime.fromisoformat(
            reading["recorded_at"]
        )
        assert row["recorded_at"].endswith("Z")
        assert row["measured_flow_ml_per_day"] == ""  # not reported: empty
    since = rows[4]["recorded_at"]
    later = _csv(
        await api.call(
            "GET",
            f"/v1/pumps/{w.a.serial}/telemetry.csv",
            w.a.integrator,
            params={"since": since},
        )
    )
    assert [r["msg_id"] for r in later] == [r["msg_id"] for r in rows[4:]]
    other = await api.call("GET", f"/v1/pumps/{w.b.serial}/telemetry.csv", w.a.integrator)
    assert problem(other, 404)["title"] == "Not found"
    backwards = await api.call(
        "GET",
        f"/v1/pumps/{w.a.serial}/telemetry.csv",
        w.a.integrator,
        params={"since": "2026-02-01T00:00:00Z", "until": "2026-01-01T00:00:00Z"},
    )
    assert problem(backwards, 422)["errors"][0]["field"] == "query.until"


async def test_telemetry_csv_is_streamed_in_chunks_and_defuses_formulas(
    api: Api, w: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.api.routes import exports

    monkeypatch.setattr(exports, "ROWS_PER_CHUNK", 2)
    conn = await api.conn()
    try:
        await conn.execute(
            "UPDATE readings SET drug_name = '=HYPERLINK(\"http://x\")', "
            "alarms = '{motor_stall,low_reservoir}' WHERE serial = $1",
            w.a.serial,
        )
    finally:
        await conn.close()
    # The ASGI messages the app sends (httpx's ASGI transport would join them).
    chunks: list[bytes] = []
    status: list[int] = []

    asked: list[bool] = []
    never = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if asked:
            await never.wait()  # the client stays (no disconnect)
        asked.append(True)
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])
        elif message.get("body"):
            chunks.append(message["body"])

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": f"/v1/pumps/{w.a.serial}/telemetry.csv",
        "raw_path": f"/v1/pumps/{w.a.serial}/telemetry.csv".encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"authorization", f"Bearer {w.a.clinician}".encode()),
            (b"content-length", b"0"),
        ],
        "client": ("192.0.2.10", 40000),
        "server": ("api", 80),
        "state": {},
    }
    await api.app(scope, receive, send)
    assert status == [200]
    assert len(chunks) == 1 + 5  # the header, then 9 readings two at a time
    rows = list(csv.DictReader(io.StringIO(b"".join(chunks).decode())))
    assert {r["drug_name"] for r in rows} == {'\'=HYPERLINK("http://x")'}
    assert {r["alarms"] for r in rows} == {"motor_stall;low_reservoir"}


async def test_refills_csv_is_the_refill_history_with_its_reconciliation(
    api: Api, w: World
) -> None:
    conn = await api.conn()
    try:
        await fx.refill_event(
            conn, w.a.serial, w.a.refill_at + timedelta(days=5), residual_ml=2.5, added_ml=18.0
        )
    finally:
        await conn.close()
    rows = _csv(await api.call("GET", f"/v1/pumps/{w.a.serial}/refills.csv", w.a.integrator))
    history = await _all_pages(api, f"/v1/pumps/{w.a.serial}/refills", w.a.integrator)
    assert len(rows) == len(history) == 2
    for row, refill in zip(rows, history, strict=True):
        assert datetime.fromisoformat(row["recorded_at"]) == datetime.fromisoformat(
            refill["recorded_at"]
        )
        assert float(row["residual_ml"]) == refill["residual_ml"]
        assert float(row["added_ml"]) == refill["added_ml"]
        found = refill["discrepancy"]
        if found is None:
            assert row["classification"] == row["expected_residual_ml"] == ""
        else:
            assert row["classification"] == found["classification"]
            assert float(row["expected_residual_ml"]) == found["expected_residual_ml"]
    other = await api.call("GET", f"/v1/pumps/{w.b.serial}/refills.csv", w.a.clinician)
    assert other.status_code == 404
    assert (
        await api.call("GET", f"/v1/pumps/{w.b.serial}/refills.csv", w.admin)
    ).status_code == 200
