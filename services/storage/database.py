"""Connections to PostgreSQL: identifiable, time-limited, retried while the server starts."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Coroutine
from typing import Any

import asyncpg

from services.logs import get

log = get(__name__)

COMMAND_TIMEOUT_S = 60.0

Connection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy
"""A connection of its own or one lent by a pool."""


class DatabaseUnavailable(Exception):
    """The database cannot be reached (yet); callers retry with backoff."""


class DatabaseRejected(Exception):
    """The server refused us for good (bad credentials, unknown database): a fatal error."""


FATAL_ERRORS: tuple[type[Exception], ...] = (
    asyncpg.InvalidPasswordError,
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InvalidCatalogNameError,
)


DATABASE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    # A connection the server dropped mid-protocol (its postmaster SIGKILLed) can reach the
    # pool still consuming the error: "cannot switch to state 15; another operation (2) is in
    # progress". The connection is discarded on release; the work is retried like any other.
    asyncpg.InternalClientError,
)
"""What a database round trip can raise when the server or the connection fails (and not the
data): the work is retried later."""


async def prepare_connection(conn: asyncpg.Connection) -> None:
    """Pool ``init``: JSON columns as Python values."""
    for kind in ("json", "jsonb"):
        await conn.set_type_codec(kind, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def create_pool(
    url: str,
    *,
    application_name: str,
    min_size: int = 1,
    max_size: int = 4,
    init: Callable[[asyncpg.Connection], Coroutine[Any, Any, None]] | None = None,
    reset: Callable[[asyncpg.Connection], Coroutine[Any, Any, None]] | None = None,
    server_settings: dict[str, str] | None = None,
) -> asyncpg.Pool:
    """A pool whose connections name the service in ``pg_stat_activity``. ``reset`` replaces
    asyncpg's reset query on release (which still rolls back an open transaction first)."""
    try:
        pool = await asyncpg.create_pool(
            url,
            min_size=min_size,
            max_size=max_size,
            init=init,
            reset=reset,
            command_timeout=COMMAND_TIMEOUT_S,
            server_settings={"application_name": application_name, "timezone": "UTC"}
            | (server_settings or {}),
        )
    except FATAL_ERRORS as exc:
        raise DatabaseRejected(f"{type(exc).__name__}: {exc}") from exc
    except (TimeoutError, OSError, asyncpg.CannotConnectNowError) as exc:
        raise DatabaseUnavailable(f"{type(exc).__name__}: {exc}") from exc
    assert pool is not None
    return pool


async def keep_session(_: asyncpg.Connection) -> None:
    """A pool's reset on release for services that set no session state (no SET, LISTEN,
    advisory lock or cursor outside a transaction): nothing beyond asyncpg's own rollback of an
    open transaction. The default reset query (``RESET ALL``, ``UNLISTEN *``, …) would be a round
    trip per use that changes nothing: per request in the API, per batch in ingest."""


async def connect(url: str, *, application_name: str) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(
            url,
            command_timeout=COMMAND_TIMEOUT_S,
            server_settings={"application_name": application_name, "timezone": "UTC"},
        )
    except FATAL_ERRORS as exc:
        raise DatabaseRejected(f"{type(exc).__name__}: {exc}") from exc
    except (TimeoutError, OSError, asyncpg.CannotConnectNowError) as exc:
        raise DatabaseUnavailable(f"{type(exc).__name__}: {exc}") from exc


async def connect_with_retry(
    url: str, *, application_name: str, attempts: int = 30, first_delay_s: float = 0.2
) -> asyncpg.Connection:
    """Connect, waiting with exponential backoff while the server is unavailable."""
    delay = first_delay_s
    for attempt in range(1, attempts + 1):
        try:
            return await connect(url, application_name=application_name)
        except DatabaseUnavailable as exc:
            if attempt == attempts:
                raise
            log.warning("database_unavailable", attempt=attempt, error=str(exc), retry_in_s=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
    raise AssertionError("unreachable")


async def open_pool(
    url: str,
    *,
    application_name: str,
    stop: asyncio.Event,
    min_size: int = 1,
    max_size: int = 4,
    init: Callable[[asyncpg.Connection], Coroutine[Any, Any, None]] | None = prepare_connection,
    reset: Callable[[asyncpg.Connection], Coroutine[Any, Any, None]] | None = None,
    retry_rejected: bool = False,
    first_delay_s: float = 0.2,
    max_delay_s: float = 10.0,
) -> asyncpg.Pool | None:
    """:func:`create_pool`, waiting with exponential backoff while the database is unavailable;
    None if ``stop`` is set meanwhile. A refusal (:class:`DatabaseRejected`) is raised, or
    retried like unavailability when ``retry_rejected``."""
    delay = first_delay_s
    while not stop.is_set():
        try:
            return await create_pool(
                url,
                application_name=application_name,
                min_size=min_size,
                max_size=max_size,
                init=init,
                reset=reset,
            )
        except DatabaseRejected as exc:
            if not retry_rejected:
                raise
            log.warning("database_unavailable", error=str(exc), retry_in_s=round(delay, 2))
        except DatabaseUnavailable as exc:
            log.warning("database_unavailable", error=str(exc), retry_in_s=round(delay, 2))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        delay = min(delay * 2, max_delay_s)
    return None
