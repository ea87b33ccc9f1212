"""The FastAPI application: factory, lifespan (the connection pool), and the ASGI middleware that
limits request bodies, counts requests per route template and writes the audit log."""

from __future__ import annotations

import gc
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    MutableMapping,
)
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Mount
from starlette.staticfiles import StaticFiles

from services.api import docs, problems, sql
from services.api.auth import Principal
from services.api.fhir import patients as fhir_patients
from services.api.fhir import routes as fhir_routes
from services.api.routes import (
    alerts,
    auth,
    clinics,
    exports,
    meta,
    patients,
    pumps,
    refills,
    reports,
    users,
    webhooks,
)
from services.api.settings import ApiSettings
from services.api.web import onboarding as web_onboarding
from services.api.web import patients as web_patients
from services.api.web import routes as web_routes
from services.api.web import settings as web_settings
from services.api.web import settings_alerts as web_settings_alerts
from services.api.web import settings_webhooks as web_settings_webhooks
from services.api.web import therapy as web_therapy
from services.api.web import visits as web_visits
from services.logs import get
from services.storage.database import create_pool, keep_session, prepare_connection

log = get(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Routes whose tags say they touch patient data: every request to them is audited.
AUDITED_TAGS = frozenset(
    {"patients", "pumps", "telemetry", "refills", "alerts", "dashboard", "worklist", "fhir"}
)
# Changes: a route writes its own audit row in its transaction (services.api.audit); the
# middleware writes the rows of those refused or failed (nothing changed).
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})

DESCRIPTION = """
Telemetry, alerts and refill planning for implanted intrathecal drug pumps.

**Auth**: `Authorization: Bearer <api key>` (machines) or `Bearer <token>` of a person signed in
with `POST /v1/auth/token` (the OAuth2 password form). Roles: `admin` (every clinic),
`clinic_admin` (a person: what a clinician does, plus the clinic's people, webhooks and
settings), `clinician` (one clinic: read, acknowledge and resolve alerts, record refills,
webhooks), `integrator` (a key: one clinic, read-only, webhooks), `fleet` (every pump,
de-identified: no names, MRNs or birth dates). A resource of another clinic answers 404, as one
that does not exist.

**Errors** are RFC 9457 problem documents (`application/problem+json`) with field-level `errors`
for validation failures. **Lists** are cursor-paginated: `?limit=` (1-500, default 50) and the
`next_cursor` of the previous page as `?cursor=`. Quantities carry their unit in the field name;
timestamps are RFC 3339 UTC.
"""


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "pumpwatch_api_requests",
            "HTTP requests by route template, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "pumpwatch_api_request_seconds",
            "HTTP request latency by route template and method",
            ["route", "method"],
            buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=self.registry,
        )
        self.audit_rows = Counter(
            "pumpwatch_api_audit_rows", "Audit log rows written", registry=self.registry
        )


