"""Who a request is: bearer credentials, compared in constant time, and the tenant they make."""

from __future__ import annotations

import hashlib
import hmac

__all__ = ["bearer_token", "secret_in", "tenant_of"]


def bearer_token(authorization: str | None) -> str | None:
    """The credential of an ``Authorization: Bearer <token>`` header (the scheme is
    case-insensitive, RFC 7235); None for a missing header or any other scheme."""
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def secret_in(given: str | None, secrets) -> bool:
    """Constant-time membership (bytes: ``compare_digest`` refuses non-ASCII str)."""
    if not given:
        return False
    raw = given.encode("utf-8", "surrogateescape")
    found = False
    for s in secrets:
        found |= hmac.compare_digest(raw, s.encode("utf-8"))
    return found


def tenant_of(api_key: str | None, user: str | None) -> str | None:
    """The request's tenant: who may copy whose outputs (suffix speculation) and the feedback
    record's tag. It derives from the API key (a one-way hash: no secret reaches Redis); the
    ``user`` field only narrows it within one key, since any client can write any ``user``.
    No key, no tenant: such a request copies only from its own text."""
    if not api_key:
        return None
    tenant = "key:" + hashlib.sha256(api_key.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return tenant + "/user:" + user if user else tenant
