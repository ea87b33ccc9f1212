"""Ordered SQL migrations: applied once each, recorded, serialised by an advisory lock.

Files are ``migrations/NNNN_name.sql``; each runs in its own transaction together with the row
that records it, so a failed migration leaves nothing behind. A checksum guards against a file
being edited after it was applied.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

from services.logs import get
from services.storage.database import Connection

log = get(__name__)

# Any constant shared by every pumpwatch process that migrates.
_LOCK_KEY = 0x70756D70  # "pump"
_ATTEMPTS = 5
"""Tries of one migration that loses a race on a cluster-wide catalog (below)."""
_FILE_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""
_SELECT_APPLIED = "SELECT version, checksum FROM schema_migrations ORDER BY version"
_INSERT_APPLIED = "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)"
_TABLE_EXISTS = "SELECT to_regclass('schema_migrations') IS NOT NULL"


class MigrationError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def available() -> list[Migration]:
    """The migrations shipped in the package, in order."""
    folder = resources.files(__package__).joinpath("migrations")
    found = []
    for entry in folder.iterdir():
        match = _FILE_RE.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"duplicate migration versions: {versions}")
    return found


async def pending(conn: Connection) -> list[Migration]:
    """Migrations not yet applied (all of them on an empty database)."""
    if not await conn.fetchval(_TABLE_EXISTS):
        return available()
    applied = {row["version"]: row["checksum"] for row in await conn.fetch(_SELECT_APPLIED)}
    _verify(applied)
    return [m for m in available() if m.version not in applied]


async def apply(conn: Connection, *, through: int | None = None) -> list[Migration]:
    """Apply every pending migration (up to version ``through``, when given: a database as an
    older release left it); safe when several processes do it at once."""
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        await conn.execute(_CREATE_TABLE)
        todo = [m for m in await pending(conn) if through is None or m.version <= through]
        for migration in todo:
            await _apply_one(conn, migration)
            log.info("migration_applied", version=migration.version, name=migration.name)
        return todo
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)


async def _apply_one(conn: Connection, migration: Migration) -> None:
    """One migration in one transaction, tried again when it lost a race on a catalog that all
    databases of the server share (roles): the advisory lock serialises the migrations of one
    database only, and two databases migrating at once can both ``ALTER ROLE`` (PostgreSQL:
    "tuple concurrently updated") or both create a role. The transaction rolled back whole, so
    trying again is safe."""
    for attempt in range(1, _ATTEMPTS + 1):
        try:
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    _INSERT_APPLIED, migration.version, migration.name, migration.checksum
                )
            return
        except (
            asyncpg.InternalServerError,
            asyncpg.UniqueViolationError,
            asyncpg.DuplicateObjectError,
        ) as exc:
            if attempt == _ATTEMPTS or not _shared_catalog_race(exc):
                raise
            log.warning(
                "migration_retried", version=migration.version, attempt=attempt, error=str(exc)
            )
            await asyncio.sleep(random.uniform(0.05, 0.2) * attempt)


def _shared_catalog_race(exc: asyncpg.PostgresError) -> bool:
    message = str(exc)
    return (
        "tuple concurrently updated" in message
        or "pg_authid" in message
        or (isinstance(exc, asyncpg.DuplicateObjectError) and "role" in message)
    )


def _verify(applied: dict[int, str]) -> None:
    known = {m.version: m for m in available()}
    for version, checksum in applied.items():
        migration = known.get(version)
        if migration is None:
            raise MigrationError(
                f"the database has migration {version}, which this version of pumpwatch does not "
                "know: it was migrated by a newer release"
            )
        if migration.checksum != checksum:
            raise MigrationError(
                f"migration {version:04d}_{migration.name}.sql changed after it was applied"
            )
