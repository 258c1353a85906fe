"""WebSocket close codes the gateway sends, and what a client should do on each.

Standard library only, so the Python client (shared.client) can use them without the rest.
"""

from __future__ import annotations

# The gateway is draining (SIGTERM, a rolling deploy): reconnect at once, with no backoff, to any
# gateway (the next URL you know, or the same one behind a load balancer), and resume from the
# last offset you saw; nothing is lost. 1012 is the standard "service restart", so generic
# clients and proxies read it as "come back", not as an error.
CLOSE_DRAINING = 1012
# Older gateways closed with 1001 when stopping; it means the same as CLOSE_DRAINING.
CLOSE_GOING_AWAY = 1001
CLOSE_UNAUTHORIZED = 4401  # wrong token: reconnecting will not help
CLOSE_SLOW_CONSUMER = 4008  # resume from your last offset
CLOSE_UNAVAILABLE = 4011  # reconnect and resume
