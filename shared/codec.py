"""Encoding of jobs (JSON or msgpack, read both) and events (compact JSON).

Events are decoded and encoded with orjson (a gateway decodes every live event once and writes
thousands a second); what orjson refuses and the stdlib accepts (an escaped lone surrogate, NaN)
takes the stdlib's path, so both accept and produce the same documents as before.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import msgpack
import orjson
from pydantic import ValidationError

from shared.keys import JOB_FIELD
from shared.protocol import (
    Delta,
    Error,
    EventDict,
    Job,
    Resync,
    StreamEnd,
    StreamStart,
    has_lone_surrogate,
)

JobEncoding = Literal["json", "msgpack"]
AnyEvent = StreamStart | Delta | StreamEnd | Error | Resync


#: Deepest nesting of objects and arrays accepted in any JSON (or msgpack) we read from outside.
#: No request or job needs more than a handful of levels; a bound keeps every later step
#: (validation, logging, echoing) safely away from Python's recursion limit.
MAX_DEPTH = 64


class BadJson(ValueError):
    """Input that is not JSON we accept (syntax, nesting, numbers, text), with a clear reason."""


class BadJob(Exception):
    """A jobs-stream entry that cannot become a Job. Carries what could be read of it."""

    def __init__(self, code: str, reason: str, raw: Mapping[str, Any] | None = None) -> None:
        # The reason may quote the entry (a field name): keep it writable to Redis and logs.
        reason = utf8_safe(reason)
        super().__init__(reason)
        self.code = code
        self.reason = reason
        raw = raw if isinstance(raw, Mapping) else {}
        sid, jid = raw.get("session_id"), raw.get("id")
        self.session_id = (
            sid if isinstance(sid, str) and sid and not has_lone_surrogate(sid) else None
        )
        self.job_id = jid if isinstance(jid, str) and jid and not has_lone_surrogate(jid) else None


def text(value: object) -> str:
    """A Redis reply value as text (redis-py gives bytes unless told to decode)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def utf8_safe(value: str) -> str:
    """``value`` with anything UTF-8 cannot hold (lone surrogates) written as escapes."""
    if value.isascii():
        return value
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


def check_depth(value: object, max_depth: int = MAX_DEPTH) -> None:
    """Raise BadJson when ``value`` nests objects/arrays deeper than ``max_depth``.

    Iterative on purpose: the point is to never recurse on untrusted nesting.
    """
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Iterable[object] = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        if depth >= max_depth:
            raise BadJson(f"nested deeper than {max_depth} levels")
        stack.extend((child, depth + 1) for child in children)


def parse_json(data: str | bytes, max_depth: int = MAX_DEPTH) -> Any:
    """JSON from outside, or BadJson saying why not (never RecursionError or a stray ValueError)."""
    try:
        value = json.loads(data)
    except RecursionError as exc:
        raise BadJson(f"nested deeper than {max_depth} levels") from exc
    except UnicodeDecodeError as exc:
        raise BadJson(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise BadJson(f"{exc.msg} (line {exc.lineno}, column {exc.colno})") from exc
    except ValueError as exc:  # an integer longer than Python will convert
        raise BadJson(str(exc)) from exc
    check_depth(value, max_depth)
    return value


def _raw_job(fields: Mapping[bytes | str, bytes | str]) -> Any:
    by_name = {
        k.decode(errors="replace") if isinstance(k, bytes) else k: v for k, v in fields.items()
    }
    if JOB_FIELD not in by_name:
        raise BadJob("bad_entry", f"entry has no '{JOB_FIELD}' field")
    payload = by_name[JOB_FIELD]
    data = payload.encode(errors="surrogatepass") if isinstance(payload, str) else payload
    stripped = data.lstrip()
    if stripped[:1] == b"{":
        try:
            return parse_json(data)
        except BadJson as exc:
            raise BadJob("bad_encoding", f"job is not valid JSON: {exc}") from exc
    try:
        value = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise BadJob("bad_encoding", f"job is neither a JSON object nor msgpack: {exc}") from exc
    try:
        check_depth(value)
    except BadJson as exc:
        raise BadJob("bad_encoding", f"job (msgpack) is {exc}") from exc
    return value


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
    """A published event's JSON as a dict; ValueError when it is not a JSON object."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        value = json.loads(data)  # an escaped lone surrogate or NaN: valid to the stdlib
    if not isinstance(value, dict):
        raise ValueError("event is not a JSON object")
    return value


def dump_event(event: EventDict) -> str:
    """Compact JSON text, non-ASCII kept as is."""
    try:
        return orjson.dumps(event).decode()
    except orjson.JSONEncodeError:  # a lone surrogate, an int past 64 bits, a non-str key
        pass
    out = json.dumps(event, separators=(",", ":"), ensure_ascii=False)
    # A value a client sent (an echoed ``ref``) may hold a lone surrogate, which no UTF-8 frame
    # can carry; escaped, it is the same JSON value.
    if has_lone_surrogate(out):
        out = json.dumps(event, separators=(",", ":"))
    return out
