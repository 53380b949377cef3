"""API-key authentication: who owns a request.

The owner of every run, checkpoint, session and sampler is derived from the key that created it.
With configured keys, each key is its own owner; with none (single-user mode) any `tml-` key is
accepted and all of them are the owner `"local"`. Only a hash of a key is ever stored.
"""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Request

from tether.types.errors import AuthenticationError

API_KEY_HEADER = "X-API-Key"
SINGLE_USER_OWNER = "local"


def owner_of_key(key: str) -> str:
    """A stable, non-secret owner id for a key."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:16]


class ApiKeyAuth:
    """Checks the request's key (`X-API-Key` or a bearer token) against the configured keys and names the owner."""

    def __init__(self, api_keys: list[str]) -> None:
        self._keys = list(api_keys)

    def owner(self, key: str | None) -> str:
        if not key:
            raise AuthenticationError(f"missing API key (send it in the {API_KEY_HEADER} header)")
        if not self._keys:
            if not key.startswith("tml-"):
                raise AuthenticationError("invalid API key (it must start with 'tml-')")
            return SINGLE_USER_OWNER
        for known in self._keys:
            if hmac.compare_digest(known.encode(), key.encode()):
                return owner_of_key(known)
        raise AuthenticationError("invalid API key")

    def __call__(self, request: Request) -> str:
        """FastAPI dependency: the owner of the request, or 401.

        The key comes in `X-API-Key` (the SDKs) or as `Authorization: Bearer <key>` (the console,
        Prometheus scrapers).
        """
        return self.owner(
            api_key_from_headers(request.headers.get(API_KEY_HEADER), request.headers.get("Authorization"))
        )


def api_key_from_headers(x_api_key: str | None, authorization: str | None) -> str | None:
    """The request's key: `X-API-Key` (the SDKs), else `Authorization: Bearer <key>` (the console, the
    `openai` package, Prometheus scrapers)."""
    if x_api_key:
        return x_api_key
    scheme, _, bearer = (authorization or "").partition(" ")
    return bearer.strip() if scheme.lower() == "bearer" else None
