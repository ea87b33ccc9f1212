"""The ``pumpwatch`` command line: the services, migrations and keys; the lab's commands
(``demo``, ``simulate``, ``bench``) are added when the lab is installed beside them."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from services.commands import read_settings as _settings
from services.commands import run_command as _run
from services.settings import CommonSettings

app = typer.Typer(
    name="pumpwatch",
    help="Telemetry, alerts and dashboards for implanted intrathecal drug pumps.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command()
def migrate() -> None:
    """Apply pending database migrations, then exit."""
    from services.storage import migrate as migrations
    from services.storage.database import connect_with_retry

    settings = _settings(CommonSettings)

    async def main() -> None:
        conn = await connect_with_retry(
            settings.require_database_url(), application_name="pumpwatch-migrate"
        )
        try:
            applied = await migrations.apply(conn)
        finally:
            await conn.close()
        if applied:
            for m in applied:
                typer.echo(f"applied {m.version:04d}_{m.name}")
        else:
            typer.echo("database is up to date")

    _run(main(), settings)


@app.command()
def ingest(
    retire: Annotated[
        bool,
        typer.Option(
            "--retire",
            help="Scale down: store what the broker still holds for this client id "
            "(PUMPWATCH_MQTT_CLIENT_ID), then end its session and exit.",
        ),
    ] = False,
) -> None:
    """Run the ingest service: MQTT telemetry and events into PostgreSQL (foreground)."""
    from services.ingest.service import run
    from services.ingest.settings import IngestSettings

    settings = _settings(IngestSettings)
    _run(run(settings, retire=retire), settings)


@app.command()
def alerts() -> None:
    """Run the alert service: rules over each pump, the alert lifecycle, the outbox; and the
    notification worker on a thread of its own unless PUMPWATCH_NOTIFY_ENABLED=false."""
    from services.alerts.service import run
    from services.alerts.settings import AlertsSettings
    from services.notify import runner
    from services.notify.settings import NotifySettings

    settings = _settings(AlertsSettings)
    parts = (runner.part(_settings(NotifySettings)),) if settings.notify_enabled else ()
    _run(run(settings, parts), settings)


@app.command()
def notify() -> None:
    """Run the notification worker alone: the outbox to webhooks, email and MQTT, escalation,
    the daily digest (foreground). Pair with PUMPWATCH_NOTIFY_ENABLED=false on `alerts`."""
    from services.notify.service import run
    from services.notify.settings import NotifySettings

    settings = _settings(NotifySettings)
    _run(run(settings), settings)


@app.command()
def api(
    host: Annotated[str | None, typer.Option(help="Interface (PUMPWATCH_API_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (PUMPWATCH_API_PORT, 8000).")] = None,
) -> None:
    """The HTTP API (foreground); SIGTERM or Ctrl-C stops it."""
    from services.api.server import run as run_api
    from services.api.settings import ApiSettings

    settings = _settings(ApiSettings)
    try:
        _run(
            run_api(settings, host or settings.api_host, port or settings.api_port),
            settings,
            uvloop=True,
        )
    except OSError as exc:
        typer.echo(f"pumpwatch: error: {exc}", err=True)
        raise typer.Exit(2) from None


keys = typer.Typer(help="API keys: create (shown once), list, revoke.", no_args_is_help=True)
app.add_typer(keys, name="keys")


def _keys_command(work: Any) -> None:
    from services.storage.database import connect_with_retry

    settings = _settings(CommonSettings)

    async def main() -> None:
        conn = await connect_with_retry(
            settings.require_database_url(), application_name="pumpwatch-keys"
        )
        try:
            await work(conn)
        finally:
            await conn.close()

    _run(main(), settings)


@keys.command("create")
def keys_create(
    role: Annotated[str, typer.Option(help="admin, clinician, integrator or fleet.")],
    clinic: Annotated[
        str | None, typer.Option(help="Clinic id (clinician and integrator keys).")
    ] = None,
    label: Annotated[str, typer.Option(help="What the key is for.")] = "",
) -> None:
    """Print a new API key (shown this once; only its hash is stored)."""
    from uuid import UUID

    from services.api import keys as api_keys

    try:
        clinic_id = None if clinic is None else UUID(clinic)
    except ValueError:
        typer.echo(f"pumpwatch: error: --clinic {clinic!r} is not a clinic id", err=True)
        raise typer.Exit(2) from None
    if role not in api_keys.ROLES:
        typer.echo(f"pumpwatch: error: --role must be one of {', '.join(api_keys.ROLES)}", err=True)
        raise typer.Exit(2)

    async def work(conn: Any) -> None:
        try:
            key_id, key = await api_keys.create(
                conn,
                role=role,
                clinic_id=clinic_id,
                label=label,
                created_by="cli",
            )
        except api_keys.KeyError_ as exc:
            typer.echo(f"pumpwatch: error: {exc}", err=True)
            raise typer.Exit(2) from None
        typer.echo(key)
        typer.echo(f"key id {key_id} ({role}); store the key now: it is not shown again", err=True)

    _keys_command(work)


@keys.command("list")
def keys_list() -> None:
    """List keys (never the keys themselves)."""
    from services.api import keys as api_keys

    async def work(conn: Any) -> None:
        for k in await api_keys.listed(conn):
            state = f"revoked {k.revoked_at:%Y-%m-%d}" if k.revoked_at else "active"
            used = f"{k.last_used_at:%Y-%m-%d %H:%M}" if k.last_used_at else "never"
            clinic_text = str(k.clinic_id or "-")
            typer.echo(
                f"{k.id}  {k.role:<10} {clinic_text:<36}  {state:<18} used {used}  {k.label}"
            )

    _keys_command(work)


@keys.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="The key's id.")]) -> None:
    """Revoke a key: it stops working at once."""
    from uuid import UUID

    from services.api import keys as api_keys

    try:
        parsed = UUID(key_id)
    except ValueError:
        typer.echo(f"pumpwatch: error: {key_id!r} is not a key id", err=True)
        raise typer.Exit(2) from None

    async def work(conn: Any) -> None:
        if not await api_keys.revoke(conn, parsed):
            typer.echo(f"pumpwatch: error: no active key {parsed}", err=True)
            raise typer.Exit(1)
        typer.echo(f"revoked {parsed}")

    _keys_command(work)


def _add_lab() -> None:
    """The lab's commands, if the lab is here (the runtime image ships without it)."""
    try:
        from lab.cli import register
    except ImportError:
        return
    register(app)


_add_lab()
