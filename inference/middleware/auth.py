"""API keys: with API_KEYS set, the API paths need `Authorization: Bearer <key>` (or Anthropic's `x-api-key: <key>`);
the rest stays open."""

from __future__ import annotations

import hashlib
import hmac

from ..web.errors import HTTPError
from ..web.http import ASGIApp, Receive, Scope, Send
from ..web.state import state

AUTHORIZATION = b"authorization"
X_API_KEY = b"x-api-key"  # Anthropic's SDKs send the key this way
PROTECTED_PREFIXES = ("/v1/", "/api/v1/", "/tokenize", "/detokenize")


def _bearer(scope: Scope) -> str | None:
    """The request's key: `Authorization: Bearer <key>`, else `x-api-key: <key>`."""
    found = None
    for name, value in scope["headers"]:
        if name == AUTHORIZATION:
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
        if name == X_API_KEY:
            found = value.decode("latin-1").strip()
    return found


def auth(app: ASGIApp, *, keys: tuple[str, ...]) -> ASGIApp:
    """Refuse API requests without a valid key (401); a valid key becomes the client's identity."""
    if not keys:
        return app
    encoded = [k.encode() for k in keys]

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PROTECTED_PREFIXES):
            await app(scope, receive, send)
            return
        token = _bearer(scope)
        if token is None:
            raise HTTPError(401, "missing_api_key", "this endpoint needs an API key: Authorization: Bearer <key> "
                            "(or x-api-key: <key>)",
                            headers={"WWW-Authenticate": "Bearer"})
        candidate = token.encode()
        # Compare with every key, always: how long this takes must not depend on which key came close.
        matched = False
        for key in encoded:
            matched |= hmac.compare_digest(candidate, key)
        if not matched:
            raise HTTPError(401, "invalid_api_key", "the API key is not valid", headers={"WWW-Authenticate": "Bearer"})
        # Keys never reach Redis or logs: the identity is a digest.
        state(scope).client = "key:" + hashlib.sha256(candidate).hexdigest()[:16]
        await app(scope, receive, send)

    return asgi
