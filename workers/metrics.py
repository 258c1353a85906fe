"""A worker's Prometheus metrics, in a registry of its own (served when ``metrics_port`` is set)."""

from __future__ import annotations

from typing import Literal, TypeAlias

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from shared.buckets import LATENCY_BUCKETS, TTFT_BUCKETS

Outcome: TypeAlias = Literal["done", "failed", "cancelled", "refused", "duplicate"]
OUTCOMES: tuple[Outcome, ...] = ("done", "failed", "cancelled", "refused", "duplicate")
#: How an attempt of a job left this worker without finishing it.
Leaving: TypeAlias = Literal["fenced", "handed_back", "lost_writes"]
LEAVINGS: tuple[Leaving, ...] = ("fenced", "handed_back", "lost_writes")


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs = Counter(
            "tokenbus_jobs",
            "Jobs finished by this worker, by outcome (refused: a bad entry, dead-lettered; "
            "duplicate: a second entry of a running or finished job, acknowledged).",
            ["outcome"],
            registry=r,
        )
        self.jobs_running = Gauge(
            "tokenbus_jobs_running", "Jobs this worker is running now.", registry=r
        )
        self.ttft = Histogram(
            "tokenbus_time_to_first_token_seconds",
            "Job created -> the engine emitted its first token (first attempts only).",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "tokenbus_inter_token_latency_seconds",
            "Time between tokens the engine emitted for a job.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "tokenbus_tokens_generated", "Tokens the engine generated.", registry=r
        )
        self.continued = Counter(
            "tokenbus_jobs_continued",
            "Jobs this worker took over and continued from an earlier attempt's tokens.",
            registry=r,
        )
        self.left = Counter(
            "tokenbus_attempts_left",
            "Attempts that left this worker unfinished (fenced: another worker took the job; "
            "handed_back: drain or an engine stop; lost_writes: Redis lost what it published).",
            ["reason"],
            registry=r,
        )
        for outcome in OUTCOMES:  # present from the first scrape, at zero
            self.jobs.labels(outcome)
        for reason in LEAVINGS:
            self.left.labels(reason)

    def finished(self, outcome: str) -> None:
        """One job done with; ``outcome`` is one of OUTCOMES."""
        self.jobs.labels(outcome).inc()
