"""Server-Sent Events: ``id:`` is the resume position, ``Last-Event-ID`` resumes."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from gateway.direct_write import sse_writer
from gateway.drain import DRAINING, SSE_RETRY_MS, drain_aware
from gateway.errors import ApiError, error_event
from gateway.outbox import SLOW_CONSUMER, STALLED, ClientStalled, Outbox, Outgoing, write_within
from gateway.state import GATEWAY, bearer, parse_position
from gateway.subscription import UNAVAILABLE
from shared.codec import dump_event
from shared.logs import log
from shared.protocol import EventDict
from shared.stream.position import Position

logger = logging.getLogger("tokenbus.gateway.sse")

HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache, no-transform",
    "X-Accel-Buffering": "no",
    "Connection": "keep-alive",
}
RETRY_MS = 1000
_BATCH = 64


def _start_failed(task: asyncio.Task[None], outbox: Outbox, session_id: str) -> None:
    if task.cancelled() or task.exception() is None:
        return
    log(
        logger,
        "sse_subscribe_failed",
        logging.WARNING,
        session=session_id,
        error=str(task.exception()),
    )
    outbox.close(UNAVAILABLE)


def _frame(event: EventDict, data: str) -> str:
    """One SSE message: ``id:`` (the resume position) for a session event, then its JSON."""
    if "offset" not in event:
        return f"data: {data}\n\n"
    position = Position(event.get("epoch"), int(event["offset"]))
    return f"id: {position.format()}\ndata: {data}\n\n"


def _encoded(out: Outgoing) -> bytes:
    return _frame(out.event, out.text()).encode()


async def _end_for_drain(response: web.StreamResponse) -> None:
    """Send the client elsewhere: EventSource reconnects after ``retry`` with Last-Event-ID."""
    notice = error_event(DRAINING, "gateway draining: reconnect with Last-Event-ID to resume")
    await response.write(f"retry: {SSE_RETRY_MS}\ndata: {dump_event(notice)}\n\n".encode())
    # On a new connection, which this gateway no longer accepts: it reaches another one.
    response.force_close()


# Drain-aware: a stream asked for while draining gets the same ending as an open one, since
# EventSource gives up for good on a non-200 answer (a 503) but reconnects after a stream ends.
@drain_aware
async def session_events(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    session_id = request.match_info["session_id"]
    try:
        gw.authorize(session_id, bearer(request))
        last = request.headers.get("Last-Event-ID") or request.query.get("last_event_id")
        position = parse_position(last) if last else Position()
    except ApiError as exc:
        return exc.response()

    outbox = gw.outbox()
    client = gw.metrics.client("sse")
    subscription = gw.subscription(session_id, outbox, position)
    response = web.StreamResponse(headers=HEADERS)
    await response.prepare(request)
    await response.write(f"retry: {RETRY_MS}\n\n".encode())
    log(logger, "sse_open", session=session_id, epoch=position.epoch, offset=position.offset)
    client.opened()
    gw.drain.add_stream(outbox)
    stall_s = gw.settings.client_stall_s

    async def send(data: bytes) -> None:
        # Bounded: a client that stopped reading is cut on our clock, not when it reads again.
        await write_within(response.write(data), stall_s, request.transport, len(data))

    # While the loop below is parked, live events are written from the hub's reader at once.
    outbox.direct = sse_writer(
        response, request.transport, _encoded, client.written_directly, gw.ticks
    )
    # Started beside the write loop: a long replay waits for this loop to send what it queued.
    starting = asyncio.create_task(subscription.start())
    starting.add_done_callback(lambda task: _start_failed(task, outbox, session_id))
    try:
        while True:
            item = await outbox.get(wait_s=gw.settings.keepalive_s)
            if item is None:
                if outbox.closed is None:
                    await send(b": keep-alive\n\n")
                    continue
                if outbox.closed == DRAINING:  # what was queued went out first
                    await _end_for_drain(response)
                    break
                code = outbox.closed
                message = (
                    "client too slow; reconnect with Last-Event-ID to resume"
                    if code == SLOW_CONSUMER
                    else "session history unavailable; reconnect to resume"
                )
                data = dump_event(error_event(code, message))
                await send(f"data: {data}\n\n".encode())
                log(logger, "sse_dropped", logging.WARNING, session=session_id, reason=code)
                if code == SLOW_CONSUMER:
                    client.dropped_slow()
                break
            # Everything ready goes out in one write; each event as it was published.
            batch = (item, *outbox.take_ready(_BATCH))
            await send("".join([_frame(out.event, out.text()) for out in batch]).encode())
            client.written(out.event for out in batch)
    except ClientStalled:  # its transport is cut already
        log(logger, "sse_dropped", logging.WARNING, session=session_id, reason=STALLED)
        client.dropped_slow()
    except (ConnectionResetError, ConnectionError):
        pass
    finally:
        outbox.detach_direct()
        gw.drain.discard(outbox)
        starting.cancel()
        client.closed()
        subscription.close()
        log(
            logger,
            "sse_close",
            session=session_id,
            epoch=subscription.epoch,
            offset=subscription.offset,
        )
    return response
