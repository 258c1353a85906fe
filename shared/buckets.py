"""Histogram buckets shared by the gateway's and the workers' metrics, so their series compare."""

from __future__ import annotations

#: Engine emit -> written to a client's socket; time between tokens.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Job created -> first token: includes time queued, so it reaches further.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
