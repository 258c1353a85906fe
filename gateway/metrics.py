"""The gateway's Prometheus metrics, in a registry of its own (one per app, served on /metrics).

Time to first token and inter-token latency are read from the events themselves (the engine's
``t`` on each delta, the job's ``created_at`` on stream_start), once per job per process: the hub
calls ``observe_live`` for every live event it fans out, whatever the number of clients.
The metrics touched per event (delivered events, delivery latency, TTFT, ITL) are the
lock-free kind of ``gateway.loop_metrics``, exposed exactly as prometheus_client's are.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge

from gateway.loop_metrics import LoopCounter, LoopHistogram
from shared.buckets import LATENCY_BUCKETS, TTFT_BUCKETS
from shared.protocol import TERMINAL_TYPES, EventDict

#: Jobs whose timing is followed at once; past it the oldest is forgotten.
MAX_TRACKED_JOBS = 10_000

TRANSPORTS = ("ws", "sse")


@dataclass(slots=True)
class _JobTiming:
    created_at: float | None  # None: its stream_start was not seen here
    last_t: float | None = None  # engine time of the job's last delta seen


class GatewayMetrics:
    def __init__(self, max_tracked_jobs: int = MAX_TRACKED_JOBS) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.active_streams = Gauge(
            "tokenbus_active_streams",
            "Clients following a session now.",
            ["transport"],
            registry=r,
        )
        self.resyncs = Counter(
            "tokenbus_resyncs",
            "Resync events sent to clients, by reason.",
            ["reason"],
            registry=r,
        )
        self.slow_client_drops = Counter(
            "tokenbus_slow_client_drops",
            "Clients disconnected for falling too far behind.",
            ["transport"],
            registry=r,
        )
        self.events_delivered = LoopCounter(
            "tokenbus_events_delivered",
            "Session events written to clients (a merged delta counts once).",
            ["transport"],
            registry=r,
        )
        self.events_direct = LoopCounter(
            "tokenbus_events_written_direct",
            "Of the events written to clients, those written at once from the pub/sub reader "
            "(the connection's write loop was idle and its socket had room).",
            ["transport"],
            registry=r,
        )
        self.delivery_latency = LoopHistogram(
            "tokenbus_delivery_latency_seconds",
            "Engine emitting a delta's last token -> the delta written to a client.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = LoopHistogram(
            "tokenbus_time_to_first_token_seconds",
            "Job created -> engine emitted its first token (from the events, once per job).",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = LoopHistogram(
            "tokenbus_inter_token_latency_seconds",
            "Time between tokens of a job (from the events, once per job).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "tokenbus_queue_depth",
            "Jobs waiting in a model's stream, not yet taken by a worker (at scrape time).",
            ["model"],
            registry=r,
        )
        self.pubsub_channels = Gauge(
            "tokenbus_pubsub_channels",
            "Session channels this gateway is subscribed to.",
            registry=r,
        )
        self.pubsub_connected = Gauge(
            "tokenbus_pubsub_connected",
            "1 while this gateway's pub/sub connection is up.",
            registry=r,
        )
        for transport in TRANSPORTS:  # present from the first scrape, at zero
            self.active_streams.labels(transport)
            self.slow_client_drops.labels(transport)
            self.events_delivered.labels(transport)
            self.events_direct.labels(transport)
        self._max_jobs = max_tracked_jobs
        self._jobs: dict[str, _JobTiming] = {}

    def client(self, transport: str) -> ClientMetrics:
        return ClientMetrics(self, transport)

    def resync(self, reason: str) -> None:
        self.resyncs.labels(reason).inc()

    def observe_live(self, event: EventDict) -> None:
        """A live event, seen once by this process: time to first token, inter-token latency."""
        job_id = event.get("job_id")
        if not isinstance(job_id, str):
            return
        kind = event.get("type")
        if kind == "stream_start":
            self._track(job_id, _JobTiming(_number(event.get("created_at"))))
        elif kind == "delta":
            t = _number(event.get("t"))
            if t is None:
                return
            timing = self._jobs.get(job_id)
            if timing is None:  # joined mid-answer: its first token is unknown here
                self._track(job_id, _JobTiming(None, t))
                return
            if timing.last_t is None:
                if timing.created_at is not None:
                    self.ttft.observe(max(0.0, t - timing.created_at))
            else:
                tokens = _number(event.get("tokens", 1)) or 1.0
                self.itl.observe(max(0.0, t - timing.last_t) / max(tokens, 1.0))
            timing.last_t = t
        elif kind in TERMINAL_TYPES:
            self._jobs.pop(job_id, None)

    @property
    def tracked_jobs(self) -> int:
        return len(self._jobs)

    def _track(self, job_id: str, timing: _JobTiming) -> None:
        self._jobs.pop(job_id, None)
        while len(self._jobs) >= self._max_jobs:
            del self._jobs[next(iter(self._jobs))]  # the oldest
        self._jobs[job_id] = timing


class ClientMetrics:
    """One transport's counters, resolved once (label lookups kept off the write path)."""

    def __init__(self, metrics: GatewayMetrics, transport: str) -> None:
        self._active = metrics.active_streams.labels(transport)
        self._drops = metrics.slow_client_drops.labels(transport)
        self._delivered = metrics.events_delivered.labels(transport)
        self._direct = metrics.events_direct.labels(transport)
        self._latency = metrics.delivery_latency
        self._open = False

    def opened(self) -> None:
        if not self._open:
            self._open = True
            self._active.inc()

    def closed(self) -> None:
        if self._open:
            self._open = False
            self._active.dec()

    def dropped_slow(self) -> None:
        self._drops.inc()

    def written_directly(self, event: EventDict) -> None:
        """``event`` was written from the pub/sub reader, past the write loop."""
        self.written((event,))
        if "offset" in event:
            self._direct.inc()

    def written(self, events: Iterable[EventDict]) -> None:
        """``events`` were just written to the client."""
        now = time.time()
        count = 0
        for event in events:
            if "offset" not in event:
                continue  # not a session event (connected, queued, pong, ...)
            count += 1
            if event.get("type") == "delta":
                t = _number(event.get("t"))
                if t is not None:
                    self._latency.observe(max(0.0, now - t))
        if count:
            self._delivered.inc(count)


def _number(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None
