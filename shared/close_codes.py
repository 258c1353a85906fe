"""WebSocket close codes the gateway sends, and what a client should do on each.

Standard library only, so the Python client (shared.client) can use them without the rest.
"""

from __future__ import annotations

CLOSE_GOING_AWAY = 1001  # the gateway is stopping: reconnect (to any gateway) and resume
CLOSE_UNAUTHORIZED = 4401  # wrong token: reconnecting will not help
CLOSE_SLOW_CONSUMER = 4008  # resume from your last offset
CLOSE_UNAVAILABLE = 4011  # reconnect and resume
