"""Who is calling: the verified API key when there is one, otherwise the client's IP address.

X-Forwarded-For is believed only when the direct peer is a trusted proxy (TRUSTED_PROXIES); then the client is
the rightmost address in the chain that is not itself a trusted proxy. Never trusted by default.
"""

from __future__ import annotations

import ipaddress
from typing import Sequence

from ..config import IPNetwork
from .http import Scope
from .state import state

FORWARDED_FOR = b"x-forwarded-for"


def _trusted(address: str, proxies: Sequence[IPNetwork]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in proxies)


def client_ip(scope: Scope, proxies: Sequence[IPNetwork]) -> str:
    peer = scope.get("client")
    address = peer[0] if peer else "unknown"
    if not proxies or not _trusted(address, proxies):
        return address
    hops: list[str] = []
    for name, value in scope["headers"]:
        if name == FORWARDED_FOR:
            hops += [h.strip() for h in value.decode("latin-1").split(",") if h.strip()]
    for hop in reversed(hops):
        if not _trusted(hop, proxies):
            return hop
    return hops[0] if hops else address


def client_id(scope: Scope, proxies: Sequence[IPNetwork]) -> str:
    """The identity rate limits are counted against (kept in the request's state: auth sets it from the key)."""
    request = state(scope)
    if request.client is None:
        request.client = "ip:" + client_ip(scope, proxies)
    return request.client
