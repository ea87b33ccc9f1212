"""Forwarded headers (security audit, finding 4): ``pumpwatch api`` believes ``X-Forwarded-For``
only from the proxies ``PUMPWATCH_API_TRUSTED_PROXIES`` names, none by default. The address it
believes is the one the failed-authentication limit counts and the audit log records, so a
spoofed header must neither move a stranger's failures onto someone else's address nor land in
the audit log. Against the real process (uvicorn applies the setting), on loopback."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import httpx

from tests.api_support import api_process

SPOOFED = "198.51.100.7"
"""TEST-NET-2: an address the test never uses, only claims."""


def _failures_by_source(database_url: str) -> dict[str, int]:
    async def read() -> dict[str, int]:
        conn = await asyncpg.connect(database_url)
        try:
            rows = await conn.fetch(
                "SELECT source, sum(failures)::int AS n FROM auth_failures GROUP BY source"
            )
        finally:
            await conn.close()
        return {r["source"]: r["n"] for r in rows}

    return asyncio.run(read())


def _wrong_key_with_forwarded_for(base: str) -> int:
    answer = httpx.get(
        f"{base}/v1/patients",
        headers={"Authorization": "Bearer pw_wrong_guess", "X-Forwarded-For": SPOOFED},
        timeout=30,
    )
    return answer.status_code


def test_a_forwarded_address_is_not_believed_by_default(database_url: str, tmp_path: Path) -> None:
    with api_process(database_url, tmp_path) as api:
        assert _wrong_key_with_forwarded_for(api.base) == 401
    counted = _failures_by_source(database_url)
    assert counted == {"127.0.0.1": 1}, counted


def test_a_configured_proxy_s_forwarded_address_is_believed(
    database_url: str, tmp_path: Path
) -> None:
    trusted = {"PUMPWATCH_API_TRUSTED_PROXIES": "127.0.0.1"}
    with api_process(database_url, tmp_path, trusted) as api:
        assert _wrong_key_with_forwarded_for(api.base) == 401
    counted = _failures_by_source(database_url)
    assert counted == {SPOOFED: 1}, counted
