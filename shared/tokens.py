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


def same_secret(expected: str, given: str | None) -> bool:
    """Whether ``given`` is ``expected``, compared in constant time.

    Compared as UTF-8 bytes: ``hmac.compare_digest`` refuses non-ASCII str, and a value a client
    sent may be any text (a header byte aiohttp kept as a surrogate, a JSON ``"\\ud800"``).
    Text that is not even UTF-8 matches nothing.
    """
    if not given:
        return False
    try:
        given_bytes = given.encode()
    except UnicodeEncodeError:
        return False
    return hmac.compare_digest(expected.encode(), given_bytes)


def verify(secret: str, session_id: str, token: str | None) -> bool:
    try:
        expected = sign(secret, session_id)
    except UnicodeEncodeError:  # a session id no token was ever signed for
        return False
    return same_secret(expected, token)


async def shared_secret(redis: Redis, keys: Keys, configured: str) -> str:
    """The configured secret, else the one kept in Redis (created once, first writer wins)."""
    if configured:
        return configured
    await redis.set(keys.secret, secrets.token_urlsafe(32), nx=True)
    value = await redis.get(keys.secret)
    if value is None:  # pragma: no cover - only if someone deletes it between the two calls
        raise RuntimeError("session secret vanished from Redis")
    return text(value)
