"""API keys: random, shown once, stored as a SHA-256 hash, revocable."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Literal
from uuid import UUID

from services.api import sql
from services.storage.database import Connection

Role = Literal["admin", "clinician", "clinic_admin", "integrator", "fleet"]
"""Roles of keys and people (``clinic_admin`` is a person's only: see ``services.api.people``)."""
ROLES: tuple[Role, ...] = ("admin", "clinician", "integrator", "fleet")
"""Roles a key may have."""
CLINIC_ROLES: frozenset[Role] = frozenset({"clinician", "integrator"})
_PREFIX = "pw_"


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def new_key() -> str:
    return _PREFIX + secrets.token_urlsafe(32)


class KeyError_(ValueError):
    """A key cannot be created as asked."""


@dataclass(frozen=True, slots=True)
class StoredKey:
    id: UUID
    role: Role
    clinic_id: UUID | None
    label: str
    created_at: datetime
    created_by: str
    last_used_at: datetime | None
    revoked_at: datetime | None


async def create(
    conn: Connection, *, role: Role, clinic_id: UUID | None, label: str, created_by: str
) -> tuple[UUID, str]:
    """A new key: (its id, the key itself — shown once)."""
    if role not in ROLES:
        raise KeyError_(f"role must be one of {', '.join(ROLES)}")
    if (role in CLINIC_ROLES) != (clinic_id is not None):
        raise KeyError_(f"a {role} key {'needs' if role in CLINIC_ROLES else 'takes no'} clinic")
    if clinic_id is not None and not await conn.fetchval(sql.CLINIC_EXISTS, clinic_id):
        raise KeyError_(f"no clinic {clinic_id}")
    key = new_key()
    key_id: UUID = await conn.fetchval(
        sql.INSERT_KEY, hash_key(key), role, clinic_id, label, created_by
    )
    return key_id, key


async def listed(conn: Connection, clinic_id: UUID | None = None) -> list[StoredKey]:
    rows = await conn.fetch(sql.LIST_KEYS, clinic_id)
    return [StoredKey(**dict(row)) for row in rows]


async def revoke(conn: Connection, key_id: UUID) -> bool:
    return bool(await conn.fetchval(sql.REVOKE_KEY, key_id))
