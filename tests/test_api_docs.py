"""The API's documentation pages offline: ``pumpwatch api`` as a process, Debian's Chromium
(headless, Playwright) with every request to another host refused. Swagger UI at ``/docs`` and
ReDoc at ``/redoc`` must render the whole OpenAPI document, examples included, from assets the API
serves itself. Screenshots go to ``$PUMPWATCH_ARTIFACTS_DIR`` (default ``artifacts/``)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import Browser, Page, Route, expect, sync_playwright

from tests.api_support import api_process, scratch_database

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("PUMPWATCH_ARTIFACTS_DIR", "artifacts")) / "screenshots"


@pytest.fixture(scope="module")
def base(
    pg_admin_url: str, template_database: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    with (
        scratch_database(pg_admin_url, template_database, "pw_docs") as url,
        api_process(url, tmp_path_factory.mktemp("docs")) as api,
    ):
        yield api.base
    errors = api.unhandled_errors()
    assert not errors, "\n".join(errors)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        found = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield found
        found.close()


class Offline:
    """A page whose requests to any host but the API's are refused, and remembered."""

    def __init__(self, browser: Browser, base: str) -> None:
        self.host = urlsplit(base).netloc
        self.refused: list[str] = []
        self.failed: list[tuple[str, str | None]] = []
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.context.route("**/*", self._route)
        self.page: Page = self.context.new_page()
        self.page.on("requestfailed", lambda r: self.failed.append((r.url, r.failure)))

    def _route(self, route: Route) -> None:
        url = route.request.url
        if urlsplit(url).netloc == self.host:
            route.continue_()
        else:
            self.refused.append(url)
            route.abort("internetdisconnected")


@pytest.fixture
def offline(base: str, browser: Browser) -> Iterator[Offline]:
    found = Offline(browser, base)
    yield found
    found.context.close()


def test_the_docs_assets_are_served_by_the_api(base: str) -> None:
    page = httpx.get(f"{base}/docs").text
    assert "cdn" not in page.lower()
    assert 'href="/docs-assets/swagger-ui.css"' in page
    assert 'src="/docs-assets/swagger-ui-bundle.js"' in page
    assert '"validatorUrl": null' in page  # no badge from validator.swagger.io
    redoc = httpx.get(f"{base}/redoc").text
    assert 'src="/docs-assets/redoc.standalone.js"' in redoc
    assert "fonts.googleapis.com" not in redoc
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png"):
        answer = httpx.get(f"{base}/docs-assets/{asset}")
        assert answer.status_code == 200, asset
        assert len(answer.content) > 1000, asset


def test_swagger_ui_renders_every_operation_offline_with_its_examples(
    offline: Offline, base: str
) -> None:
    page = offline.page
    page.goto(f"{base}/docs")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("pumpwatch")
    operations = page.locator(".opblock")
    expect(operations.first).to_be_visible()
    openapi = httpx.get(f"{base}/openapi.json").json()
    wanted = {op["operationId"] for ops in openapi["paths"].values() for op in ops.values()}
    assert len(wanted) >= 30
    # Each operation under each of its tags: operations-{tag}-{operationId}.
    ids = operations.evaluate_all("blocks => blocks.map(block => block.id)")
    assert {element.split("-", 2)[2] for element in ids} == wanted
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "docs.png"))
    # An operation opened: its parameter's example and its answer's example, from the document.
    device = page.locator("#operations-fhir-read_device_fhir_Device__serial__get")
    device.locator(".opblock-summary").click()
    expect(device).to_contain_text("NGP204519H")
    expect(device).to_contain_text("SynchroMed II 8637-40")
    assert offline.refused == [], offline.refused
    assert offline.failed == [], offline.failed


def test_redoc_renders_offline(offline: Offline, base: str) -> None:
    page = offline.page
    page.goto(f"{base}/redoc")
    expect(page.locator("h1").first).to_contain_text("pumpwatch")
    expect(page.get_by_text("A pump as a FHIR Device").first).to_be_attached()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "redoc.png"))
    assert offline.refused == [], offline.refused
    # ReDoc's sidebar always links a logo on cdn.redoc.ly: the page's Content-Security-Policy
    # stops the browser before it asks (ReDoc then hides the image); nothing else fails.
    assert [(url, why) for url, why in offline.failed if why != "csp"] == []
    assert all(urlsplit(url).netloc != offline.host for url, _ in offline.failed)
