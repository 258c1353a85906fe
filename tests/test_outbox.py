"""The per-client outbox: coalescing under a backlog, and the drop of a client past its limit."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

from gateway.direct_write import DirectWriter, TickWrites, text_frame
from gateway.outbox import SLOW_CONSUMER, Outbox
from shared.protocol import EventDict


def delta(offset: int, text: str, job: str = "j") -> dict[str, Any]:
    return {"type": "delta", "epoch": "e", "offset": offset, "job_id": job, "delta": text}


async def test_short_backlog_goes_out_as_published() -> None:
    box = Outbox(max_events=100, max_bytes=1 << 20, coalesce_after=4)
    for i in range(1, 4):
        box.put(delta(i, f"t{i}"), raw=f"raw{i}")
    items = [await box.get(0.1) for _ in range(3)]
    assert [i.text() for i in items if i] == ["raw1", "raw2", "raw3"]


async def test_long_backlog_merges_deltas_of_one_job_keeping_every_character() -> None:
    box = Outbox(max_events=100, max_bytes=1 << 20, coalesce_after=2)
    for i in range(1, 11):
        box.put(delta(i, f"<{i}>"))
    box.put({"type": "stream_end", "epoch": "e", "offset": 11, "job_id": "j"})
    got = [box.get_nowait() for _ in range(len(box))]
    events = [g.event for g in got if g]
    # Two items queued, then every further delta joins the last one.
    assert [e["offset"] for e in events] == [1, 10, 11]
    assert events[1]["from_offset"] == 2 and events[1]["tokens"] == 9
    assert "".join(e.get("delta", "") for e in events) == "".join(f"<{i}>" for i in range(1, 11))
    assert box.coalesced == 8


async def test_deltas_of_different_jobs_never_merge() -> None:
    box = Outbox(max_events=100, max_bytes=1 << 20, coalesce_after=1)
    box.put(delta(1, "a", job="x"))
    box.put(delta(2, "b", job="y"))
    assert len(box) == 2


async def test_past_its_limit_the_outbox_closes_as_slow_consumer() -> None:
    box = Outbox(max_events=4, max_bytes=1 << 20)
    for i in range(1, 6):
        box.put({"type": "stream_start", "epoch": "e", "offset": i, "job_id": f"j{i}"})
    assert box.closed == SLOW_CONSUMER
    assert await box.get(0.1) is None  # what was queued is dropped: the client resumes instead

    by_bytes = Outbox(max_events=1000, max_bytes=1000)
    by_bytes.put(delta(1, "x" * 2000))
    assert by_bytes.closed == SLOW_CONSUMER


class _Peer(asyncio.Protocol):
    """The client's end of a real socket pair: what it received, in order."""

    def __init__(self) -> None:
        self.data = b""

    def data_received(self, data: bytes) -> None:
        self.data += data


async def _socket_pair() -> tuple[asyncio.Transport, _Peer]:
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    transport, _ = await loop.create_connection(asyncio.Protocol, sock=ours)
    _, peer = await loop.create_connection(_Peer, sock=theirs)
    return transport, peer


async def _until(check: Callable[[], bool]) -> None:
    for _ in range(200):
        if check():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("timed out")


async def test_events_put_while_the_writer_is_parked_leave_in_one_send_per_tick() -> None:
    transport, peer = await _socket_pair()
    box = Outbox(max_events=100, max_bytes=1 << 20)
    sent: list[EventDict] = []
    box.direct = DirectWriter(transport, lambda o: o.text().encode(), sent.append, TickWrites())
    box.put(delta(1, "a"), raw="<1>")  # nobody waits in get(): queued for the write loop
    assert len(box) == 1 and sent == []
    first = await box.get(0.1)
    assert first is not None and first.text() == "<1>"
    getter = asyncio.ensure_future(box.get(5.0))
    await asyncio.sleep(0)  # the write loop parks in get()
    box.put(delta(2, "b"), raw="<2>")
    box.put(delta(3, "c"), raw="<3>")
    # Taken past the write loop, not woken, and nothing sent before the tick ends...
    assert len(box) == 0 and not getter.done() and box.direct_writes == 2
    assert [e["offset"] for e in sent] == [2, 3] and transport.get_write_buffer_size() == 0
    await _until(lambda: peer.data == b"<2><3>")  # ...then both together, in order
    # Refused (the writer is detached): queued, and the loop woken; what the direct writer
    # holds always goes before what the loop writes next.
    box.put(delta(4, "d"), raw="<4>")  # taken, not yet sent
    assert isinstance(box.direct, DirectWriter)
    box.direct._detached = True  # as a closing response's writer refuses
    box.put(delta(5, "e"), raw="<5>")
    got = await getter
    assert got is not None and got.text() == "<5>" and peer.data.endswith(b"<3>")
    transport.write(got.text().encode())  # the write loop's own write
    await _until(lambda: peer.data == b"<2><3><4><5>")
    transport.close()


def test_websocket_text_frames_carry_their_length_as_rfc_6455_says() -> None:
    for size, header in ((5, b"\x81\x05"), (200, b"\x81\x7e\x00\xc8"), (70000, None)):
        payload = b"x" * size
        frame = text_frame(payload)
        if header is None:  # 64-bit length
            assert frame[:2] == b"\x81\x7f" and int.from_bytes(frame[2:10], "big") == size
            header = frame[:10]
        assert frame == header + payload
