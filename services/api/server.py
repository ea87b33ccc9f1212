"""Running the API under uvicorn (``pumpwatch api``, and inside ``pumpwatch demo``)."""

from __future__ import annotations

import asyncio

import uvicorn

from services.api.app import create_app
from services.api.settings import ApiSettings
from services.logs import get

log = get(__name__)


def server(settings: ApiSettings, host: str, port: int) -> uvicorn.Server:
    config = uvicorn.Config(
        create_app(settings),
        host=host,
        port=port,
        log_config=None,  # our structured logs; uvicorn's access log is off
        access_log=False,
        proxy_headers=True,
        server_header=False,
        lifespan="on",
    )
    return uvicorn.Server(config)


async def run(settings: ApiSettings, host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT (uvicorn's handlers), then exit cleanly."""
    settings.require_database_url()
    api = server(settings, host, port)
    log.info("api_starting", host=host, port=port)
    await api.serve()
    if not api.started:
        raise OSError(f"the API could not start on {host}:{port} (see the log above)")


async def serve_until(api: uvicorn.Server, stop: asyncio.Event) -> None:
    """Serve until ``stop`` is set (the demo owns the signals)."""
    api.config.setup_event_loop = lambda: None  # type: ignore[method-assign]
    task = asyncio.create_task(api._serve())
    await stop.wait()
    api.should_exit = True
    await task
