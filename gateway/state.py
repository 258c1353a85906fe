"""What one gateway process holds: Redis clients, the pub/sub hub, intake, secret and metrics."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web
from redis.asyncio import Redis

from gateway.errors import ApiError, unauthorized
from gateway.history import History
from gateway.hub import Hub
from gateway.intake import Intake
from gateway.metrics import GatewayMetrics
from gateway.outbox import Outbox
from gateway.subscription import Listener, SessionSubscription
from shared import tokens
from shared.keys import Keys
from shared.settings import Settings


@dataclass
class Gateway:
    settings: Settings
    keys: Keys
    redis: Redis
    hub: Hub
    history: History
    intake: Intake
    secret: str
    metrics: GatewayMetrics

    def authorize(self, session_id: str, token: str | None) -> None:
        if not tokens.verify(self.secret, session_id, token):
            raise unauthorized()

    def token(self, session_id: str) -> str:
        return tokens.sign(self.secret, session_id)

    def outbox(self) -> Outbox:
        return Outbox(self.settings.client_queue_events, self.settings.client_queue_bytes)

    def subscription(
        self,
        session_id: str,
        outbox: Outbox,
        *,
        epoch: str | None,
        offset: int,
        listener: Listener | None = None,
    ) -> SessionSubscription:
        return SessionSubscription(
            session_id,
            hub=self.hub,
            history=self.history,
            keys=self.keys,
            outbox=outbox,
            epoch=epoch,
            offset=offset,
            listener=listener,
            on_resync=self.metrics.resync,
        )


GATEWAY = web.AppKey("gateway", Gateway)


def bearer(request: web.Request) -> str | None:
    """The session token from ``Authorization: Bearer``, else from ``?token=``."""
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    return request.query.get("token")


def parse_position(value: str) -> tuple[str | None, int]:
    """``"<epoch>:<offset>"`` or a bare ``"<offset>"`` (any epoch)."""
    epoch, _, offset = value.strip().rpartition(":")
    if not offset.isdigit():
        raise ApiError(400, "bad_position", f"not a stream position: {value!r}")
    return (epoch or None), int(offset)


def format_position(epoch: str | None, offset: int) -> str:
    return f"{epoch}:{offset}" if epoch else str(offset)
