"""The API while its database is unreachable: 503 problem documents with Retry-After (never a
500), and back to normal by itself once the database answers again.

The database goes away behind a TCP proxy that cuts every open connection and refuses new ones
(``DatabaseProxy`` of the ingest outage tests): the pool's idle connections die in the middle of
their next query, and the pool's reconnection attempts are refused.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.api_support import ADMIN_TOKEN, Api, running_api
from tests.test_ingest_outages import DatabaseProxy

DATA_ROUTES = [
    ("GET", "/v1/pumps/NGP204519H", None),
    ("GET", "/v1/patients", None),
    ("GET", "/v1/alerts?status=open", None),
    ("GET", "/v1/refills/due", None),
    ("POST", "/v1/clinics", {"name": "Clinic C", "timezone": "Europe/Berlin"}),
]


@pytest.fixture
async def proxied_api(database_url: str) -> AsyncIterator[tuple[Api, DatabaseProxy]]:
    proxy = DatabaseProxy(database_url)
    proxy.restore()
    try:
        # httpx's ASGI transport re-raises what the app does not handle: a 500 would fail here.
        async with running_api(proxy.url) as api:
            yield api, proxy
    finally:
        proxy.cut()


async def _statuses(api: Api) -> list[int]:
    answers = [
        await api.call(method, path, ADMIN_TOKEN, json=body) for method, path, body in DATA_ROUTES
    ]
    return [a.status_code for a in answers]


async def test_data_routes_answer_503_problems_while_the_database_is_down_and_recover(
    proxied_api: tuple[Api, DatabaseProxy], database_url: str
) -> None:
    api, proxy = proxied_api
    assert await _statuses(api) == [404, 200, 200, 200, 201]

    assert proxy.cut() >= 1  # the pool's connections at least
    for method, path, body in DATA_ROUTES:
        answer = await api.call(method, path, ADMIN_TOKEN, json=body)
        assert answer.status_code == 503, (method, path, answer.text)
        assert answer.headers["content-type"] == "application/problem+json"
        assert answer.headers["retry-after"] == "5"
        problem = answer.json()
        assert problem["status"] == 503
        assert problem["type"].endswith("/unavailable")
        assert "database" in problem["detail"]
    ready = await api.client.get("/readyz")
    assert ready.status_code == 503
    # Authentication needs the database too: a key cannot be checked, so 503, not 401.
    assert (await api.call("GET", "/v1/patients", "some-key")).status_code == 503

    proxy.restore()
    assert await _statuses(api) == [404, 200, 200, 200, 201]
    assert (await api.client.get("/readyz")).status_code == 200


async def test_the_openapi_document_lists_the_503_problem(
    proxied_api: tuple[Api, DatabaseProxy],
) -> None:
    api, _ = proxied_api
    document = (await api.client.get("/openapi.json")).json()
    responses = document["paths"]["/v1/pumps/{serial}"]["get"]["responses"]
    assert "503" in responses
