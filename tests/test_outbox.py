"""The per-client outbox: coalescing under a backlog, and the drop of a client past its limit."""

from __future__ import annotations

from typing import Any

from gateway.outbox import SLOW_CONSUMER, Outbox


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
