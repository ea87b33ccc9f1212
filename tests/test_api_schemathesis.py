"""schemathesis against the running API (``pumpwatch api`` as a process, real PostgreSQL, seeded
data, an admin key and a clinician key): no 5xx, and every answer conforms to the OpenAPI
document (status codes, content types, headers, bodies)."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.core.result import Ok

from services.api import keys
from services.storage.database import prepare_connection
from tests.api_support import api_process, scratch_database

EXAMPLES = int(os.environ.get("PUMPWATCH_SCHEMATHESIS_EXAMPLES", "30"))


async def _seed(url: str) -> tuple[str, str]:
    """The tenancy world's data; an admin key and a clinician key of clinic A."""
    from tests import alert_fixtures as fx

    conn = await asyncpg.connect(url)
    await prepare_connection(conn)
    try:
        clinic = await fx.clinic(conn)
        patient = await fx.patient(conn, clinic, mrn="MRN-SCHEMA")
        await fx.pump(conn, "NGPSCHEMA1", patient_id=patient)
        from datetime import UTC, datetime, timedelta

        now = datetime.now(UTC)
        await fx.refill_event(conn, "NGPSCHEMA1", now - timedelta(days=5), residual_ml=3.0)
        for hours in (30, 20, 10, 2):
            await fx.reading(conn, "NGPSCHEMA1", now - timedelta(hours=hours))
        _, admin = await keys.create(
            conn, role="admin", clinic_id=None, label="schemathesis", created_by="test"
        )
        _, clinician = await keys.create(
            conn,
            role="clinician",
            clinic_id=uuid.UUID(clinic),
            label="schemathesis",
            created_by="test",
        )
    finally:
        await conn.close()
    return admin, clinician


@pytest.fixture(scope="module")
def running(
    pg_admin_url: str, template_database: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str, str]]:
    with scratch_database(pg_admin_url, template_database, "pw_schemathesis") as url:
        admin_key, clinician_key = asyncio.run(_seed(url))
        extra = {
            "PUMPWATCH_WEBHOOK_ALLOW_HOSTS": "127.0.0.1",
            # schemathesis sends many bad keys on purpose; do not let it lock itself out
            "PUMPWATCH_API_AUTH_FAILURES_PER_MINUTE": "1000000",
        }
        with api_process(url, Path(tmp_path_factory.mktemp("api")), extra) as api:
            yield api.base, admin_key, clinician_key
    assert api.proc.returncode == 0, api.log.read_text()
    errors = api.unhandled_errors()
    assert not errors, "\n".join(errors)


def _operations(base: str) -> list[schemathesis.APIOperation[Any, Any, Any, Any]]:
    # Schema-valid requests may still break rules OpenAPI cannot state: one field against
    # another (since < until), against the caller (an admin key must name the clinic),
    # against the database (the patient must exist) or the clock (a refill from the future).
    # Those answer 400/422 with a problem document naming the field; 5xx never.
    config = schemathesis.Config.from_dict(
        {
            "checks": {
                "positive_data_acceptance": {
                    "expected-statuses": ["2xx", "400", "401", "403", "404", "409", "422", "429"]
                }
            }
        }
    )
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json", config=config)
    found = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result
        found.append(result.ok())
    return found


def _checker(
    operation: schemathesis.APIOperation[Any, Any, Any, Any], base: str, key: str
) -> Callable[[], None]:
    @given(case=operation.as_strategy())
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    def check(case: schemathesis.Case[Any]) -> None:
        case.call_and_validate(base_url=base, headers={"Authorization": f"Bearer {key}"})

    return check


def test_the_api_conforms_to_its_own_openapi_document(running: tuple[str, str, str]) -> None:
    """Every operation, with generated valid and invalid inputs. (schemathesis's own pytest
    plugin, ``from_fixture``, does not work with pytest 9: the operations are driven here.)"""
    base, admin_key, clinician_key = running
    operations = _operations(base)
    assert len(operations) >= 25
    failures: list[str] = []
    for index, operation in enumerate(operations):
        # Alternate keys so both the admin's and a clinic's paths are exercised.
        check = _checker(operation, base, admin_key if index % 2 else clinician_key)
        try:
            check()
        except Exception as exc:  # collect every operation's failures
            failures.append(f"{operation.method.upper()} {operation.path}:\n{exc}")
    assert not failures, "\n\n".join(failures)
