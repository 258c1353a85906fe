"""A worker's Prometheus metrics, in a registry of its own (served when ``metrics_port`` is set)."""

from __future__ import annotations

from typing import Literal, TypeAlias

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

Outcome: TypeAlias = Literal["done", "failed", "cancelled", "refused"]
OUTCOMES: tuple[Outcome, ...] = ("done", "failed", "cancelled", "refused")

#: Job created -> first token: includes time queued, so it reaches further.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs = Counter(
            "tokenbus_jobs",
            "Jobs finished by this worker, by outcome (refused: a bad or duplicate entry).",
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
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "tokenbus_tokens_generated", "Tokens the engine generated.", registry=r
        )
        for outcome in OUTCOMES:  # present from the first scrape, at zero
            self.jobs.labels(outcome)

    def finished(self, outcome: str) -> None:
        """One job done with; ``outcome`` is one of OUTCOMES."""
        self.jobs.labels(outcome).inc()
