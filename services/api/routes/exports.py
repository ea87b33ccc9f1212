"""CSV exports of a pump's history: its readings and its refills, streamed as they are read from
PostgreSQL (a server-side cursor, a page of refills at a time), never built whole in memory, and
limited like the JSON routes to the periods in which the key's clinic held the pump."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import asyncpg
from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from services.api import models, sql
from services.api.auth import Principal
from services.api.common import Auth, Db, scope_of
from services.api.problems import FieldError, Problem
from services.api.routes.pumps import Serial, _utc, pump_clinic
from services.api.routes.refills import refill_page

router = APIRouter()

CSV = "text/csv; charset=utf-8"
ROWS_PER_CHUNK = 500
"""Rows sent per chunk of the response (and fetched per round trip of the cursor)."""
REFILLS_PER_PAGE = 100

TELEMETRY_COLUMNS = (
    "recorded_at",
    "received_at",
    "msg_id",
    "volume_ml",
    "capacity_ml",
    "low_alarm_ml",
    "basis",
    "drug_name",
    "concentration_mcg_per_ml",
    "infusion_mode",
    "rate_ml_per_day",
    "daily_dose_mcg",
    "measured_flow_ml_per_day",
    "battery_pct",
    "battery_status",
    "alarms",
)
REFILL_COLUMNS = (
    "recorded_at",
    "msg_id",
    "residual_ml",
    "added_ml",
    "drug",
    "concentration_mcg_per_ml",
    "expected_residual_ml",
    "delta_ml",
    "relative",
    "classification",
    "limit_ml",
    "expected_from",
)

_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def cell(value: Any) -> str:
    """One CSV cell: times in RFC 3339 UTC, lists joined by ``;``, and text a spreadsheet would
    take for a formula (``=``, ``+``, ``-``, ``@``: device strings are not trusted) quoted with
    a leading apostrophe."""
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, bool | int | float):
        return repr(value) if isinstance(value, float) else str(value)
    if isinstance(value, list | tuple):
        value = ";".join(str(v) for v in value)
    text = str(value)
    return "'" + text if text.startswith(_FORMULA) else text


def _lines(rows: Iterable[Sequence[Any]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")  # RFC 4180
    writer.writerows([cell(v) for v in row] for row in rows)
    return buffer.getvalue().encode()


def _attachment(name: str) -> dict[str, str]:
    return {"Content-Disposition": f'attachment; filename="{name}"'}


def _window(since: datetime | None, until: datetime | None) -> tuple[datetime, datetime]:
    low = _utc(since, "since") if since else datetime(1970, 1, 1, tzinfo=UTC)
    high = _utc(until, "until") if until else datetime.now(UTC) + timedelta(days=1)
    if high <= low:
        raise Problem(
            422,
            "until must be after since",
            kind="validation",
            errors=[FieldError(field="query.until", message="must be after since")],
        )
    return low, high


_CSV_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "CSV (RFC 4180, UTF-8, a header row), streamed",
        "content": {"text/csv": {"schema": {"type": "string"}}},
    }
}


@router.get(
    "/v1/pumps/{serial}/telemetry.csv",
    tags=["telemetry"],
    summary="The pump's readings as CSV, oldest first, streamed",
    response_class=StreamingResponse,
    responses=_CSV_RESPONSE,
)
async def telemetry_csv(
    serial: Serial,
    principal: Auth,
    db: Db,
    request: Request,
    since: Annotated[datetime | None, Query(description="From (inclusive), RFC 3339")] = None,
    until: Annotated[datetime | None, Query(description="To (exclusive), RFC 3339")] = None,
) -> StreamingResponse:
    """Every reading in `[since, until)` (default: all) in the periods the key's clinic held the
    pump, oldest first; columns as `GET /v1/pumps/{serial}/telemetry` names them (`alarms`
    joined by `;`), times RFC 3339 UTC, empty cells for values the pump did not report."""
    await pump_clinic(db, principal, serial, history=True)
    low, high = _window(since, until)
    pool: asyncpg.Pool = request.app.state.pool
    args = (serial, low, high, scope_of(principal))
    return StreamingResponse(
        _streamed(pool, sql.READINGS_CSV, args, TELEMETRY_COLUMNS),
        media_type=CSV,
        headers=_attachment(f"{serial}-telemetry.csv"),
    )


async def _streamed(
    pool: asyncpg.Pool, query: str, args: Sequence[Any], columns: Sequence[str]
) -> AsyncIterator[bytes]:
    """The header, then the rows of ``query`` read through a cursor ``ROWS_PER_CHUNK`` at a
    time. The connection is the stream's own: the request's went back to the pool when the
    handler returned."""
    yield _lines([columns])
    async with pool.acquire() as conn, conn.transaction(readonly=True):
        chunk: list[Sequence[Any]] = []
        async for record in conn.cursor(query, *args, prefetch=ROWS_PER_CHUNK):
            chunk.append(tuple(record[c] for c in columns))
            if len(chunk) == ROWS_PER_CHUNK:
                yield _lines(chunk)
                chunk = []
        if chunk:
            yield _lines(chunk)


@router.get(
    "/v1/pumps/{serial}/refills.csv",
    tags=["refills"],
    summary="The pump's refills with their reconciliation as CSV, newest first, streamed",
    response_class=StreamingResponse,
    responses=_CSV_RESPONSE,
)
async def refills_csv(
    serial: Serial, principal: Auth, db: Db, request: Request
) -> StreamingResponse:
    """Every refill in the periods the key's clinic held the pump, newest first, as
    `GET /v1/pumps/{serial}/refills` gives them: the discrepancy's columns are empty for a
    refill nothing says what to expect of (a first refill)."""
    await pump_clinic(db, principal, serial, history=True)
    pool: asyncpg.Pool = request.app.state.pool
    return StreamingResponse(
        _refills(pool, principal, serial),
        media_type=CSV,
        headers=_attachment(f"{serial}-refills.csv"),
    )


def _refill_row(refill: models.RefillOut) -> tuple[Any, ...]:
    found = refill.discrepancy
    reconciled = (
        (None,) * 6
        if found is None
        else (
            found.expected_residual_ml,
            found.delta_ml,
            found.relative,
            found.classification,
            found.limit_ml,
            found.expected_from,
        )
    )
    return (
        refill.recorded_at,
        refill.msg_id,
        refill.residual_ml,
        refill.added_ml,
        refill.drug,
        refill.concentration_mcg_per_ml,
        *reconciled,
    )


async def _refills(pool: asyncpg.Pool, principal: Principal, serial: str) -> AsyncIterator[bytes]:
    yield _lines([REFILL_COLUMNS])
    before: datetime | None = None
    while True:
        async with pool.acquire() as conn:
            page, before = await refill_page(conn, principal, serial, before, REFILLS_PER_PAGE)
        if page:
            yield _lines(_refill_row(r) for r in page)
        if before is None:
            return
