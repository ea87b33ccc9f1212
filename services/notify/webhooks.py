"""Webhooks per the Standard Webhooks specification, sent only where they may go.

Each delivery is a POST of ``{"id", "type", "created_at", "data"}`` with the headers
``webhook-id`` (the delivery's idempotency key: receivers dedupe on it), ``webhook-timestamp``
and ``webhook-signature`` (``v1,<base64 HMAC-SHA256>`` over ``id.timestamp.body``, made by the
``standardwebhooks`` package; during a secret rotation's overlap one signature per secret,
space-separated). Only a 2xx answer delivers; redirects are never followed (a 3xx fails).

Where a webhook may go is checked when connecting, on the addresses themselves: the host name
is resolved once, every address it resolves to is checked
(:func:`services.domain.webhook_urls.address_problem`: no loopback, private, link-local,
metadata, … unless the host is in ``PUMPWATCH_WEBHOOK_ALLOW_HOSTS``), and the connection is made
to a checked address — never through a second lookup that could answer differently. TLS still
verifies the certificate against the host name. This is an httpcore network backend under
httpx's transport, so pooled keep-alive connections were each checked when made.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from typing import ClassVar
from urllib.parse import urlsplit

import httpcore
import httpx
from standardwebhooks.webhooks import Webhook

from services.domain.notifications import Channel
from services.domain.webhook_urls import address_problem, check_registration_url, host_allowed
from services.logs import get
from services.notify.channel import Message, Result

log = get(__name__)

Resolver = Callable[[str, int], Awaitable[list[str]]]
"""Host name and port → IP addresses (as text), in the order to try them."""
USER_AGENT = "pumpwatch-webhooks/1"


class BlockedAddress(Exception):
    """The webhook's host resolves to an address pumpwatch may not send to."""


async def system_resolver(host: str, port: int) -> list[str]:
    """The system's resolver (``getaddrinfo``), addresses de-duplicated in its order."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def sign(message_id: str, at: datetime, body: str, secrets: Iterable[str]) -> str:
    """The ``webhook-signature`` header: one ``v1,<signature>`` per secret."""
    return " ".join(Webhook(secret).sign(message_id, at, body) for secret in secrets)


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """Resolve once, check every address, connect to a checked one."""

    def __init__(self, allow_hosts: frozenset[str], resolver: Resolver) -> None:
        self.allow_hosts = allow_hosts
        self.resolver = resolver
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            addresses = await asyncio.wait_for(self.resolver(host, port), timeout)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(f"resolving {host} timed out") from exc
        except OSError as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
        if not addresses:
            raise httpcore.ConnectError(f"{host} resolves to no address")
        if not host_allowed(host, self.allow_hosts):
            for address in addresses:
                problem = address_problem(address)
                if problem is not None:
                    raise BlockedAddress(f"{host} resolves to {problem}")
        failure: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    address,
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None
        raise failure

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise BlockedAddress("webhooks are never sent to a Unix socket")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport with the connection pool on :class:`GuardedBackend` (httpx 0.2x
    builds its pool in ``__init__``; it is replaced by the same pool on our backend)."""

    def __init__(self, backend: GuardedBackend, *, max_connections: int = 100) -> None:
        super().__init__(trust_env=False)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            max_connections=max_connections,
            max_keepalive_connections=20,
            keepalive_expiry=30.0,
            network_backend=backend,
        )


class WebhookSender:
    channel: ClassVar[Channel] = "webhook"

    def __init__(
        self,
        *,
        allow_hosts: frozenset[str],
        timeout_s: float,
        resolver: Resolver | None = None,
        max_connections: int = 100,
    ) -> None:
        self.allow_hosts = allow_hosts
        backend = GuardedBackend(allow_hosts, resolver or system_resolver)
        self._client = httpx.AsyncClient(
            transport=GuardedTransport(backend, max_connections=max_connections),
            timeout=httpx.Timeout(timeout_s),
            follow_redirects=False,
            trust_env=False,
        )

    async def send(self, message: Message) -> Result:  # noqa: PLR0911 - one per outcome
        url = message.target
        problem = check_registration_url(url, self.allow_hosts)
        if problem is not None:
            return Result("blocked", error=problem)
        if message.keys is None:
            return Result("error", error="the webhook has no signing secret")
        body = json.dumps(message.payload, separators=(",", ":"), ensure_ascii=False)
        now = datetime.now(UTC)
        headers = {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "webhook-id": message.message_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": sign(message.message_id, now, body, message.keys.signing(now)),
        }
        try:
            async with self._client.stream(
                "POST", url, content=body.encode(), headers=headers
            ) as response:
                status = response.status_code  # the body is not read: nothing in it counts
        except BlockedAddress as exc:
            return Result("blocked", error=str(exc))
        except httpx.TimeoutException as exc:
            return Result("timeout", error=_describe(exc))
        except (httpx.TransportError, OSError) as exc:
            return Result("network", error=_describe(exc))
        except httpx.HTTPError as exc:
            return Result("error", error=_describe(exc))
        if 200 <= status < 300:
            return Result("delivered", status_code=status)
        if 300 <= status < 400:
            return Result(
                "redirect", status_code=status, error=f"HTTP {status}: redirects are not followed"
            )
        return Result("http_status", status_code=status, error=f"HTTP {status}")

    async def aclose(self) -> None:
        await self._client.aclose()


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:500]


def url_host(url: str) -> str:
    """The host of a URL, for logs (paths and queries may carry a receiver's tokens)."""
    try:
        return urlsplit(url).hostname or "?"
    except ValueError:
        return "?"
