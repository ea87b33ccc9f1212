"""What every ``pumpwatch`` command does first: read its settings (exit 2 naming a bad
variable), configure logging, run its coroutine (exit 2 on a configuration error)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import typer

from services import logs
from services.settings import CommonSettings, ConfigError

S = TypeVar("S", bound=CommonSettings)


def read_settings(kind: type[S]) -> S:
    """Read the settings, or end with exit code 2 naming the bad variable."""
    from pydantic import ValidationError

    try:
        return kind()
    except ValidationError as exc:
        problems = "; ".join(
            f"PUMPWATCH_{'__'.join(str(p) for p in e['loc']).upper()}: {e['msg']}"
            for e in exc.errors()
        )
        typer.echo(f"pumpwatch: error: bad settings: {problems}", err=True)
        raise typer.Exit(2) from None


def run_command(
    main: Coroutine[Any, Any, None], settings: CommonSettings, *, uvloop: bool = False
) -> None:
    """Run a command's coroutine; configuration errors end the process with exit code 2.
    ``uvloop``: on uvloop's event loop (the API: less CPU per request than asyncio's)."""
    from services.errors import FatalError
    from services.ingest.mqtt import MqttRejected
    from services.storage.database import DatabaseRejected
    from services.storage.migrate import MigrationError

    logs.configure(settings.log_level, settings.log_format)
    try:
        if uvloop:
            import uvloop as loop

            loop.run(main)
        else:
            asyncio.run(main)
    except (
        ConfigError,
        FatalError,
        MqttRejected,
        DatabaseRejected,
        MigrationError,
    ) as exc:
        typer.echo(f"pumpwatch: error: {exc}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        pass
