"""``tokenbus bench``: tokenbus measured side by side with a baseline in the same run.

Scenarios: ``fabric`` (synthetic engine, tokenbus vs a broker-less in-process server),
``capacity`` (streams one gateway holds within latency), ``engine`` (a real model: tokenbus vs
vLLM's own OpenAI server vs AsyncLLM in-process). Results: ``bench/RESULTS.md``.
"""
