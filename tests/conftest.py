"""Real servers for the tests: PostgreSQL and an MQTT broker.

PostgreSQL: ``PUMPWATCH_TEST_DATABASE_URL`` if set, else the local server on 127.0.0.1:5432,
else an embedded one (pgserver). Each test gets its own database, cloned from a template that
the migrations built once per session.

MQTT: each test that needs a broker gets its own ``mosquitto`` on a free port with the project's
limits (persistent sessions of one test cannot leak into another). Without mosquitto on the
machine, an in-process amqtt broker serves, which speaks MQTT 3.1.1 only.
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from playwright.sync_api import expect

from lab.embedded import (
    EmbeddedBroker,
    port_open,
    start_amqtt,
    start_mosquitto,
    start_postgres,
)
from services.storage import migrate
from tests.api_support import Api, World, running_api, world

# Browser assertions wait for their condition; on a busy 2-core CI machine a page as big as ReDoc's
# can take longer than Playwright's 5 s default to render, so every expect() waits up to 60 s.
expect.set_options(timeout=60_000)


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture(scope="session")
def pg_admin_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    configured = os.environ.get("PUMPWATCH_TEST_DATABASE_URL")
    if configured:
        yield configured
        return
    if port_open("127.0.0.1", 5432):
        yield "postgresql://postgres@127.0.0.1:5432/postgres"
        return
    server = start_postgres(tmp_path_factory.mktemp("pg"), database="postgres")
    try:
        yield server.url
    finally:
        server.stop()


async def _admin(url: str, *statements: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


async def _migrate(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await migrate.apply(conn)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def template_database(pg_admin_url: str) -> Iterator[str]:
    name = f"pw_template_{uuid.uuid4().hex[:10]}"
    asyncio.run(_admin(pg_admin_url, f"CREATE DATABASE {name} ENCODING 'UTF8' TEMPLATE template0"))
    asyncio.run(_migrate(_with_database(pg_admin_url, name)))
    try:
        yield name
    finally:
        asyncio.run(_admin(pg_admin_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture
def database_url(pg_admin_url: str, template_database: str) -> Iterator[str]:
    """A freshly migrated database of this test's own."""
    name = f"pw_test_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(pg_admin_url, f"CREATE DATABASE {name} TEMPLATE {template_database}"))
    try:
        yield _with_database(pg_admin_url, name)
    finally:
        asyncio.run(_admin(pg_admin_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture
def empty_database_url(pg_admin_url: str) -> Iterator[str]:
    """A database with no tables at all, for migration tests."""
    name = f"pw_empty_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(pg_admin_url, f"CREATE DATABASE {name} ENCODING 'UTF8' TEMPLATE template0"))
    try:
        yield _with_database(pg_admin_url, name)
    finally:
        asyncio.run(_admin(pg_admin_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


def _amqtt_in_thread() -> EmbeddedBroker:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="amqtt", daemon=True)
    thread.start()
    broker = asyncio.run_coroutine_threadsafe(start_amqtt(), loop).result(10)
    inner_stop = broker.stop

    def stop() -> None:
        loop.call_soon_threadsafe(inner_stop)

    return EmbeddedBroker(broker.url, broker.kind, broker.port, stop)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    """A broker of this test's own."""
    try:
        server = start_mosquitto(tmp_path / "mosquitto")
    except FileNotFoundError:
        server = _amqtt_in_thread()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def mqtt5_broker(broker: EmbeddedBroker) -> EmbeddedBroker:
    """A broker with MQTT 5 (shared subscriptions, Receive Maximum)."""
    if not broker.supports_mqtt5:
        pytest.skip("needs an MQTT 5 broker: install mosquitto (apt install mosquitto)")
    return broker


@pytest.fixture
async def api(database_url: str) -> AsyncIterator[Api]:
    """The API app on this test's database (in-process), with its admin key."""
    async with running_api(database_url) as found:
        yield found


@pytest.fixture
async def w(api: Api) -> World:
    """Two clinics with their keys, people and patients (a module may define its own ``w``)."""
    return await world(api)