def create_app(settings: ApiSettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.pool = await create_pool(
            settings.require_database_url(),
            application_name="pumpwatch-api",
            min_size=1,
            max_size=settings.api_pool_max_size,
            init=prepare_connection,
            reset=keep_session,
            # The same few statements run on every request; over partitioned readings a custom
            # plan per execution costs more than running them (and grows with partitions).
            # The dashboard's series is float8 text made by PostgreSQL: shortest exact digits.
            server_settings={"plan_cache_mode": "force_generic_plan", "extra_float_digits": "1"},
        )
        # What start-up allocated lives as long as the process: keep it out of the collector's
        # full passes (they paused requests for ~50 ms).
        gc.freeze()
        try:
            yield
        finally:
            await app.state.pool.close()

    app = FastAPI(
        title="pumpwatch",
        version="1",
        description=DESCRIPTION,
        lifespan=lifespan,
        responses=problems.PROBLEM_RESPONSES,
        docs_url=None,  # served by services.api.docs, offline
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.add_exception_handler(problems.Problem, problems.on_problem)
    app.add_exception_handler(RequestValidationError, problems.on_validation)
    app.add_exception_handler(StarletteHTTPException, problems.on_http)
    app.add_exception_handler(asyncpg.DataError, problems.on_data_error)
    for unavailable in problems.DATABASE_UNAVAILABLE:
        app.add_exception_handler(unavailable, problems.on_unavailable)
    app.add_exception_handler(asyncpg.InterfaceError, problems.on_interface_error)
    app.add_exception_handler(Exception, problems.on_error)
    for module in (
        meta,
        auth,
        users,
        clinics,
        patients,
        pumps,
        refills,
        exports,
        reports,
        alerts,
        webhooks,
        fhir_patients,
        fhir_routes,
    ):
        app.include_router(module.router)
    app.include_router(web_routes.router)
    for page in (
        web_patients,
        web_onboarding,
        web_visits,
        web_therapy,
        web_settings,
        web_settings_alerts,
        web_settings_webhooks,
    ):
        app.include_router(page.router)
    docs.install(app)
    app.mount("/static", StaticFiles(directory=str(web_routes.STATIC_DIR)), name="static")
    app.add_middleware(_Middleware)
    return app


class _Middleware:
    """Body size limit, per-route metrics and the audit log, in one pure ASGI layer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        fastapi_app: FastAPI = scope["app"]
        settings: ApiSettings = fastapi_app.state.settings
        metrics: Metrics = fastapi_app.state.metrics
        started = time.perf_counter()
        # The request as it came: routing changes a mounted app's scope (its path and root).
        asked = (scope.get("path", ""), scope.get("root_path", ""))
        limit = settings.api_max_body_bytes
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _send_problem(send, _too_large(limit))
            _observe(metrics, scope, fastapi_app, 413, started, asked=asked)
            return
        if declared is None:
            # No Content-Length (chunked): read the body here, within the limit, so that an
            # over-size one is a 413 and not a parse error of a body cut off mid-route.
            body = await _read_body(receive, limit)
            if body is None:
                await _send_problem(send, _too_large(limit))
                _observe(metrics, scope, fastapi_app, 413, started, asked=asked)
                return
            receive = _replay(body, receive)

        status = 500
        started_response = False

        async def watching_send(message: Message) -> None:
            nonlocal status, started_response
            if message["type"] == "http.response.start":
                started_response = True
                status = int(message["status"])
                try:
                    await _audit(scope, fastapi_app, status)
                except problems.DATABASE_UNAVAILABLE as exc:
                    if status != 503:
                        raise  # no audit row, no answer
                    # The 503 carries no patient data, and its audit row cannot be written
                    # while the database is unreachable: say so in the log instead.
                    log.warning("api_audit_skipped", status=status, error=type(exc).__name__)
            await send(message)

        try:
            await self.app(scope, receive, watching_send)
        except Exception:
            if not started_response:
                # An unhandled error (its 500 is sent by the server error handler, outside
                # this layer): the attempt is still audited. A change that committed has its
                # own row already.
                status = 500
                try:
                    await _audit(scope, fastapi_app, status)
                except Exception as exc:  # the original error matters more: it is re-raised
                    log.warning("api_audit_skipped", status=status, error=type(exc).__name__)
            raise
        finally:
            _observe(metrics, scope, fastapi_app, status, started, asked=asked)


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body, or None once it grows over ``limit`` bytes. A client that goes
    away mid-body leaves what came (the route then sees the disconnect)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive channel that gives ``body`` once, then the client's own (its disconnect)."""
    given = False

    async def replaying() -> Message:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replaying


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _send_problem(send: Send, problem: problems.Problem) -> None:
    response = problems.response(problem)
    await send(
        {"type": "http.response.start", "status": problem.status, "headers": response.raw_headers}
    )
    await send({"type": "http.response.body", "body": response.body})


def _flat(routes: Iterable[Any]) -> Iterator[Any]:
    """The routes of a route table, those of included routers included (FastAPI keeps an
    included router as one entry that holds its ``original_router``)."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is None:
            yield route
        else:
            yield from _flat(inner.routes)


def _template(scope: Scope, asked: tuple[str, str], app: FastAPI) -> str:
    """The route template a request went to: a route's path (``/v1/pumps/{serial}``), a
    mounted app's with ``{path}`` (the dashboard's ``/static/{path}``), or ``unmatched`` for a
    path no route has (a 404): never the path itself, so labels cannot grow with requests."""
    route = scope.get("route")
    if route is None:
        original = {**scope, "path": asked[0], "root_path": asked[1]}
        partial = None
        for candidate in _flat(app.router.routes):
            match, _ = candidate.matches(original)
            if match is Match.FULL:
                route = candidate
                break
            if match is Match.PARTIAL and partial is None:
                partial = candidate  # the path, another method (405)
        route = route or partial
    if isinstance(route, Mount):
        return f"{route.path}/{{path}}"
    return getattr(route, "path", None) or "unmatched"


def _observe(
    metrics: Metrics,
    scope: Scope,
    app: FastAPI,
    status: int,
    started: float,
    *,
    asked: tuple[str, str],
) -> None:
    template = _template(scope, asked, app)
    method = scope.get("method", "")
    metrics.requests.labels(template, method, str(status)).inc()
    metrics.latency.labels(template, method).observe(time.perf_counter() - started)


async def _audit(scope: Scope, app: FastAPI, status: int) -> None:
    """The middleware's audit row: reads of patient data, and changes refused or failed. A
    change that succeeded wrote its own row in its transaction (``state.audited``)."""
    route = scope.get("route")
    tags = set(getattr(route, "tags", ()) or ())
    state: dict[str, Any] = scope.get("state", {})
    method = scope.get("method", "")
    mutating = method in MUTATING and route is not None
    if not (tags & AUDITED_TAGS) and not mutating:
        return
    if state.get("audited") and status < 400:
        return  # written with the change, in its transaction
    principal: Principal | None = state.get("principal")
    if principal is None:
        return  # not authenticated: nothing was read (the 401 is logged and rate-limited)
    params: dict[str, Any] = scope.get("path_params", {})
    named = state.get("audit_resource")
    if named is not None:
        resource_type, resource_id = named
    else:
        resource_type = sorted(tags & AUDITED_TAGS or tags or {"web"})[0]
        resource_id = next((str(v) for v in params.values()), None)
    outcome = "ok" if status < 400 else "denied" if status in (401, 403, 404) else "error"
    action = f"{method.lower()} {getattr(route, 'name', '')}"
    client = scope.get("client")
    async with app.state.pool.acquire() as conn:
        await conn.execute(
            sql.INSERT_AUDIT,
            principal.key_id,
            principal.role,
            action,
            resource_type,
            None if resource_id is None else str(resource_id),
            principal.clinic_id,
            outcome,
            status,
            client[0] if client else None,
            principal.user_id,
        )
    app.state.metrics.audit_rows.inc()


def _too_large(limit: int) -> problems.Problem:
    return problems.Problem(413, f"request body over {limit} bytes", kind="too-large")
