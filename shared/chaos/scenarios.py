"""One fault each, injected mid-answer into a running stack, and what every stream received."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
import redis.asyncio as aredis

from shared.chaos.follow import Stream, Transport, follow
from shared.chaos.procs import MODEL, Cluster, cluster
from shared.chaos.report import Row
from shared.keys import Keys
from shared.protocol import Job
from shared.synthetic import synthetic_text

KEYS = Keys()


@dataclass(frozen=True)
class Load:
    streams: int = 500
    tokens: int = 40  # per answer
    rate: float = 20.0  # tokens per second per answer
    lease_ttl_s: float = 2.0
    slots: int = 0  # per worker; 0: room for every stream on one worker
    timeout_s: float = 120.0

    def worker_env(self) -> dict[str, str]:
        return {
            "TOKENBUS_SYNTHETIC_TOKENS": str(self.tokens),
            "TOKENBUS_SYNTHETIC_TOKENS_PER_S": str(self.rate),
            "TOKENBUS_SYNTHETIC_TTFT_MS": "20",
            "TOKENBUS_LEASE_TTL_S": str(self.lease_ttl_s),
            "TOKENBUS_RECLAIM_INTERVAL_S": "0.5",
            "TOKENBUS_WORKER_SLOTS": str(self.slots or self.streams),
            "TOKENBUS_WORKER_DRAIN_S": "0.5",
            "TOKENBUS_BLOCK_MS": "500",
        }


#: A fault: given the stack, its streams and the rows' notes, does its damage and returns
#: whether every signalled process exited as it should.
Fault = Callable[[Cluster, list[Stream], Row], Awaitable[bool]]


async def _open(http: aiohttp.ClientSession, base: str, i: int, load: Load) -> Stream:
    async with http.post(f"{base}/v1/sessions") as response:
        body = await response.json()
    s = Stream(body["session_id"], body["token"])
    prompt = f"chaos stream {i}"
    job = Job.model_validate(
        {"session_id": s.session_id, "prompt": prompt, "sampling": {"seed": i}}
    )
    s.expected = synthetic_text(job, load.tokens)
    return s


async def _post(http: aiohttp.ClientSession, base: str, s: Stream, i: int, load: Load) -> None:
    body = {"prompt": f"chaos stream {i}", "seed": i, "max_tokens": load.tokens}
    headers = {"Authorization": f"Bearer {s.token}"}
    url = f"{base}/v1/sessions/{s.session_id}/jobs"
    for _ in range(50):  # 429/503 while a stack warms up: try again
        async with http.post(url, json=body, headers=headers) as response:
            reply = await response.json()
            if response.status == 202:
                s.job_id = reply["job_id"]
                return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"job not accepted: {reply}")


async def _delivered(streams: list[Stream], share: float, timeout_s: float = 120.0) -> None:
    """Until ``share`` of all expected tokens reached the clients: the answers are mid-way.

    Tokens, not delta events: a busy worker or gateway merges several tokens into one delta.
    """
    want = share * sum(len(s.expected) for s in streams)
    async with asyncio.timeout(timeout_s):
        while sum(s.tokens for s in streams) < want:
            if all(s.ended for s in streams):
                raise RuntimeError("every answer ended before the fault could be injected")
            await asyncio.sleep(0.05)


async def run(
    name: str, load: Load, fault: Fault, *, aof: bool = False, replica: bool = False
) -> Row:
    row = Row(name, load.streams, resync_ok=replica)
    with cluster(aof=aof, worker_env=load.worker_env()) as c:
        if replica:
            await c.start_replica()
        for _ in range(2):
            c.add_gateway()
            c.add_worker()
        await c.ready()
        limits = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=limits) as http:
            gate = asyncio.Semaphore(64)

            async def opened(i: int) -> Stream:
                async with gate:
                    return await _open(http, c.urls[0], i, load)

            streams = list(await asyncio.gather(*(opened(i) for i in range(load.streams))))
            deadline = time.monotonic() + load.timeout_s
            transports: list[Transport] = ["sse", "ws"]
            followers = [
                asyncio.create_task(follow(http, c.urls, s, transports[i % 2], deadline=deadline))
                for i, s in enumerate(streams)
            ]
            await asyncio.sleep(0.5)  # followers subscribed before their jobs start

            async def posted(i: int, s: Stream) -> None:
                async with gate:
                    await _post(http, c.urls[0], s, i, load)

            await asyncio.gather(*(posted(i, s) for i, s in enumerate(streams)))
            row.exits_ok = await fault(c, streams, row)
            await asyncio.gather(*followers)
        for s in streams:
            row.add(s)
        await _takeover_times(c, streams, row)
        if c.vip is not None:
            await c.vip.close()
    return row


async def _takeover_times(c: Cluster, streams: list[Stream], row: Row) -> None:
    fault_at = getattr(row, "_fault_at", None)
    fault_wall = getattr(row, "_fault_wall", None)
    if fault_at is None or fault_wall is None:
        return
    client = aredis.Redis.from_url(c.redis_url)
    try:
        seconds = []
        for s in streams:
            attempts = await client.hget(KEYS.job_lease(s.session_id, s.job_id), "attempts")
            if attempts is None or int(attempts) < 2:
                continue
            # The first token the new attempt made (engine time after the fault), as received:
            # deltas the old worker sent just before dying may arrive after the fault too.
            deltas = [e for e in s.events if e.get("type") == "delta"]
            after = [
                got - fault_at
                for e, got in zip(deltas, s.delta_times, strict=True)
                if float(e.get("t", 0)) > fault_wall
            ]
            if after:
                seconds.append(after[0])
        row.takeovers(seconds)
        row.note += f" taken over: {len(seconds)} streams."
    finally:
        await client.aclose()


def _mark(row: Row) -> None:
    row._fault_at = time.monotonic()  # type: ignore[attr-defined]
    row._fault_wall = time.time()  # type: ignore[attr-defined]


# The faults


async def kill_worker(c: Cluster, streams: list[Stream], row: Row) -> bool:
    await _delivered(streams, 0.3)
    _mark(row)
    c.workers[0].signal(signal.SIGKILL)
    return True


async def pause_worker(c: Cluster, streams: list[Stream], row: Row) -> bool:
    await _delivered(streams, 0.3)
    _mark(row)
    paused = c.workers[0]
    paused.signal(signal.SIGSTOP)
    ttl = float(paused.env.get("TOKENBUS_LEASE_TTL_S", "5"))
    await asyncio.sleep(ttl + 2.0)
    paused.signal(signal.SIGCONT)
    await asyncio.sleep(1.0)
    fenced = paused.log_text().count('"lease_lost"') + paused.log_text().count('"job_fenced"')
    row.note += f" the paused worker was refused {fenced} times after SIGCONT."
    return True


async def kill_gateway(c: Cluster, streams: list[Stream], row: Row) -> bool:
    await _delivered(streams, 0.3)
    c.gateways[0].signal(signal.SIGKILL)
    return True


async def term_gateway(c: Cluster, streams: list[Stream], row: Row) -> bool:
    await _delivered(streams, 0.3)
    gateway = c.gateways[0]
    gateway.signal(signal.SIGTERM)
    code = await asyncio.to_thread(gateway.wait, 30.0)
    row.note += f" gateway exit code {code}."
    return code == 0


async def term_worker(c: Cluster, streams: list[Stream], row: Row) -> bool:
    await _delivered(streams, 0.3)
    _mark(row)
    worker = c.workers[0]
    worker.signal(signal.SIGTERM)
    code = await asyncio.to_thread(worker.wait, 30.0)
    row.note += f" worker exit code {code}."
    return code == 0


async def restart_redis(c: Cluster, streams: list[Stream], row: Row) -> bool:
    await _delivered(streams, 0.3)
    assert c.redis is not None
    c.redis.signal(signal.SIGKILL)
    await asyncio.to_thread(c.redis.wait, 10.0)
    await asyncio.sleep(1.0)
    c.redis.start()
    queued = sum(not s.delta_times for s in streams)
    row.note += f" Redis SIGKILLed and restarted from its AOF after 1 s; {queued} jobs queued."
    return True


async def failover_redis(c: Cluster, streams: list[Stream], row: Row) -> bool:
    """The master dies; its asynchronous replica is promoted and the VIP moves to it."""
    await _delivered(streams, 0.3)
    assert c.redis is not None and c.vip is not None
    c.redis.signal(signal.SIGKILL)
    await asyncio.to_thread(c.redis.wait, 10.0)
    replica = aredis.Redis(port=c.replica_port)
    try:
        offset = (await replica.info("replication")).get("master_repl_offset")
        await replica.replicaof("NO", "ONE")
    finally:
        await replica.aclose()
    await c.vip.move_to(c.replica_port)
    row.note += f" master SIGKILLed; replica (at replication offset {offset}) promoted."
    return True


async def duplicate_jobs(c: Cluster, streams: list[Stream], row: Row) -> bool:
    """Every job's entry XADDed again: half mid-answer, half once answered."""
    client = aredis.Redis.from_url(c.redis_url)
    stream = KEYS.jobs_stream(MODEL)
    try:
        entries: dict[str, Any] = {}
        for _entry_id, fields in await client.xrange(stream) or []:
            if fields is not None:
                entries[json.loads(fields[b"job"])["id"]] = fields
        await _delivered(streams, 0.3)
        half = len(streams) // 2
        for s in streams[:half]:
            await client.xadd(stream, entries[s.job_id])
        async with asyncio.timeout(120):
            while not all(s.ended for s in streams[half:]):  # noqa: ASYNC110 - polled state
                await asyncio.sleep(0.1)
        for s in streams[half:]:
            await client.xadd(stream, entries[s.job_id])
        await asyncio.sleep(2.0)
        counted = 0
        for s in streams:
            counted += int(await client.hget(KEYS.job(s.job_id), "duplicates") or 0)
        row.note += f" second entries acknowledged, not run: {counted} of {len(streams)}."
        return counted == len(streams)
    finally:
        await client.aclose()


