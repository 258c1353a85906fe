"""Recovery: keeping this worker's leases, and taking over jobs whose worker stopped.

Why XAUTOCLAIM with a min-idle equal to the lease TTL, rather than XPENDING and a lease check
per entry: it is one command that returns only candidates, resumes from a cursor and examines
a bounded number of entries per call, so it stays cheap with thousands pending. For the idle
time to mean "nobody renewed the lease", a worker re-claims its own running entries (XCLAIM
JUSTID, which resets their idle time) every time it renews their leases (workers.lease_keeper).
The lease remains the authority: a claimed entry whose lease is still held is left pending.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from shared.codec import text
from shared.keys import JOBS_GROUP
from shared.logs import log
from workers.intake import Entry, stream_entries

if TYPE_CHECKING:
    from workers.consumer import Worker
    from workers.runner import Running

logger = logging.getLogger("tokenbus.worker.recovery")


class Recovery:
    def __init__(self, worker: Worker) -> None:
        self.w = worker
        self._cursor = "0-0"
        self.ttl_ms = worker.leases.ttl_ms

    async def reclaim(self, count: int) -> list[Entry]:
        """Up to ``count`` entries whose holder stopped renewing, now claimed by this worker."""
        w = self.w
        reply = await w.redis.xautoclaim(
            w.stream, JOBS_GROUP, w.consumer, self.ttl_ms, start_id=self._cursor, count=count
        )
        self._cursor = text(reply[0]) if reply and reply[0] else "0-0"
        entries = stream_entries({w.stream: [reply[1]]}) if reply and reply[1] else []
        if entries:
            log(logger, "jobs_reclaimed", entries=[e for e, _ in entries])
        return entries

    async def leave_pending(self, entry_id: str, *, ms_left: int) -> None:
        """Keep ``entry_id`` pending, claimable by any worker once ``ms_left`` has passed."""
        w = self.w
        idle = max(0, self.ttl_ms - ms_left)
        await w.redis.xclaim(
            w.stream, JOBS_GROUP, w.consumer, 0, [entry_id], idle=idle, justid=True
        )

    async def hand_back(self, running: Running) -> bool:
        """Give a job this worker can no longer run to another one now, not after the TTL."""
        w, job = self.w, running.job
        if running.fence is None:
            released = True  # never started here: its entry alone says it must run
        else:
            released = await w.leases.release(
                job.session_id, job.id, owner=w.consumer, fence=running.fence
            )
        if released:
            await self.leave_pending(running.entry_id, ms_left=0)
            w.metrics.left.labels("handed_back").inc()
        log(logger, "job_handed_back", job_id=job.id, entry_id=running.entry_id, released=released)
        return released
