"""Running the API under uvicorn (``pumpwatch api``, and inside ``pumpwatch demo``)."""

from __future__ import annotations

import asyncio
import signal

import uvicorn

from services.api.app import create_app
from services.api.settings import ApiSettings
from services.logs import get

log = get(__name__)


def server(settings: ApiSettings, host: str, port: int) -> uvicorn.Server:
    # X-Forwarded-For and -Proto are believed only from the configured reverse proxies: from
    # anyone else they would let a client write any address into the audit log.
    trusted = settings.api_trusted_proxies.strip()
    config = uvicorn.Config(
        create_app(settings),
        host=host,
        port=port,
        log_config=None,  # our structured logs; uvicorn's access log is off
        access_log=False,
        proxy_headers=bool(trusted),
        forwarded_allow_ips=trusted or None,
        server_header=False,
        lifespan="on",
        http="httptools",
    )
    return uvicorn.Server(config)


async def run(settings: ApiSettings, host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT, then exit cleanly (exit code 0)."""
    settings.require_database_url()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    api = server(settings, host, port)
    log.info("api_starting", host=host, port=port)
    await serve_until(api, stop)
    if not api.started:
        raise OSError(f"the API could not start on {host}:{port} (see the log above)")
    log.info("api_stopped")


async def serve_until(api: uvicorn.Server, stop: asyncio.Event) -> None:
    """Serve until ``stop`` is set (the caller owns the signals; uvicorn's own handlers would
    re-raise the signal after shutdown and end the process with it)."""
    serving = asyncio.create_task(api._serve())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    api.should_exit = True
    stopping.cancel()
    await serving
