"""Which webhook URLs and addresses pumpwatch may send to, and new signing secrets. Pure code.

A webhook is a URL a clinic's user typed in: pumpwatch must not become a way to reach what
only the server can reach (its loopback, the private network, the cloud's metadata service).
So URLs must be ``https`` and must not name such an address; hosts an operator lists in
``PUMPWATCH_WEBHOOK_ALLOW_HOSTS`` (development, tests, an on-premises receiver) may use
``http`` and any address. The API checks a URL when it is registered
(:func:`check_registration_url`); the sender checks every address the name resolves to at
send time (:func:`address_problem`) and connects only to an address it checked, since a name
can resolve elsewhere by then.
"""

from __future__ import annotations

import base64
import ipaddress
import secrets
from urllib.parse import urlsplit

SECRET_PREFIX = "whsec_"  # noqa: S105 - the format's prefix, not a secret
SECRET_BYTES = 32
"""The Standard Webhooks specification asks for 24 to 64 random bytes."""

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    {
        ipaddress.ip_address("169.254.169.254"),  # AWS, GCP, Azure, OpenStack, …
        ipaddress.ip_address("fd00:ec2::254"),  # AWS over IPv6
        ipaddress.ip_address("100.100.100.200"),  # Alibaba Cloud
    }
)


def parse_allow_hosts(value: str) -> frozenset[str]:
    """``"a.example, localhost"`` → the set of lower-case host names (and literal addresses)."""
    return frozenset(h.strip().lower().strip("[]") for h in value.split(",") if h.strip())


def address_problem(address: str | IPAddress) -> str | None:
    """Why a webhook may not be sent to this IP address, or None when it may (a public one)."""
    if isinstance(address, str):
        try:
            ip: IPAddress = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return f"{address!r} is not an IP address"
    else:
        ip = address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip in METADATA_ADDRESSES:
        return f"{ip} is a cloud metadata address"
    for kind, holds in (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
    ):
        if holds:
            return f"{ip} is a {kind} address"
    if not ip.is_global:
        return f"{ip} is not a public address"
    if isinstance(ip, ipaddress.IPv6Address):
        for inner in _embedded_ipv4(ip):
            problem = address_problem(inner)
            if problem is not None:
                return f"{ip} reaches {inner} through a tunnel or translation: {problem}"
    return None


_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address reaches through a translation or tunnel: 6to4
    (2002::/16), Teredo (its server and client), NAT64 (64:ff9b::/96 and the local-use
    64:ff9b:1::/48), IPv4-compatible (::a.b.c.d)."""
    found: list[ipaddress.IPv4Address] = []
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip.teredo is not None:
        found.extend(ip.teredo)
    if ip in _NAT64 or ip in _NAT64_LOCAL or int(ip) >> 32 == 0:
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return found


def redacted(url: str) -> str:
    """A webhook URL as notices show it: scheme, host, port and path, without the query,
    fragment or credentials (receivers put tokens there)."""
    try:
        parts = urlsplit(url)
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(not a valid URL)"
    return f"{parts.scheme}://{parts.hostname or ''}{port}{parts.path}"


def host_allowed(host: str, allow_hosts: frozenset[str]) -> bool:
    return host.lower().strip("[]") in allow_hosts


def check_registration_url(url: str, allow_hosts: frozenset[str]) -> str | None:  # noqa: PLR0911
    """A human-readable problem with a webhook URL, or None when it may be registered.

    ``https`` only, unless the host is in ``allow_hosts``; no user name or password in the URL
    (secrets belong in the signature); a literal IP address must be public unless allowed. A
    host name is resolved only when sending (:func:`address_problem` on each address)."""
    if len(url) > 2048:
        return "the URL is longer than 2048 characters"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"not a valid URL: {exc}"
    if parts.scheme not in ("https", "http"):
        return "the URL must start with https://"
    host = parts.hostname
    if not host:
        return "the URL has no host"
    if parts.username is not None or parts.password is not None:
        return "the URL must not contain a user name or password"
    if port == 0:
        return "the URL's port must not be 0"
    allowed = host_allowed(host, allow_hosts)
    if parts.scheme == "http" and not allowed:
        return "the URL must use https (http only for hosts in PUMPWATCH_WEBHOOK_ALLOW_HOSTS)"
    if allowed:
        return None
    try:
        literal: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        problem = address_problem(literal)
        if problem is not None:
            return f"webhooks may not target {problem}"
    elif host.lower() == "localhost" or host.lower().endswith(".localhost"):
        return "webhooks may not target localhost"
    return None


def new_secret() -> str:
    """A fresh signing secret: ``whsec_`` and base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode("ascii")
