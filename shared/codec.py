"""Encoding of jobs (JSON or msgpack, read both) and events (compact JSON)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal

import msgpack
from pydantic import ValidationError

from shared.keys import JOB_FIELD
from shared.protocol import Delta, Error, EventDict, Job, Resync, StreamEnd, StreamStart

JobEncoding = Literal["json", "msgpack"]
AnyEvent = StreamStart | Delta | StreamEnd | Error | Resync


class BadJob(Exception):
    """A jobs-stream entry that cannot become a Job. Carries what could be read of it."""

    def __init__(self, code: str, reason: str, raw: Mapping[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        raw = raw if isinstance(raw, Mapping) else {}
        sid, jid = raw.get("session_id"), raw.get("id")
        self.session_id = sid if isinstance(sid, str) and sid else None
        self.job_id = jid if isinstance(jid, str) and jid else None


def text(value: object) -> str:
    """A Redis reply value as text (redis-py gives bytes unless told to decode)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _raw_job(fields: Mapping[bytes | str, bytes | str]) -> Any:
    by_name = {text(k): v for k, v in fields.items()}
    if JOB_FIELD not in by_name:
        raise BadJob("bad_entry", f"entry has no '{JOB_FIELD}' field")
    payload = by_name[JOB_FIELD]
    data = payload.encode() if isinstance(payload, str) else payload
    stripped = data.lstrip()
    if stripped[:1] == b"{":
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadJob("bad_encoding", f"job is not valid JSON: {exc}") from exc
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise BadJob("bad_encoding", f"job is neither a JSON object nor msgpack: {exc}") from exc


def decode_job(fields: Mapping[bytes | str, bytes | str]) -> Job:
    """Read a jobs-stream entry; raise BadJob with a precise reason when it is not a job."""
    raw = _raw_job(fields)
    if not isinstance(raw, dict):
        raise BadJob("bad_entry", f"job must be an object, got {type(raw).__name__}")
    try:
        return Job.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "job"
        raise BadJob("invalid_job", f"{where}: {first['msg']}", raw) from exc


def encode_job(job: Job, encoding: JobEncoding = "json") -> dict[str, bytes | str]:
    """The fields of a jobs-stream entry for ``job``."""
    if encoding == "msgpack":
        data: bytes | str = msgpack.packb(job.model_dump(mode="json"), use_bin_type=True)
    else:
        data = job.model_dump_json()
    return {JOB_FIELD: data}


def encode_event(event: AnyEvent) -> str:
    """Compact JSON without epoch/offset (the publish script stamps those)."""
    return event.model_dump_json(exclude_none=True, exclude={"epoch", "offset"})


def decode_event(data: bytes | str) -> EventDict:
    value = json.loads(data)
    if not isinstance(value, dict):
        raise ValueError("event is not a JSON object")
    return value


def dump_event(event: EventDict) -> str:
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False)
