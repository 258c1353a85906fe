"""The per-client outbox: coalescing under a backlog, and the drop of a client past its limit."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.direct_write import text_frame
from gateway.outbox import SLOW_CONSUMER, Outbox, Outgoing


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


async def test_an_event_put_while_the_writer_is_parked_is_written_at_once() -> None:
    box = Outbox(max_events=100, max_bytes=1 << 20)
    written: list[str] = []
    room = True

    def direct(out: Outgoing) -> bool:
        if room:
            written.append(out.text())
        return room

    box.direct = direct
    box.put(delta(1, "a"), raw="raw1")  # nobody waits in get(): queued
    assert written == [] and len(box) == 1
    first = await box.get(0.1)
    assert first is not None and first.text() == "raw1"
    getter = asyncio.ensure_future(box.get(1.0))
    await asyncio.sleep(0)  # the writer parks in get()
    box.put(delta(2, "b"), raw="raw2")
    assert written == ["raw2"] and len(box) == 0 and not getter.done()
    room = False  # the socket's buffer is full: queued, and the writer woken
    box.put(delta(3, "c"), raw="raw3")
    got = await getter
    assert got is not None and got.text() == "raw3"
    assert box.direct_writes == 1
    # While the writer is busy (not parked in get()), events queue behind what it writes.
    room = True
    box.put(delta(4, "d"), raw="raw4")
    assert written == ["raw2"] and len(box) == 1
    getter = asyncio.ensure_future(box.get(1.0))
    await asyncio.sleep(0)
    assert getter.done() and (await getter) is not None
    getter = asyncio.ensure_future(box.get(1.0))
    await asyncio.sleep(0)
    box.put(delta(5, "e"), raw="raw5")
    assert written == ["raw2", "raw5"] and box.direct_writes == 2
    getter.cancel()


def test_websocket_text_frames_carry_their_length_as_rfc_6455_says() -> None:
    for size, header in ((5, b"\x81\x05"), (200, b"\x81\x7e\x00\xc8"), (70000, None)):
        payload = b"x" * size
        frame = text_frame(payload)
        if header is None:  # 64-bit length
            assert frame[:2] == b"\x81\x7f" and int.from_bytes(frame[2:10], "big") == size
            header = frame[:10]
        assert frame == header + payload
