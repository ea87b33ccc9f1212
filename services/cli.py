"""The ``pumpwatch`` command line: the services, migrations and keys; the lab's commands
(``demo``, ``simulate``, ``bench``) are added when the lab is installed beside them."""

from __future__ import annotations

import sys
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
    from services.ingest.service import run, tune_collector
    from services.ingest.settings import IngestSettings

    settings = _settings(IngestSettings)
    tune_collector()
    # uvloop: asyncpg's round trips and the event loop cost ingest less than on asyncio's.
    _run(run(settings, retire=retire), settings, uvloop=True)


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


users = typer.Typer(help="People's accounts: create (the first admin).", no_args_is_help=True)
app.add_typer(users, name="users")


@users.command("create")
def users_create(  # noqa: PLR0917 - typer maps each option to a parameter
    email: Annotated[str, typer.Option(help="The person's email: their sign-in name.")],
    name: Annotated[str, typer.Option(help="Their name, as pages and history show it.")],
    role: Annotated[str, typer.Option(help="admin, clinic_admin, clinician or fleet.")] = "admin",
    clinic: Annotated[
        str | None, typer.Option(help="Clinic id (clinician and clinic_admin).")
    ] = None,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from standard input.")
    ] = False,
    invite: Annotated[
        bool,
        typer.Option(
            "--invite",
            help="No password now: print a one-time link (72 h) where the person chooses one.",
        ),
    ] = False,
) -> None:
    """Create a person's account (e.g. the first administrator). The password is asked for
    (twice, hidden), read from stdin, or chosen by the person through a printed link."""
    from datetime import UTC, datetime
    from uuid import UUID

    from services.api import passwords, people, sql
    from services.api.settings import ApiSettings

    settings = _settings(ApiSettings)
    try:
        clinic_id = None if clinic is None else UUID(clinic)
    except ValueError:
        typer.echo(f"pumpwatch: error: --clinic {clinic!r} is not a clinic id", err=True)
        raise typer.Exit(2) from None
    if role not in ("admin", "clinic_admin", "clinician", "fleet"):
        typer.echo(
            "pumpwatch: error: --role must be admin, clinic_admin, clinician or fleet", err=True
        )
        raise typer.Exit(2)
    if (role in people.CLINIC_USER_ROLES) != (clinic_id is not None):
        typer.echo(
            f"pumpwatch: error: a {role} {'needs' if clinic_id is None else 'takes no'} --clinic",
            err=True,
        )
        raise typer.Exit(2)
    email = email.strip().lower()
    hashed = None
    if not invite:
        if password_stdin:
            password = sys.stdin.readline().rstrip("\n")
        else:
            password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
        try:
            passwords.check(
                password,
                min_length=settings.api_password_min_length,
                email=email,
                display_name=name,
            )
        except passwords.WeakPassword as exc:
            typer.echo(f"pumpwatch: error: password refused: {exc}", err=True)
            raise typer.Exit(2) from None
        hashed = passwords.hash_password(password)

    async def work(conn: Any) -> None:
        async with conn.transaction():
            row = await conn.fetchrow(sql.INSERT_USER, email, name, role, clinic_id, hashed, "cli")
            if row is None:
                typer.echo(f"pumpwatch: error: an account with email {email} exists", err=True)
                raise typer.Exit(1)
            await conn.execute(
                sql.INSERT_AUDIT,
                None,
                "cli",
                "cli users create",
                "users",
                str(row["id"]),
                clinic_id,
                "ok",
                201,
                None,
                None,
            )
            link = None
            if invite:
                base = settings.api_public_url or f"http://{settings.api_host}:{settings.api_port}"
                link = await people.new_link(
                    conn,
                    settings,
                    base,
                    user_id=row["id"],
                    purpose="invitation",
                    now=datetime.now(UTC),
                )
        typer.echo(f"user {row['id']} ({role}) {email}", err=True)
        if link is not None:
            typer.echo(link.url)
            typer.echo(f"the link works once, until {link.expires_at:%Y-%m-%d %H:%M} UTC", err=True)

    _keys_command(work)


def _add_lab() -> None:
    """The lab's commands, if the lab is here (the runtime image ships without it)."""
    try:
        from lab.cli import register
    except ImportError:
        return
    register(app)


_add_lab()