POISON: list[dict[str, str | bytes]] = [
    {"job": "[" * 100_000 + "]" * 100_000},
    {"job": '{"v":1,"session_id":"poison","prompt":' + "[" * 50_000 + "]" * 50_000 + "}"},
    {"job": b"\xc1\xff\x00"},
    {"job": '{"v":1,"session_id":"poison-2"}'},
    {"nothing": "here"},
]


async def poison_entries(c: Cluster, streams: list[Stream], row: Row) -> bool:
    client = aredis.Redis.from_url(c.redis_url)
    try:
        for fields in POISON:
            await client.xadd(KEYS.jobs_stream(MODEL), fields)  # type: ignore[arg-type]
        await asyncio.sleep(2.0)
        dead = await client.xlen(KEYS.dead_letter)
        alive = all(w.popen is not None and w.popen.poll() is None for w in c.workers)
        row.note += (
            f" poison entries dead-lettered: {dead} of {len(POISON)}; workers alive: {alive}."
        )
        return dead == len(POISON) and alive
    finally:
        await client.aclose()


SCENARIOS: dict[str, tuple[Fault, bool]] = {
    "worker_kill9": (kill_worker, False),
    "worker_sigstop": (pause_worker, False),
    "worker_sigterm": (term_worker, False),
    "gateway_kill9": (kill_gateway, False),
    "gateway_sigterm": (term_gateway, False),
    "redis_restart": (restart_redis, True),
    "redis_failover": (failover_redis, False),
    "duplicate_job": (duplicate_jobs, False),
    "poison_entry": (poison_entries, False),
}


async def run_scenario(name: str, load: Load) -> Row:
    fault, aof = SCENARIOS[name]
    if name == "redis_restart":
        # Room for a quarter of the streams on each worker: the rest are queued in the jobs
        # stream when Redis dies, and must still run once it is back.
        load = replace(load, slots=max(1, load.streams // 4))
    return await run(name, load, fault, aof=aof, replica=name == "redis_failover")
