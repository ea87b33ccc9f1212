"""``pumpwatch keys create|list|revoke`` against a real database, and the key working."""

from __future__ import annotations

import os
import subprocess
import sys

from services.api import keys
from tests import alert_fixtures as fx
from tests.api_support import running_api
from tests.support import fetchval


def _keys(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"PUMPWATCH_DATABASE_URL": database_url, "PUMPWATCH_LOG_LEVEL": "warning"}
    return subprocess.run(
        [sys.executable, "-m", "services", "keys", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_keys_are_created_listed_and_revoked_from_the_command_line(database_url: str) -> None:
    async with running_api(database_url) as api:
        conn = await api.conn()
        try:
            clinic = await fx.clinic(conn)
        finally:
            await conn.close()

        made = _keys(
            database_url, "create", "--role", "clinician", "--clinic", clinic, "--label", "ward 3"
        )
        assert made.returncode == 0, made.stderr
        key = made.stdout.strip()
        assert key.startswith("pw_")
        assert "not shown again" in made.stderr
        stored = await fetchval(
            database_url, "SELECT key_hash FROM api_keys WHERE label = 'ward 3'"
        )
        assert stored == keys.hash_key(key)
        assert (await api.call("GET", "/v1/patients", key)).status_code == 200

        listed = _keys(database_url, "list")
        assert listed.returncode == 0
        assert "clinician" in listed.stdout
        assert "ward 3" in listed.stdout
        assert key not in listed.stdout

        key_id = str(await fetchval(database_url, "SELECT id FROM api_keys WHERE label = 'ward 3'"))
        assert _keys(database_url, "revoke", key_id).returncode == 0
        assert (await api.call("GET", "/v1/patients", key)).status_code == 401
        assert _keys(database_url, "revoke", key_id).returncode == 1  # already revoked

    for bad in (
        ["create", "--role", "clinician"],  # a clinic key needs its clinic
        ["create", "--role", "admin", "--clinic", clinic],
        ["create", "--role", "janitor"],
        ["create", "--role", "clinician", "--clinic", "not-a-uuid"],
    ):
        refused = _keys(database_url, *bad)
        assert refused.returncode == 2, (bad, refused.stdout, refused.stderr)
        assert "pumpwatch: error:" in refused.stderr
