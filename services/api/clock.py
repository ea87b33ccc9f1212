"""The clock of sign-ins, tokens and lockout: the wall clock, or in tests the database's plus
an offset (``PUMPWATCH_API_TEST_CLOCK``, table ``api_test_clock``), so that token expiry, idle
timeouts and the end of a lock are tested by moving the clock, not by waiting."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import Request

from services.api import sql
from services.storage.database import Connection


async def now(conn: Connection, request: Request) -> datetime:
    if not request.app.state.settings.api_test_clock:
        return datetime.now(UTC)
    found: datetime = await conn.fetchval(sql.TEST_CLOCK)
    return found
