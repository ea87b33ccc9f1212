"""What integrators meet first (HTTP contract 1.1, "Integrators"): the clinic and pump listings,
the CSV exports, problem documents that say plainly what is wrong, and metrics per route for
every page the API serves. In-process over the whole ASGI stack, on a real database."""

from __future__ import annotations

import re
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from services.api import problems
from services.api.app import create_app
from services.api.settings import ApiSettings
from tests.api_support import Api, World, running_api, world


@pytest.fixture
async def api(database_url: str) -> AsyncIterator[Api]:
    async with running_api(database_url) as found:
        yield found


@pytest.fixture
async def w(api: Api) -> World:
    return await world(api)


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
