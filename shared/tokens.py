"""Session tokens: an HMAC of the session id, so any gateway can check one without Redis."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from redis.asyncio import Redis

from shared.codec import text
from shared.keys import Keys


def sign(secret: str, session_id: str) -> str:
    mac = hmac.new(secret.encode(), b"session:" + session_id.encode(), hashlib.sha256).digest()
    return "v1." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def verify(secret: str, session_id: str, token: str | None) -> bool:
    return bool(token) and hmac.compare_digest(sign(secret, session_id), token or "")


async def shared_secret(redis: Redis, keys: Keys, configured: str) -> str:
    """The configured secret, else the one kept in Redis (created once, first writer wins)."""
    if configured:
        return configured
    await redis.set(keys.secret, secrets.token_urlsafe(32), nx=True)
    value = await redis.get(keys.secret)
    if value is None:  # pragma: no cover - only if someone deletes it between the two calls
        raise RuntimeError("session secret vanished from Redis")
    return text(value)
