"""Liveness that tells the truth, readiness that says why not, and /metrics — on one port.

``/healthz`` is 200 while the event loop turns and messages are being processed: it turns 503
when a message has waited ``stall_timeout_s`` with nothing committed meanwhile (counting
messages in the backlog and in batches being judged or committed), or when the loop has not
ticked for that long. ``/readyz`` is 200 when connected to the broker and the database.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from services.errors import FatalError

Waiting = tuple[int, float | None]
"""Messages received and not yet committed, and when (Unix time) the oldest of them arrived."""


@dataclass
class Health:
    stall_timeout_s: float
    waiting: Callable[[], Waiting] = lambda: (0, None)
    problems: dict[str, str] = field(default_factory=dict)
    """What keeps the service from being ready, by check (empty: ready)."""
    heartbeat: float = field(default_factory=time.monotonic)
    last_progress: float = field(default_factory=time.time)
    """Unix time of the last commit (comparable with the messages' arrival times)."""

    def tick(self) -> None:
        self.heartbeat = time.monotonic()

    def progressed(self) -> None:
        self.last_progress = time.time()

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        count, oldest = self.waiting()
        # Stalled: the oldest waiting message arrived, or the last commit happened, this long
        # ago, whichever is later. A quiet spell before a message is not a stall.
        stalled_for = time.time() - max(self.last_progress, oldest) if oldest else 0.0
        loop_age = time.monotonic() - self.heartbeat
        ok = stalled_for < self.stall_timeout_s and loop_age < self.stall_timeout_s
        return ok, {
            "status": "ok" if ok else "stalled",
            "waiting_messages": count,
            "seconds_waiting_without_commit": round(max(stalled_for, 0.0), 3),
            "seconds_since_loop_tick": round(loop_age, 3),
        }

    def check(self, name: str, ok: bool, problem: str) -> None:
        """Record one readiness check: when not ``ok``, ``problem`` is the reason given."""
        if ok:
            self.problems.pop(name, None)
        else:
            self.problems[name] = problem

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        reasons = list(self.problems.values())
        return not reasons, {"status": "ready" if not reasons else "not ready", "reasons": reasons}


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds are not news."""


def serve(health: Health, registry: CollectorRegistry, host: str, port: int) -> Callable[[], None]:
    """Start the HTTP server in a daemon thread; returns the function that stops it."""
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path in ("/healthz", "/readyz"):
            ok, body = health.liveness() if path == "/healthz" else health.readiness()
            status = "200 OK" if ok else "503 Service Unavailable"
            start_response(status, [("Content-Type", "application/json")])
            return [json.dumps(body).encode()]
        if path == "/metrics":
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: try /metrics, /healthz or /readyz\n"]

    server = make_server(host, port, app, ThreadingWSGIServer, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()

    return stop


def serve_or_fail(
    health: Health, registry: CollectorRegistry, host: str, port: int
) -> Callable[[], None]:
    """:func:`serve`, or a :class:`FatalError` saying why the port cannot be served."""
    try:
        return serve(health, registry, host, port)
    except OSError as exc:
        raise FatalError(f"cannot serve metrics on {host}:{port}: {exc.strerror}") from exc
