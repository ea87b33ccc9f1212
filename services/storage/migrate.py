"""Ordered SQL migrations: applied once each, recorded, serialised by an advisory lock.

Files are ``migrations/NNNN_name.sql``; each runs in its own transaction together with the row
that records it, so a failed migration leaves nothing behind. A checksum guards against a file
being edited after it was applied.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources

from services.logs import get
from services.storage.database import Connection

log = get(__name__)

# Any constant shared by every pumpwatch process that migrates.
_LOCK_KEY = 0x70756D70  # "pump"
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


async def apply(conn: Connection) -> list[Migration]:
    """Apply every pending migration; safe when several processes do it at once."""
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        await conn.execute(_CREATE_TABLE)
        todo = await pending(conn)
        for migration in todo:
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    _INSERT_APPLIED, migration.version, migration.name, migration.checksum
                )
            log.info("migration_applied", version=migration.version, name=migration.name)
        return todo
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)


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
