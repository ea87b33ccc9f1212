"""Health, metrics, the MQTT contract's JSON Schema, and the quarantine (admin)."""

from __future__ import annotations

import json
from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.api import models, sql
from services.api.auth import authenticate, require
from services.api.common import Auth, Cursor, Db, Limit, decode_cursor, encode_cursor
from services.api.problems import Problem
from services.logs import get
from services.storage import migrate

log = get(__name__)

router = APIRouter()


@router.get("/healthz", tags=["operations"], summary="The process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    tags=["operations"],
    summary="Database reachable and migrations current",
    responses={503: {"description": "Not ready: the reason is in `detail`"}},
)
async def readyz(request: Request) -> JSONResponse:
    try:
        async with request.app.state.pool.acquire(timeout=2.0) as conn:
            await conn.fetchval(sql.PING)
            waiting = await migrate.pending(conn)
    except Exception as exc:
        # The cause goes to the log, not to an anonymous caller (it can name hosts, users).
        log.warning("api_not_ready", error=type(exc).__name__)
        return JSONResponse(
            {"status": "unavailable", "detail": "the database cannot be reached"}, status_code=503
        )
    if waiting:
        names = ", ".join(f"{m.version:04d}_{m.name}" for m in waiting)
        return JSONResponse(
            {"status": "unavailable", "detail": f"migrations pending: {names}"}, status_code=503
        )
    return JSONResponse({"status": "ok"})


@router.get(
    "/metrics",
    tags=["operations"],
    summary="Prometheus exposition",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}},
)
async def metrics(request: Request) -> Response:
    if not request.app.state.settings.api_metrics_public:
        principal = await authenticate(request)
        require(principal, "admin", "fleet")
    body = generate_latest(request.app.state.metrics.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


def _schema() -> dict[str, Any]:
    text = resources.files("services.domain").joinpath("schemas/mqtt-v1.schema.json").read_text()
    loaded: dict[str, Any] = json.loads(text)
    return loaded


@router.get(
    "/v1/schemas/mqtt-v1.json",
    tags=["contract"],
    summary="JSON Schema of the MQTT wire contract (telemetry and events), version 1",
    response_class=JSONResponse,
    responses={
        200: {
            "description": "The JSON Schema (draft 2020-12)",
            "content": {"application/schema+json": {"schema": {"type": "object"}}},
        }
    },
)
async def mqtt_schema() -> JSONResponse:
    return JSONResponse(_schema(), media_type="application/schema+json")


@router.get(
    "/v1/quarantine",
    tags=["operations"],
    summary="Quarantined MQTT messages with their reasons (admin)",
)
async def quarantine(
    principal: Auth,
    db: Db,
    limit: Limit = 50,
    cursor: Cursor = None,
    reason: Annotated[
        str | None, Query(max_length=64, pattern=r"^[a-z_]*$", examples=["schema"])
    ] = None,
) -> models.Page[models.QuarantineItem]:
    require(principal, "admin")
    after = decode_cursor(cursor, 1)
    before_id = None
    if after is not None:
        try:
            before_id = int(after[0] or "")
        except ValueError as exc:
            raise Problem(400, "cursor is not one this API gave out", kind="bad-cursor") from exc
    rows = await db.fetch(sql.LIST_QUARANTINE, reason, before_id, limit + 1)
    items = [
        models.QuarantineItem(
            **{k: row[k] for k in models.QuarantineItem.model_fields if k != "excerpt"},
            excerpt=bytes(row["excerpt"]).decode("utf-8", "replace"),
        )
        for row in rows[:limit]
    ]
    more = len(rows) > limit
    return models.Page(items=items, next_cursor=encode_cursor(items[-1].id) if more else None)
