"""What one gateway process holds: Redis clients, the pub/sub hub, intake, secret and metrics."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web
from redis.asyncio import Redis

from gateway.direct_write import TickWrites
from gateway.drain import Drain
from gateway.errors import ApiError, invalid_api_key, unauthorized
from gateway.hub import Hub
from gateway.intake import Intake
from gateway.metrics import GatewayMetrics
from gateway.outbox import Outbox
from gateway.subscription import Listener, SessionSubscription
from shared import tokens
from shared.conversation import Conversations
from shared.keys import Keys
from shared.settings import Settings
from shared.stream.history import History
from shared.stream.position import BadPosition, Position


@dataclass
class Gateway:
    settings: Settings
    keys: Keys
    redis: Redis
    hub: Hub
    history: History
    intake: Intake
    conversations: Conversations
    secret: str
    metrics: GatewayMetrics
    drain: Drain = field(default_factory=Drain)
    #: Direct writes to clients, sent once per socket at the end of each loop iteration.
    ticks: TickWrites = field(default_factory=TickWrites)

    def authorize(self, session_id: str, token: str | None) -> None:
        if not tokens.verify(self.secret, session_id, token):
            raise unauthorized()

    def require_api_key(self, key: str | None) -> None:
        """401 unless API keys are off (none configured) or ``key`` is one of them."""
        allowed = self.settings.api_key_set()
        if not allowed:
            return
        # Compare with every key in constant time: how far a guess matched stays hidden.
        if not any(tokens.same_secret(k, key) for k in allowed):
            raise invalid_api_key()

    def token(self, session_id: str) -> str:
        return tokens.sign(self.secret, session_id)

    def outbox(self) -> Outbox:
        return Outbox(self.settings.client_queue_events, self.settings.client_queue_bytes)

    def subscription(
        self,
        session_id: str,
        outbox: Outbox,
        position: Position,
        *,
        listener: Listener | None = None,
    ) -> SessionSubscription:
        """``session_id``'s events after ``position`` (the last one the client saw)."""
        return SessionSubscription(
            session_id,
            hub=self.hub,
            history=self.history,
            keys=self.keys,
            outbox=outbox,
            position=position,
            listener=listener,
            on_resync=self.metrics.resync,
        )


GATEWAY = web.AppKey("gateway", Gateway)


def api_key(request: web.Request) -> str | None:
    """The API key from ``Authorization: Bearer`` only: keys never travel in URLs (logs)."""
    header = request.headers.get("Authorization", "")
    return header[7:].strip() if header[:7].lower() == "bearer " else None


def bearer(request: web.Request) -> str | None:
    """The session token: from ``Authorization: Bearer`` (as an API key), else ``?token=``."""
    return api_key(request) or request.query.get("token")


def parse_position(value: str) -> Position:
    """A client's resume position (``Position.parse``); 400 ``bad_position`` if it is none."""
    try:
        return Position.parse(value)
    except BadPosition as exc:
        raise ApiError(400, "bad_position", str(exc)) from None
