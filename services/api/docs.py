"""The API's documentation pages, offline: Swagger UI at ``/docs`` and ReDoc at ``/redoc``, their
scripts and styles served by the API itself from the ``fastapi-offline`` wheel (the released
``swagger-ui-dist`` and ReDoc bundles), so the pages work where the internet is not reachable (a
hospital network) and load nothing from another host."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse
from starlette.staticfiles import StaticFiles

ASSETS = "/docs-assets"
"""Where the pages' scripts, styles and icon are served."""
ASSETS_DIR = resources.files("fastapi_offline").joinpath("static")

router = APIRouter(include_in_schema=False)

SWAGGER_UI_PARAMETERS = {
    # No badge asking validator.swagger.io about our document: nothing leaves the network.
    "validatorUrl": None,
    "docExpansion": "list",
    "defaultModelsExpandDepth": 0,
    "tryItOutEnabled": False,
    "persistAuthorization": False,
}


POLICY = "; ".join(
    (
        "default-src 'self'",
        # The pages' own inline start-up script and the styles the bundles inject.
        "script-src 'self' 'unsafe-inline'",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data:",
        "font-src 'self' data:",
        "connect-src 'self'",
        "worker-src 'self' blob:",  # ReDoc's search index
        "frame-ancestors 'none'",
    )
)
"""What the pages may load: only from the API itself. ReDoc's sidebar links a logo on
cdn.redoc.ly (not an option to turn off); under this policy the browser does not ask for it and
ReDoc hides the image."""


def _offline(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = POLICY
    return page


def _root(request: Request) -> str:
    return str(request.scope.get("root_path", "")).rstrip("/")


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    root, app = _root(request), request.app
    page = get_swagger_ui_html(
        openapi_url=f"{root}{app.openapi_url}",
        title=f"{app.title} API",
        oauth2_redirect_url=f"{root}/docs/oauth2-redirect",
        swagger_js_url=f"{root}{ASSETS}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{ASSETS}/swagger-ui.css",
        swagger_favicon_url=f"{root}{ASSETS}/favicon.png",
        swagger_ui_parameters=SWAGGER_UI_PARAMETERS,
    )
    return _offline(page)


@router.get("/docs/oauth2-redirect")
async def swagger_ui_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    root, app = _root(request), request.app
    page = get_redoc_html(
        openapi_url=f"{root}{app.openapi_url}",
        title=f"{app.title} API",
        redoc_js_url=f"{root}{ASSETS}/redoc.standalone.js",
        redoc_favicon_url=f"{root}{ASSETS}/favicon.png",
        with_google_fonts=False,
    )
    return _offline(page)


def install(app: FastAPI) -> None:
    """Serve the pages and their assets (the app is created with ``docs_url=None`` and
    ``redoc_url=None``: FastAPI's own pages load them from a CDN)."""
    app.include_router(router)
    app.mount(ASSETS, StaticFiles(directory=str(ASSETS_DIR)), name="docs-assets")
