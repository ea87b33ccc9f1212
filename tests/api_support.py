"""The API in-process on a real database: its lifespan runs, requests go through httpx's ASGI
transport (the whole middleware stack, no network); or as a real process (lab.processes)."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
from fastapi import FastAPI

from lab.processes import ServiceProcess, api_service
from services.api import keys
from services.api.app import create_app
from services.api.settings import ApiSettings
from services.storage.database import prepare_connection
from tests import alert_fixtures as fx

ADMIN_TOKEN = "test-admin-token-0123456789"


@dataclass
class Api:
    app: FastAPI
    client: httpx.AsyncClient
    database_url: str

    async def conn(self) -> asyncpg.Connection:
        conn = await asyncpg.connect(self.database_url)
        await prepare_connection(conn)
        return conn

    async def key(self, role: keys.Role, clinic_id: str | None = None) -> str:
        conn = await self.conn()
        try:
            _, key = await keys.create(
                conn,
                role=role,
                clinic_id=None if clinic_id is None else uuid.UUID(clinic_id),
                label=f"test {role}",
                created_by="test",
            )
        finally:
            await conn.close()
        return key

    async def call(self, method: str, path: str, key: str | None, **kwargs: Any) -> httpx.Response:
        headers = dict(kwargs.pop("headers", {}))
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        return await self.client.request(method, path, headers=headers, **kwargs)


@asynccontextmanager
async def running_api(database_url: str, **settings: Any) -> AsyncIterator[Api]:
    config = ApiSettings(
        database_url=database_url,
        admin_token=ADMIN_TOKEN,
        webhook_allow_hosts="127.0.0.1,localhost",
        api_key_touch_interval_s=0,
        **settings,
    )
    app = create_app(config)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=("192.0.2.10", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            yield Api(app, client, database_url)


@dataclass
class Clinic:
    id: str
    patient_id: str
    serial: str
    alert_id: str
    clinician: str = ""
    integrator: str = ""
    refill_at: datetime = field(default_factory=lambda: datetime.now(UTC))


@dataclass
class World:
    """Two clinics with a patient, a pump with readings, a refill and an open alert each, an
    unassigned pump, and keys of every role."""

    a: Clinic
    b: Clinic
    unassigned: str
    admin: str
    fleet: str
    revoked: str


async def _clinic(api: Api, conn: asyncpg.Connection, name: str, serial: str) -> Clinic:
    now = datetime.now(UTC).replace(microsecond=0)
    clinic_id = await fx.clinic(conn, name=name)
    patient_id = await fx.patient(conn, clinic_id, mrn=f"MRN-{serial}")
    await fx.pump(conn, serial, patient_id=patient_id)
    refill_at = now - timedelta(days=10)
    await fx.refill_event(conn, serial, refill_at, residual_ml=4.0, added_ml=20.0)
    for hours in range(48, -1, -6):
        await fx.reading(
            conn, serial, now - timedelta(hours=hours), volume_ml=20.0 - 2.0 - (48 - hours) / 120
        )
    alert_id = await conn.fetchval(
        """INSERT INTO alerts (serial, rule, priority, status, title, detail, opened_at,
               updated_at, condition_at)
           VALUES ($1, 'refill_due', 'medium', 'open', 'Refill due in 6 days', 'detail', now(),
               now(), now()) RETURNING id""",
        serial,
    )
    found = Clinic(clinic_id, patient_id, serial, str(alert_id), refill_at=refill_at)
    found.clinician = await api.key("clinician", clinic_id)
    found.integrator = await api.key("integrator", clinic_id)
    return found


async def world(api: Api) -> World:
    conn = await api.conn()
    try:
        a = await _clinic(api, conn, "Clinic A", "NGPAAAA01")
        b = await _clinic(api, conn, "Clinic B", "NGPBBBB01")
        await fx.pump(conn, "NGPUNASSIGNED")
        await fx.reading(conn, "NGPUNASSIGNED", datetime.now(UTC) - timedelta(hours=1))
    finally:
        await conn.close()
    revoked = await api.key("clinician", a.id)
    conn = await api.conn()
    try:
        await conn.execute(
            "UPDATE api_keys SET revoked_at = now() WHERE key_hash = $1", keys.hash_key(revoked)
        )
    finally:
        await conn.close()
    return World(
        a=a,
        b=b,
        unassigned="NGPUNASSIGNED",
        admin=await api.key("admin"),
        fleet=await api.key("fleet"),
        revoked=revoked,
    )


async def _admin(pg_admin_url: str, statement: str) -> None:
    conn = await asyncpg.connect(pg_admin_url)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@contextmanager
def scratch_database(pg_admin_url: str, template: str, prefix: str) -> Iterator[str]:
    """A database cloned from the migrated template, dropped afterwards; yields its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    asyncio.run(_admin(pg_admin_url, f"CREATE DATABASE {name} TEMPLATE {template}"))
    try:
        yield urlunsplit(urlsplit(pg_admin_url)._replace(path=f"/{name}"))
    finally:
        asyncio.run(_admin(pg_admin_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@dataclass
class ApiProcess:
    """What :func:`api_process` yields: the running API's base URL, process and log file."""

    service: ServiceProcess

    @property
    def base(self) -> str:
        return self.service.base_url

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        assert self.service.proc is not None
        return self.service.proc

    @property
    def log(self) -> Path:
        return self.service.log_path

    def unhandled_errors(self) -> list[str]:
        return [line for line in self.log.read_text().splitlines() if "api_unhandled_error" in line]


@contextmanager
def api_process(
    database_url: str, log_dir: Path, extra_env: dict[str, str] | None = None
) -> Iterator[ApiProcess]:
    """``pumpwatch api`` as a process on a free port, ready (``/readyz`` 200); SIGTERM at exit."""
    settings = {"PUMPWATCH_DATABASE_URL": database_url, **(extra_env or {})}
    service = api_service(settings, log_dir / "api.log")
    try:
        yield ApiProcess(service.start())
    finally:
        service.stop()
